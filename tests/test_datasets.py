"""A dataset is a params choice (issue #25): another dataset in the IDX format is one file in
conf/data/ and `dvc exp run -S data=NAME`, with no change to stages/. Its class names and image
shape reach every output from what prepare recorded: the metrics, the plots, the card, the model
file, the exported ONNX graph and wardrobe predict under both runtimes."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from tests.conftest import (
    CLASS_NAMES,
    REPO,
    TEST_PER_CLASS,
    TINY,
    TRAIN_PER_CLASS,
    committed_params,
    idx_bytes,
    make_project,
    module_env,
    png_claiming,
    repro,
    run_module,
    sh,
    synthetic_images,
)
from wardrobe.common import SPLITS, WardrobeError, load_split
from wardrobe.data.preparation import list_pictures, prepare, snapshot
from wardrobe.params import DataParams, PrepareParams, parse_params

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
        "content_sha256": record["content_sha256"],  # of the pinned hashes: checked by test_prepare
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
        result = run_module("wardrobe", "predict", "four.npy", "--json", "--top-k", "4", "--runtime", runtime, cwd=repo)
        assert result.returncode == 0, result.stderr
        answers[runtime] = [json.loads(line)["top_k"] for line in result.stdout.splitlines()]
        assert all(sorted(entry["class"] for entry in top) == sorted(SHAPES) for top in answers[runtime])
    assert [top[0]["class"] for top in answers["keras"]] == [top[0]["class"] for top in answers["onnx"]]
    too_many = run_module("wardrobe", "predict", "four.npy", "--top-k", "5", cwd=repo)
    assert too_many.returncode == 1
    assert too_many.stderr.strip() == "error: --top-k 5: the model knows 4 classes"


# ---- image folders --------------------------------------------------------------------------------


def write_folder(root: Path, images: np.ndarray, labels: np.ndarray, class_folders: list[str]) -> None:
    """ROOT/CLASS/NNNNN.png, the file names numbering the images in their original order."""
    for index, (image, label) in enumerate(zip(images, labels, strict=True)):
        folder = root / class_folders[label]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{index:05d}.png")


def folder_config(root: Path, **overrides: object) -> dict:
    """A conf/data file for a folder dataset, as a user writes it."""
    config = {
        "name": "Folder",
        "description": "pictures in folders",
        "format": "folder",
        "root": str(root),
        "test_root": "",
        "test_fraction": 0.25,
        "image_size": [28, 28],
        "channels": 1,
        "photo_fit": "resize",
    }
    return {**config, **overrides}


def folder_params(root: Path, **overrides: object) -> DataParams:
    return DataParams(**folder_config(root, **overrides))


PREPARE = PrepareParams(val_fraction=0.25, seed=42, download_timeout_s=1, max_download_mb=1, workers=1)


def load_dataset(data: DataParams, params: PrepareParams, out_dir: Path | None = None):
    """prepare into a fresh folder; the splits read back whole, and the record."""
    out_dir = out_dir or Path(tempfile.mkdtemp()) / "prepared"
    info = prepare(data, params, out_dir)
    splits = {}
    for split in SPLITS:
        x, y = load_split(out_dir, split)
        splits[split] = (np.asarray(x), y)
    return splits, info


def test_the_idx_files_as_a_folder_of_pngs_give_the_same_arrays_byte_for_byte(
    tmp_path: Path, idx_source: tuple[Path, dict[str, str]]
) -> None:
    """The synthetic Fashion-MNIST files written out as class folders of PNGs (folder names that
    sort in label order) prepare to exactly the IDX path's arrays, labels and split."""
    folders = [f"{label}-{name.replace('/', '_')}" for label, name in enumerate(CLASS_NAMES)]
    train, test = synthetic_images(TRAIN_PER_CLASS, seed=1), synthetic_images(TEST_PER_CLASS, seed=2)
    write_folder(tmp_path / "train", *train, folders)
    write_folder(tmp_path / "test", *test, folders)
    idx_data = parse_params(committed_params(*idx_source)).data
    from_idx, idx_info = load_dataset(idx_data, PREPARE)
    data = folder_params(tmp_path / "train", test_root=str(tmp_path / "test"), photo_fit="object")
    from_folder, folder_info = load_dataset(data, PREPARE)
    for split in ("train", "val", "test"):
        for want, got in zip(from_idx[split], from_folder[split], strict=True):
            assert want.dtype == got.dtype and want.shape == got.shape
            assert want.tobytes() == got.tobytes(), split
    assert folder_info.class_names == tuple(folders) and folder_info.image_shape == idx_info.image_shape == (28, 28)
    assert folder_info.counts == idx_info.counts


def test_a_folder_is_read_resized_in_rgb_split_and_hashed(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for name, count in (("cats", 8), ("dogs", 8), ("owls", 8)):
        (tmp_path / "pics" / name).mkdir(parents=True)
        for i in range(count):
            Image.fromarray(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)).save(tmp_path / f"pics/{name}/{i}.jpg")
    (tmp_path / "pics/.DS_Store").write_bytes(b"hidden: skipped")
    data = folder_params(tmp_path / "pics", image_size=(32, 24), channels=3)
    splits, info = load_dataset(data, PREPARE)
    assert info.class_names == ("cats", "dogs", "owls") and info.image_shape == (32, 24, 3)
    assert info.counts == {"train": 12, "val": 6, "test": 6}  # 2 of each class held out, then 2 of the rest
    assert splits["train"][0].shape == (12, 32, 24, 3) and splits["train"][0].dtype == np.float32
    assert sorted(np.bincount(splits["test"][1]).tolist()) == [2, 2, 2]
    _, info_again = load_dataset(data, PREPARE)
    assert info_again.content_sha256 == info.content_sha256
    Image.fromarray(np.zeros((40, 30, 3), np.uint8)).save(tmp_path / "pics/owls/0.jpg")
    assert load_dataset(data, PREPARE)[1].content_sha256 != info.content_sha256


def _two_classes(root: Path, per_class: int = 4) -> None:
    for name in ("a", "b"):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.new("L", (10, 10), 40 * i).save(root / name / f"{i}.png")


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda r: None, "{r}: no such folder"),
        (lambda r: (r / "only").mkdir(parents=True), "{r}: needs a sub-folder per class, at least two; found ['only']"),
        (lambda r: (_two_classes(r), (r / "c").mkdir()), "{r}/c: empty class folder"),
        (lambda r: (_two_classes(r), (r / "a/notes.txt").write_text("x")), "{r}/a/notes.txt: not a picture"),
        (lambda r: (_two_classes(r), (r / "a/9.png").write_bytes(b"\x89PNG\r\n\x1a\n")), "{r}/a/9.png: "),
        (lambda r: (_two_classes(r), (r / "a/8.png").write_text("hello")), "{r}/a/8.png: not a readable image"),
        (
            lambda r: (_two_classes(r), png_claiming(r / "a/7.png", 9000, 8000)),
            "{r}/a/7.png: image is over the 64,000,000-pixel cap",
        ),
        (lambda r: _two_classes(r, per_class=1), "split: no pictures of a, b; each class needs enough pictures"),
    ],
    ids=["missing", "one-class", "empty-class", "not-a-picture", "truncated", "unreadable", "huge", "too-few"],
)
def test_bad_folders_fail_in_one_line_naming_the_file(tmp_path: Path, setup, message: str) -> None:
    root = tmp_path / "pics"
    setup(root)
    with pytest.raises(WardrobeError) as error:
        load_dataset(folder_params(root, image_size=(10, 10)), PREPARE)
    assert message.format(r=root) in str(error.value) and "\n" not in str(error.value)


def test_a_test_folder_must_have_the_training_classes(tmp_path: Path) -> None:
    _two_classes(tmp_path / "train")
    _two_classes(tmp_path / "test")
    (tmp_path / "test/b").rename(tmp_path / "test/c")
    with pytest.raises(
        WardrobeError, match=r"test: class folders \['a', 'c'\], not the training folder's \['a', 'b'\]"
    ):
        load_dataset(folder_params(tmp_path / "train", test_root=str(tmp_path / "test"), image_size=(10, 10)), PREPARE)


def test_a_picture_that_changes_while_the_folder_is_read_is_refused(tmp_path: Path) -> None:
    _two_classes(tmp_path / "pics")
    pictures = list_pictures(tmp_path / "pics")
    before = snapshot(pictures)
    assert snapshot(list_pictures(tmp_path / "pics")) == before
    Image.new("L", (12, 10)).save(tmp_path / "pics" / pictures.names()[0])  # rewritten between the two looks
    assert snapshot(pictures) != before
    (tmp_path / "pics" / pictures.names()[1]).unlink()
    assert snapshot(pictures) == "changed"


def test_any_number_of_decoding_processes_writes_the_same_bytes(tmp_path: Path) -> None:
    """A process per core (prepare.workers 0, 2 here) or one: the same files, byte for byte, and
    the same record, over several chunks of pictures and a separate test folder."""
    rng = np.random.default_rng(3)
    for root, count in (("train", 300), ("test", 60)):
        for name in ("a", "b", "c"):
            (tmp_path / root / name).mkdir(parents=True)
            for i in range(count // 3):
                Image.fromarray(rng.integers(0, 256, (12, 9, 3), dtype=np.uint8)).save(
                    tmp_path / f"{root}/{name}/{i}.png"
                )
    data = folder_params(tmp_path / "train", test_root=str(tmp_path / "test"), image_size=(10, 8), channels=3)
    one = prepare(data, PREPARE, tmp_path / "one")
    two = prepare(data, dataclasses.replace(PREPARE, workers=2), tmp_path / "two")
    assert one == two and one.counts == {"train": 225, "val": 75, "test": 60}
    for name in sorted(p.name for p in (tmp_path / "one").iterdir()):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name


# ---- RGB through the model, the augmentation and the views ------------------------------------------


def test_rgb_images_train_augment_and_take_views_like_grayscale(
    tmp_path: Path, idx_source: tuple[Path, dict[str, str]]
) -> None:
    """The cnn recipes with every speed-run option on N×H×W×3 images: builds, initialises (the
    whitening filters span the 3 channels), trains a step, and its views and batch augmentation
    move and mirror the pixels, not the channels."""
    import tensorflow as tf

    from wardrobe.model.file import Views, shifted
    from wardrobe.model.layers import TestTimeViews
    from wardrobe.training import augment_batch, fit

    rng = np.random.default_rng(0)
    x = rng.random((24, 16, 16, 3), dtype=np.float32)
    y = np.tile(np.arange(3, dtype=np.uint8), 8)
    overrides = ("train.epochs=1", "train.batch_size=8", "train.whiten_init=true", "train.identity_init=true")
    params = parse_params(committed_params(*idx_source, *overrides)).train
    model = fit(params, (x, y), (x, y), tmp_path / "h.csv", 3, verbose=0)
    assert model.input_shape == (None, 16, 16, 3) and model.output_shape == (None, 3)
    first_conv = next(layer for layer in model.layers if isinstance(layer, keras_conv()))
    assert first_conv.kernel.shape[2] == 3

    views = Views(True, 1).offsets()
    got = np.asarray(TestTimeViews(views)(x[:2]))
    want = [(shifted(x[:2], dy, dx)[:, :, ::-1] if mirror else shifted(x[:2], dy, dx)) for dy, dx, mirror in views]
    np.testing.assert_array_equal(got, np.stack(want))
    assert got.shape == (10, 2, 16, 16, 3)

    batch = tf.constant(x[:4])
    mirrored = augment_batch(batch, tf.constant([1, 2], tf.int64), True, 0, tf.constant([True, False, True, False]))
    np.testing.assert_array_equal(mirrored.numpy(), np.stack([x[0, :, ::-1], x[1], x[2, :, ::-1], x[3]]))
    moved = augment_batch(batch, tf.constant([3, 4], tf.int64), False, 2).numpy()
    assert moved.shape == (4, 16, 16, 3)
    for image, original in zip(moved, x[:4], strict=True):  # each a whole-pixel move of all 3 channels
        assert any(
            np.array_equal(image, shifted(original[None], dy, dx)[0]) for dy in range(-2, 3) for dx in range(-2, 3)
        )


def keras_conv() -> type:
    import keras

    return keras.layers.Conv2D


PETS = ("cat", "dog", "owl")


@pytest.mark.pipeline
def test_a_folder_of_rgb_pictures_runs_end_to_end_and_predicts_with_its_class_names(
    tmp_path: Path, idx_source: tuple[Path, dict[str, str]]
) -> None:
    """A user's own pictures: 3 class folders of 32×32 RGB PNGs, one conf/data file, `-S data=pets`;
    all five stages (the export parity gate included), the card, predict under both runtimes."""
    repo = make_project(tmp_path / "project", committed_params(*idx_source))
    shutil.copy(REPO / "conf/config.yaml", repo / "conf/config.yaml")
    colours = np.random.default_rng(0).integers(0, 256, (len(PETS), 32, 32, 3))
    rng = np.random.default_rng(1)
    pictures = repo / "data/pictures/pets"
    for label, name in enumerate(PETS):
        (pictures / name).mkdir(parents=True)
        for i in range(20):
            image = np.clip(colours[label] + rng.normal(0, 30, (32, 32, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(image).save(pictures / f"{name}/{i:02d}.png")
    config = folder_config(
        Path("data/pictures/pets"),
        name="Pets",
        description="three kinds of made-up pet pictures, 32×32 RGB",
        image_size=[32, 32],
        channels=3,
    )
    (repo / "conf/data/pets.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "my pictures")

    sh(repo, "dvc", "exp", "run", *[arg for override in ("data=pets", *TINY) for arg in ("-S", override)])

    record = json.loads((repo / "data/prepared/dataset.json").read_text())
    assert record["class_names"] == list(PETS) and record["image_shape"] == [32, 32, 3]
    assert record["counts"] == {"train": 33, "val": 12, "test": 15}  # 5 of 20 held out per class, then 4 of 15
    assert list(json.loads((repo / "metrics/metrics.json").read_text())["per_class"]) == list(PETS)
    card = (repo / "metrics/model_card.md").read_text()
    assert "classifier of Pets images into 3 classes" in card and "shape N×32×32×3" in card
    assert "32×32 RGB pictures" in card and f"SHA-256 of their names and bytes: `{record['content_sha256']}`" in card
    assert json.loads((repo / "metrics/export.json").read_text())["onnx"]["top1_agreement"] >= 0.9995

    (repo / "mine").mkdir()
    for name in PETS:
        shutil.copy(pictures / f"{name}/00.png", repo / f"mine/{name}.png")
    for runtime in ("keras", "onnx"):
        result = run_module("wardrobe", "predict", "mine", "--json", "--top-k", "3", "--runtime", runtime, cwd=repo)
        assert result.returncode == 0, result.stderr
        answers = [json.loads(line) for line in result.stdout.splitlines()]
        assert [a["path"] for a in answers] == [f"mine/{name}.png" for name in PETS]
        assert all(sorted(entry["class"] for entry in a["top_k"]) == sorted(PETS) for a in answers)

    # The folder is a DVC dependency of prepare: a picture added, changed or removed each makes
    # `dvc status` name prepare (and only prepare: the later stages' inputs have not changed yet).
    def stale() -> list[str]:
        return sorted(json.loads(sh(repo, "dvc", "status", "--json").stdout))

    assert stale() == []
    shutil.copy(pictures / "cat/00.png", pictures / "owl/new.png")
    assert stale() == ["prepare"]
    (pictures / "owl/new.png").unlink()
    assert stale() == []
    changed, original = pictures / "dog/03.png", (pictures / "dog/03.png").read_bytes()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(changed)
    assert stale() == ["prepare"]
    changed.write_bytes(original)
    assert stale() == []
    (pictures / "cat/05.png").unlink()
    assert stale() == ["prepare"]
    assert repro(repo) == ["prepare", "train", "evaluate", "export", "card"]
    # One cat fewer: 5 of its 19 held out for test (round(4.75)), 4 of the other 14 for validation.
    counts = json.loads((repo / "data/prepared/dataset.json").read_text())["counts"]
    assert counts == {"train": 32, "val": 12, "test": 15}
    assert stale() == []


def prepared_folder_project(tmp_path: Path, idx_source: tuple[Path, dict[str, str]], per_class: int = 10) -> Path:
    """A project whose params name a folder of two classes (data/pictures/pics), after prepare ran."""
    project = tmp_path / "project"
    _two_classes(project / "data/pictures/pics", per_class=per_class)  # enough for the committed val_fraction 0.1
    params = committed_params(*idx_source)
    params["data"] = folder_config(Path("data/pictures/pics"), image_size=[10, 10])
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    result = run_module("stages.prepare", cwd=project)
    assert result.returncode == 0, result.stderr
    return project


@pytest.mark.pipeline
def test_a_bad_picture_stops_prepare_in_one_line_and_keeps_the_prepared_data(
    tmp_path: Path, idx_source: tuple[Path, dict[str, str]]
) -> None:
    """The stage as DVC runs it: a truncated picture is one line on stderr naming it, exit 1, and
    the previously prepared arrays stay exactly as they were (no temp folder left)."""
    project = prepared_folder_project(tmp_path, idx_source)
    before = {p.name: p.read_bytes() for p in (project / "data/prepared").iterdir()}
    bad = project / "data/pictures/pics/b/2.png"
    bad.write_bytes(bad.read_bytes()[:40])
    result = run_module("stages.prepare", cwd=project)
    assert result.returncode == 1
    assert result.stderr.startswith("error: data/pictures/pics/b/2.png: ") and result.stderr.count("\n") == 1
    assert {p.name: p.read_bytes() for p in (project / "data/prepared").iterdir()} == before
    assert sorted(p.name for p in (project / "data").iterdir()) == ["pictures", "prepared"]


@pytest.mark.pipeline
def test_a_killed_prepare_keeps_the_prepared_data_and_the_next_run_cleans_up(
    tmp_path: Path, idx_source: tuple[Path, dict[str, str]]
) -> None:
    """prepare killed mid-folder (SIGKILL: no handler runs) leaves the previous arrays exactly as
    they were; its half-written temp folder is removed by the next run, which succeeds."""
    project = prepared_folder_project(tmp_path, idx_source, per_class=1500)
    before = {p.name: p.read_bytes() for p in (project / "data/prepared").iterdir()}
    Image.new("L", (10, 10), 99).save(project / "data/pictures/pics/a/new.png")
    process = subprocess.Popen(
        [sys.executable, "-m", "stages.prepare"], cwd=project, env=module_env(), stderr=subprocess.PIPE, text=True
    )
    assert process.stderr is not None
    assert "pictures" in process.stderr.readline()  # the first progress line: it is writing now
    process.kill()
    process.wait()
    assert {p.name: p.read_bytes() for p in (project / "data/prepared").iterdir()} == before
    assert [p.name for p in (project / "data").iterdir() if p.name.endswith(".tmp")] != []  # the killed run's
    result = run_module("stages.prepare", cwd=project)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (project / "data").iterdir()) == ["pictures", "prepared"]
    assert {p.name: p.read_bytes() for p in (project / "data/prepared").iterdir()} != before


@pytest.mark.pipeline
def test_a_folder_outside_data_pictures_is_refused_by_name(
    tmp_path: Path, idx_source: tuple[Path, dict[str, str]]
) -> None:
    """DVC tracks data/pictures/ for prepare: a folder elsewhere would not be tracked, so prepare
    refuses it in one line naming the key, before reading anything."""
    _two_classes(tmp_path / "elsewhere")
    params = committed_params(*idx_source)
    params["data"] = folder_config(tmp_path / "elsewhere", image_size=[10, 10])
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    result = run_module("stages.prepare", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr == (
        f"error: params.yaml: data.root: {tmp_path / 'elsewhere'} is not below data/pictures/, the folder DVC "
        "tracks for prepare; move or `dvc add` the pictures into data/pictures/NAME and set root: data/pictures/NAME\n"
    )
    assert not (tmp_path / "data/prepared").exists()


# Linux keeps a process's peak RSS across fork and exec: a stage forked from this pytest worker
# would report the worker's own RSS (700 MB once it has loaded TensorFlow) as its peak. So a small,
# fresh Python forks the stage and reports the stage's wait4 ru_maxrss.
PEAK_RSS = """
import os, subprocess, sys
process = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
_, status, usage = os.wait4(process.pid, 0)
sys.stderr.write(process.stderr.read().decode()[-2000:])
print(os.waitstatus_to_exitcode(status), usage.ru_maxrss)
"""


def _peak_rss_mb(module: str, cwd: Path) -> float:
    """Run `python -m module` in `cwd` as DVC would; its peak resident set (wait4's ru_maxrss)."""
    result = subprocess.run(
        [sys.executable, "-c", PEAK_RSS, sys.executable, "-m", module],
        cwd=cwd,
        env=module_env(),
        capture_output=True,
        text=True,
    )
    code, maxrss_kb = result.stdout.split()
    assert code == "0", result.stderr
    return int(maxrss_kb) / 1024


@pytest.mark.pipeline
def test_prepare_and_train_memory_does_not_grow_with_the_folder(
    tmp_path: Path, idx_source: tuple[Path, dict[str, str]]
) -> None:
    """N and 4N pictures of 64×64 RGB (4N: 118 MB of float32 arrays, 236 MB as the old in-memory
    split plus its TensorFlow copy): prepare's and train's peak RSS stay within 10 % of N's."""
    rng = np.random.default_rng(0)
    peaks = {}
    for count in (600, 2400):
        project = tmp_path / str(count)
        for i in range(count):
            folder = project / "data/pictures/pics" / "abc"[i % 3]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(folder / f"{i:05d}.png")
        params = committed_params(*idx_source, *TINY, "train.batch_size=64")
        params["data"] = folder_config(Path("data/pictures/pics"), image_size=[64, 64], channels=3)
        (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        peaks[count] = {stage: _peak_rss_mb(f"stages.{stage}", project) for stage in ("prepare", "train")}
    for stage in ("prepare", "train"):
        assert peaks[2400][stage] <= 1.1 * peaks[600][stage], (stage, peaks)
