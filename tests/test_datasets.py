"""A dataset is a params choice (issue #25): another dataset in the IDX format is one file in
conf/data/ and `dvc exp run -S data=NAME`, with no change to stages/. Its class names and image
shape reach every output from what prepare recorded: the metrics, the plots, the card, the model
file, the exported ONNX graph and wardrobe-predict under both runtimes."""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.conftest import REPO, TINY, committed_params, idx_bytes, make_project, run_module, sh

# A made-up dataset unlike Fashion-MNIST in everything the code could have assumed: 4 classes,
# 12×16 images (not square), its own file names.
SHAPES = ("circle", "square", "triangle", "cross")
SHAPE = (12, 16)


def shapes_dataset(per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Noisy copies of one random template per class."""
    templates = np.random.default_rng(0).integers(0, 256, size=(len(SHAPES), *SHAPE))
    rng = np.random.default_rng(seed)
    labels = np.tile(np.arange(len(SHAPES), dtype=np.uint8), per_class)
    images = np.clip(templates[labels] + rng.normal(0, 40, size=(len(labels), *SHAPE)), 0, 255)
    return images.astype(np.uint8), labels


def write_shapes_config(repo: Path, source: Path) -> None:
    """What a user writes: the files, their hashes and the class names, in conf/data/shapes.yaml."""
    source.mkdir(parents=True)
    files = {split: [f"shapes-{split}-images", f"shapes-{split}-labels"] for split in ("train", "test")}
    hashes = {}
    for split, per_class, seed in (("train", 30, 1), ("test", 10, 2)):
        for name, array in zip(files[split], shapes_dataset(per_class, seed), strict=True):
            raw = idx_bytes(array)
            (source / f"{name}.gz").write_bytes(gzip.compress(raw, mtime=0))
            hashes[name] = hashlib.sha256(raw).hexdigest()
    config = {
        "name": "Shapes",
        "description": "four drawn shapes, 12×16 grayscale, made up for this test",
        "format": "idx",
        "files": files,
        "sources": [str(source)],
        "sha256": hashes,
        "class_names": list(SHAPES),
        "photo_fit": "resize",
    }
    (repo / "conf/data/shapes.yaml").write_text(yaml.safe_dump(config, sort_keys=False))


@pytest.mark.pipeline
def test_another_idx_dataset_runs_end_to_end_through_dash_s_only(
    tmp_path: Path, idx_source: tuple[Path, dict[str, str]]
) -> None:
    repo = make_project(tmp_path / "project", committed_params(*idx_source))
    shutil.copy(REPO / "conf/config.yaml", repo / "conf/config.yaml")  # the committed conf/, as cloned
    write_shapes_config(repo, tmp_path / "shapes")
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "a dataset of my own")

    overrides = [arg for override in ("data=shapes", *TINY) for arg in ("-S", override)]
    sh(repo, "dvc", "exp", "run", *overrides)

    params = yaml.safe_load((repo / "params.yaml").read_text())
    assert params["data"]["name"] == "Shapes"
    record = json.loads((repo / "data/prepared/dataset.json").read_text())
    assert record == {
        "name": "Shapes",
        "class_names": list(SHAPES),
        "image_shape": list(SHAPE),
        "photo_fit": "resize",
        "counts": {"train": 88, "val": 32, "test": 40},  # val: round(30 × 0.25) = 8 of each class
    }
    assert np.load(repo / "data/prepared/x_test.npy").shape == (40, *SHAPE)
    metrics = json.loads((repo / "metrics/metrics.json").read_text())
    assert list(metrics["per_class"]) == list(SHAPES)
    per_class = (repo / "plots/per_class.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in per_class[1:]] == list(SHAPES)
    card = (repo / "metrics/model_card.md").read_text()
    assert "classifier of Shapes images into 4 classes" in card
    assert "shape N×12×16" in card and "four drawn shapes, 12×16 grayscale" in card
    assert all(f"| {name} |" in card for name in SHAPES)
    assert "Fashion" not in card and "garment" not in card
    export = json.loads((repo / "metrics/export.json").read_text())
    assert export["onnx"]["top1_agreement"] >= 0.9995

    x_test = np.load(repo / "data/prepared/x_test.npy")
    np.save(repo / "four.npy", (x_test[:4] * 255).round().astype(np.uint8))
    answers = {}
    for runtime in ("keras", "onnx"):
        result = run_module("stages.predict", "four.npy", "--json", "--top-k", "4", "--runtime", runtime, cwd=repo)
        assert result.returncode == 0, result.stderr
        answers[runtime] = [json.loads(line)["top_k"] for line in result.stdout.splitlines()]
        assert all(sorted(entry["class"] for entry in top) == sorted(SHAPES) for top in answers[runtime])
    assert [top[0]["class"] for top in answers["keras"]] == [top[0]["class"] for top in answers["onnx"]]
    too_many = run_module("stages.predict", "four.npy", "--top-k", "5", cwd=repo)
    assert too_many.returncode == 1
    assert too_many.stderr.strip() == "error: --top-k 5: the model knows 4 classes"
