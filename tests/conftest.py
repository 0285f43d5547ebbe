"""Tiny synthetic Fashion-MNIST stand-ins, written as real gzipped IDX files: tests never download."""

from __future__ import annotations

import copy
import functools
import gzip
import hashlib
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from wardrobe.common import DatasetInfo
from wardrobe.model.file import ModelRecord, Views
from wardrobe.params import compose

REPO = Path(__file__).resolve().parent.parent
# The default dataset's config, which the synthetic IDX files stand in for.
FASHION_MNIST = yaml.safe_load((REPO / "conf/data/fashion_mnist.yaml").read_text(encoding="utf-8"))
CLASS_NAMES: tuple[str, ...] = tuple(FASHION_MNIST["class_names"])
IDX_FILES: tuple[str, ...] = tuple(name for pair in FASHION_MNIST["files"].values() for name in pair)
# What prepare records for it, and what train writes into a model file of it (any views).
FASHION_INFO = DatasetInfo(FASHION_MNIST["name"], CLASS_NAMES, (28, 28), FASHION_MNIST["photo_fit"], {}, "")
FASHION_RECORD = ModelRecord(Views(True), CLASS_NAMES, (28, 28), FASHION_MNIST["photo_fit"], FASHION_MNIST["name"])
TRAIN_PER_CLASS = 12
TEST_PER_CLASS = 4
NOISE = 110.0  # std of the pixel noise: hard enough that a one-epoch mlp is not perfect


def idx_bytes(array: np.ndarray) -> bytes:
    """Serialize a uint8 array as IDX: magic 0x0000 08 NDIM, big-endian dims, raw bytes."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def synthetic_images(per_class: int, seed: int, noise: float = NOISE) -> tuple[np.ndarray, np.ndarray]:
    """Noisy copies of one random template per class: learnable, but not perfectly in one epoch.

    Like Fashion-MNIST, the garment is light on a black frame (predict relies on that look) and
    left-right symmetric, so a horizontal flip keeps its class (the default recipe trains with flips).
    """
    templates = np.zeros((10, 28, 28))
    left_half = np.random.default_rng(0).integers(0, 256, size=(10, 20, 10))
    templates[:, 4:24, 4:24] = np.concatenate([left_half, left_half[:, :, ::-1]], axis=2)
    rng = np.random.default_rng(seed)
    labels = np.tile(np.arange(10, dtype=np.uint8), per_class)
    noise_pixels = rng.normal(0, noise, size=(len(labels), 28, 28))
    images = np.clip(templates[labels] + noise_pixels, 0, 255).astype(np.uint8)
    return images, labels


def write_idx_dir(
    directory: Path, noise: float = NOISE, flip_train: tuple[int, ...] = (), flip_test: tuple[int, ...] = ()
) -> dict[str, str]:
    """Write the four .gz files; return their decompressed SHA-256 (the params `sha256` map).
    The labels of the images at flip_train / flip_test move to the next class (wrong on purpose)."""
    directory.mkdir(parents=True, exist_ok=True)
    x_train, y_train = synthetic_images(TRAIN_PER_CLASS, seed=1, noise=noise)
    x_test, y_test = synthetic_images(TEST_PER_CLASS, seed=2, noise=noise)
    for labels, flipped in ((y_train, list(flip_train)), (y_test, list(flip_test))):
        labels[flipped] = (labels[flipped] + 1) % 10
    hashes = {}
    for name, array in (
        ("train-images-idx3-ubyte", x_train),
        ("train-labels-idx1-ubyte", y_train),
        ("t10k-images-idx3-ubyte", x_test),
        ("t10k-labels-idx1-ubyte", y_test),
    ):
        raw = idx_bytes(array)
        (directory / f"{name}.gz").write_bytes(gzip.compress(raw, mtime=0))
        hashes[name] = hashlib.sha256(raw).hexdigest()
    return hashes


@pytest.fixture(scope="session")
def idx_source(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    directory = tmp_path_factory.mktemp("idx")
    return directory, write_idx_dir(directory)


def set_params(params: dict, **overrides: object) -> dict:
    """Set `section.key` values as `dvc exp run -S section.key=value` does: only keys the file has.

    Keyword names use `__` for the dot: set_params(p, train__epochs=1). Returns `params`.
    """
    for dotted, value in overrides.items():
        *parents, key = dotted.split("__")
        node = params
        for part in parents:
            node = node[part]
        assert key in node, f"{'.'.join([*parents, key])} is not in the committed params.yaml: -S could not set it"
        node[key] = value
    return params


@functools.cache
def _composed(overrides: tuple[str, ...]) -> str:
    return compose(REPO / "conf", overrides)


def committed_params(source: Path, hashes: dict[str, str], *overrides: str) -> dict:
    """params.yaml as `dvc exp run -S OVERRIDE...` composes it from the committed conf/, with only
    the data sources pointed at the synthetic files."""
    params = yaml.safe_load(_composed(overrides))
    return set_params(params, data__sources=[str(source)], data__sha256=dict(hashes))


TINY = (
    "train=mlp",
    "train.epochs=1",
    "train.batch_size=16",
    "prepare.val_fraction=0.25",
    "evaluate.batch_size=64",
    "evaluate.example_grid=3",
    "validate.min_accuracy=0.2",
    "validate.min_class_f1=0.0",
    "validate.max_ece=1.0",
    "validate.max_drop=0.01",
)


def tiny_params(source: Path, hashes: dict[str, str]) -> dict:
    """The committed params, pointed at the synthetic source and shrunk to seconds with `-S` overrides."""
    return committed_params(source, hashes, *TINY)


@pytest.fixture
def params_dict(idx_source: tuple[Path, dict[str, str]]) -> dict:
    return copy.deepcopy(tiny_params(*idx_source))


def sh(repo: Path, *args: str, check: bool = True, log: Path | None = None) -> subprocess.CompletedProcess:
    """Run a real command (dvc, git, make) in `repo` with this venv first on PATH.

    Output is captured through pipes, or written to `log` (stdout and stderr together; the
    result's stdout holds it): a command that leaves a daemon holding its stdout, as
    `dvc queue start` does, would keep a pipe open, and the test waiting, until the daemon ends.
    """
    # As typed in a terminal: not as a sub-make of `make test` (which would make `make` print
    # "Entering directory" lines into the output the tests parse).
    outer_make = {"MAKELEVEL", "MAKEFLAGS", "MFLAGS"}
    env = {
        **{key: value for key, value in os.environ.items() if key not in outer_make},
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@example.com",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@example.com",
        "DVC_NO_ANALYTICS": "1",
    }
    if log is None:
        result = subprocess.run(args, cwd=repo, env=env, capture_output=True, text=True)
    else:
        with log.open("w") as out:
            result = subprocess.run(args, cwd=repo, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
        result.stdout, result.stderr = log.read_text(), ""
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def repro(repo: Path) -> list[str]:
    """Run `dvc repro`; return the stages it actually ran, in order."""
    return re.findall(r"Running stage '([^']+)'", sh(repo, "dvc", "repro").stdout)


def write_params(repo: Path, params: dict) -> None:
    """Write params.yaml, and a conf/config.yaml that composes to exactly it, so `dvc exp run`
    (which recomposes params.yaml from conf/) and validate's agreement check see the same params."""
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (repo / "conf").mkdir(exist_ok=True)
    (repo / "conf/config.yaml").write_text(yaml.safe_dump({"defaults": ["_self_"], **params}, sort_keys=False))


def make_project(repo: Path, params: dict) -> Path:
    """A git repo holding a copy of the project (code, dvc.yaml, .dvc/, Makefile), committed."""
    repo.mkdir(parents=True, exist_ok=True)
    shutil.copytree(REPO / "stages", repo / "stages", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "src", repo / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    shutil.copytree(REPO / ".dvc", repo / ".dvc", ignore=shutil.ignore_patterns("tmp", "cache", "config.local"))
    shutil.copytree(REPO / "conf", repo / "conf")
    for name in ("dvc.yaml", "Makefile", ".gitignore", "requirements.lock"):
        shutil.copy(REPO / name, repo / name)
    (repo / "data/pictures").mkdir(parents=True, exist_ok=True)  # prepare's dependency (dvc.yaml)
    shutil.copy(REPO / "data/pictures/README.md", repo / "data/pictures/README.md")
    write_params(repo, params)
    sh(repo, "git", "init", "-q", "-b", "main")
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "project")
    return repo


def png_claiming(path: Path, width: int, height: int) -> None:
    """A tiny PNG whose header claims a huge size (valid CRC): the cap must act before decoding."""
    Image.new("L", (4, 4)).save(path)
    data = bytearray(path.read_bytes())
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for servers the tests start on loopback)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def module_env(**extra: str) -> dict[str, str]:
    """The environment DVC would give a stage: this checkout importable, plus `extra`."""
    return {**os.environ, "PYTHONPATH": str(REPO), **extra}


def run_module(
    module: str, *args: str, cwd: Path, timeout: float = 180, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run `python -m module args` in `cwd` with this checkout importable, as DVC would."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        env=env or module_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# The one finished tiny run that the output tests read: every stage of dvc.yaml, run as DVC runs
# it, on the committed params shrunk by `-S` overrides, with flips and 1-px shifts recorded (what
# `-S train.tta_flip=always -S train.tta_shift=1` trains), so the model has 10 views and export's
# parity covers them.
RUN_VIEWS = ("train.tta_flip=always", "train.tta_shift=1")


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, idx_source: tuple[Path, dict[str, str]]) -> Path:
    """A tiny project after all five stages, its test images also as PNGs in pngs/. Shared by
    every test of a worker: a test that changes anything copies it first (`shutil.copytree`)."""
    work = tmp_path_factory.mktemp("run")
    write_params(work, committed_params(*idx_source, *TINY, *RUN_VIEWS))
    for stage in yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]:
        result = run_module(f"stages.{stage}", cwd=work)
        assert result.returncode == 0, f"{stage}: {result.stderr}"
    (work / "pngs").mkdir()
    for i, image in enumerate(np.load(work / "data/prepared/x_test.npy")):
        Image.fromarray(np.round(image * 255).astype(np.uint8)).save(work / f"pngs/{i:03d}.png")
    return work


def save_wrong_shape_model(path: Path) -> None:
    """A valid Keras model that expects 32×32 inputs in a file that records Fashion-MNIST's 28×28:
    loads fine, must be refused."""
    import keras

    from wardrobe.model.file import save_model

    inputs = keras.Input((32, 32))
    save_model(
        keras.Model(inputs, keras.layers.Dense(10)(keras.layers.Flatten()(inputs))), path, Views(False), FASHION_INFO
    )


# The fast tier (`make test-fast`, `pytest -m "not pipeline"`) leaves out every test marked
# `pipeline`: those that run stage commands, dvc, git, make or a Python that imports TensorFlow in
# subprocesses, or read a project built that way. The marks are explicit; this only refuses a test
# that uses such a project without one, so none slips into the fast tier.
PIPELINE_FIXTURES = {"tiny_run", "project", "work", "clean", "clone"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        used = PIPELINE_FIXTURES & set(getattr(item, "fixturenames", ()))
        if used and item.get_closest_marker("pipeline") is None:
            raise pytest.UsageError(f"{item.nodeid} uses {sorted(used)} but is not marked pipeline")
