"""Probabilities you can trust, on a small real run that learns its synthetic data well (little
noise, 8 epochs of the mlp recipe) with some labels flipped on purpose: the flag for pictures
unlike the training data in wardrobe predict, and the label audit (wardrobe/cli/audit.py)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import TINY, committed_params, run_module, write_idx_dir, write_params
from wardrobe.calibration import scrambled
from wardrobe.cli.audit import label_issues
from wardrobe.model.file import load_keras_classifier
from wardrobe.outputs import MODEL_PATH


def test_only_confidently_disputed_labels_are_issues_ranked_lowest_first() -> None:
    probs = np.array(
        [
            [0.9, 0.1],  # label 0, agreed
            [0.8, 0.2],  # label 0, agreed
            [0.3, 0.7],  # label 0, disputed: 0.3 < class 0's mean 0.667
            [0.45, 0.55],  # label 0, the top class is another, but 0.45 < 0.667: disputed
            [0.1, 0.9],  # label 1, agreed
            [0.6, 0.4],  # label 1, disputed: 0.4 < class 1's mean 0.65
        ]
    )
    labels = np.array([0, 0, 0, 0, 1, 1])
    assert label_issues(probs, labels).tolist() == [2, 5, 3]  # 0.3, 0.4, 0.45


FLIPPED_TEST = (3, 17, 26)  # test images whose label is wrong on purpose
FLIPPED_TRAIN = (5, 40, 77, 101)


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """prepare, train, evaluate and export on the flipped dataset, as DVC runs them."""
    work = tmp_path_factory.mktemp("trust")
    hashes = write_idx_dir(work / "idx", noise=40.0, flip_train=FLIPPED_TRAIN, flip_test=FLIPPED_TEST)
    params = committed_params(work / "idx", hashes, *TINY, "train.epochs=8", "prepare.val_fraction=0.1")
    (work / "project").mkdir()
    write_params(work / "project", params)
    for stage in ("prepare", "train", "evaluate", "export"):
        result = run_module(f"stages.{stage}", cwd=work / "project")
        assert result.returncode == 0, result.stderr
    return work / "project"


@pytest.mark.pipeline
def test_a_picture_unlike_the_training_data_is_flagged_and_a_test_image_is_not(project: Path, tmp_path: Path) -> None:
    """The model file's distance threshold (95 % of validation passes) in both outputs, under both
    runtimes: the test image the model is surest of passes; the same image with its pixels scrambled
    (the same brightness, no shape) is flagged, its distance beyond the threshold."""
    x_test = np.load(project / "data/prepared/x_test.npy")
    classifier = load_keras_classifier(project / MODEL_PATH)
    surest = int(classifier.predict_proba(x_test, 64).max(axis=1).argmax())
    odd = str(tmp_path / "odd.npy")
    np.save(odd, np.stack([x_test[surest], scrambled(x_test[surest : surest + 1])[0]]))
    for runtime in ("keras", "onnx"):
        result = run_module("wardrobe", "predict", odd, "--json", "--runtime", runtime, cwd=project)
        assert result.returncode == 0, result.stderr
        answers = [json.loads(line) for line in result.stdout.splitlines()]
        assert [a["unlike_training"] for a in answers] == [False, True], answers
        threshold = classifier.record.distance_threshold
        assert answers[0]["distance"] <= threshold < answers[1]["distance"], answers
    human = run_module("wardrobe", "predict", odd, cwd=project).stdout.splitlines()
    assert "unlike the training data" not in human[0]
    assert human[1].endswith(f"(over {threshold:.1f}); the class may be wrong]"), human


@pytest.mark.pipeline
def test_the_audit_finds_labels_flipped_on_purpose(project: Path) -> None:
    """The flipped test labels top the list (named by IDX file and index), and with --folds 2 the
    flipped training labels are found too; the grid is a PNG."""
    result = run_module("wardrobe", "audit", "--top", "12", cwd=project)
    assert result.returncode == 0, result.stderr
    with open(project / "audit/label_issues.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    found = {(row["split"], int(row["row"])) for row in rows[: len(FLIPPED_TEST) + 2]}
    assert {("test", index) for index in FLIPPED_TEST} <= found, rows[:6]
    first = next(row for row in rows if row["split"] == "test")
    assert first["origin"] == f"t10k-images-idx3-ubyte#{first['row']}" and first["label"] != first["predicted"]
    with Image.open(project / "audit/label_issues.png") as grid:
        assert grid.format == "PNG" and grid.size[0] > 1000

    result = run_module("wardrobe", "audit", "--folds", "2", "--out", "with-folds", cwd=project, timeout=300)
    assert result.returncode == 0, result.stderr
    with open(project / "with-folds/label_issues.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    origins = {row["origin"] for row in rows[:12]}
    # Training rows are numbered after the validation split is taken out: the origin names the image.
    assert {f"train-images-idx3-ubyte#{index}" for index in FLIPPED_TRAIN} <= origins, rows[:12]


@pytest.mark.pipeline
def test_the_audit_refuses_bad_arguments_in_one_line(tmp_path: Path) -> None:
    result = run_module("wardrobe", "audit", "--folds", "1", cwd=tmp_path)
    assert result.returncode == 2  # a usage error, argparse's status
    assert result.stderr == "error: --top must be >= 1 and --folds 0 (off) or >= 2 (usage: wardrobe audit --help)\n"
