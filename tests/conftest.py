"""Tiny synthetic Fashion-MNIST stand-ins, written as real gzipped IDX files: tests never download."""

from __future__ import annotations

import copy
import gzip
import hashlib
import os
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
TRAIN_PER_CLASS = 12
TEST_PER_CLASS = 4


def idx_bytes(array: np.ndarray) -> bytes:
    """Serialize a uint8 array as IDX: magic 0x0000 08 NDIM, big-endian dims, raw bytes."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def synthetic_images(per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Noisy copies of one random template per class: learnable, but not perfectly in one epoch.

    Like Fashion-MNIST, the garment is light on a black frame (predict relies on that look).
    """
    templates = np.zeros((10, 28, 28))
    templates[:, 4:24, 4:24] = np.random.default_rng(0).integers(0, 256, size=(10, 20, 20))
    rng = np.random.default_rng(seed)
    labels = np.tile(np.arange(10, dtype=np.uint8), per_class)
    noise = rng.normal(0, 110, size=(len(labels), 28, 28))
    images = np.clip(templates[labels] + noise, 0, 255).astype(np.uint8)
    return images, labels


def write_idx_dir(directory: Path) -> dict[str, str]:
    """Write the four .gz files; return their decompressed SHA-256 (the params `sha256` map)."""
    directory.mkdir(parents=True, exist_ok=True)
    x_train, y_train = synthetic_images(TRAIN_PER_CLASS, seed=1)
    x_test, y_test = synthetic_images(TEST_PER_CLASS, seed=2)
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


def tiny_params(source: Path, hashes: dict[str, str]) -> dict:
    """The project's params.yaml, pointed at the synthetic source and shrunk to seconds."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["prepare"]["sources"] = [str(source)]
    params["prepare"]["sha256"] = dict(hashes)
    params["prepare"]["val_fraction"] = 0.25
    params["train"] = {"preset": "mlp", "epochs": 1, "batch_size": 16}
    params["evaluate"]["batch_size"] = 64
    params["evaluate"]["example_grid"] = 3
    params["validate"] = {"min_accuracy": 0.2, "min_class_f1": 0.0, "max_drop": 0.01}
    return params


@pytest.fixture
def params_dict(idx_source: tuple[Path, dict[str, str]]) -> dict:
    return copy.deepcopy(tiny_params(*idx_source))


def sh(repo: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run a real command (dvc, git, make) in `repo` with this venv first on PATH."""
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@example.com",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@example.com",
        "DVC_NO_ANALYTICS": "1",
    }
    result = subprocess.run(args, cwd=repo, env=env, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def repro(repo: Path) -> list[str]:
    """Run `dvc repro`; return the stages it actually ran, in order."""
    return re.findall(r"Running stage '([^']+)'", sh(repo, "dvc", "repro").stdout)


def write_params(repo: Path, params: dict) -> None:
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def make_project(repo: Path, params: dict) -> Path:
    """A git repo holding a copy of the project (code, dvc.yaml, .dvc/, Makefile), committed."""
    repo.mkdir(parents=True, exist_ok=True)
    shutil.copytree(REPO / "stages", repo / "stages", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / ".dvc", repo / ".dvc", ignore=shutil.ignore_patterns("tmp", "cache", "config.local"))
    for name in ("dvc.yaml", "Makefile", ".gitignore"):
        shutil.copy(REPO / name, repo / name)
    write_params(repo, params)
    sh(repo, "git", "init", "-q", "-b", "main")
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "project")
    return repo


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


def save_wrong_shape_model(path: Path) -> None:
    """A valid Keras model that expects 32×32 inputs: loads fine, must be refused."""
    import keras

    inputs = keras.Input((32, 32))
    keras.Model(inputs, keras.layers.Dense(10)(keras.layers.Flatten()(inputs))).save(path)
