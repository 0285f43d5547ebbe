"""Things every stage shares, defined once: paths, class names, errors, atomic writes, seeding."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

CLASS_NAMES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
NUM_CLASSES = len(CLASS_NAMES)
IMAGE_SHAPE = (28, 28)

PREPARED_DIR = Path("data/prepared")
MODEL_PATH = Path("data/model/model.keras")
METRICS_PATH = Path("metrics/metrics.json")
HISTORY_CSV = Path("plots/train_history.csv")
CONFUSION_CSV = Path("plots/confusion.csv")
PER_CLASS_CSV = Path("plots/per_class.csv")
CURVES_PNG = Path("plots/training_curves.png")
CONFUSION_PNG = Path("plots/confusion_matrix.png")
PREDICTIONS_PNG = Path("plots/predictions.png")

SPLITS = ("train", "val", "test")


class WardrobeError(Exception):
    """A user-facing problem (bad params, bad data, missing file): reported as one line."""


def load_split(prepared_dir: Path, split: str, mmap: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Load one prepared split; `mmap` keeps the big image array on disk until it is read."""
    x_path, y_path = prepared_dir / f"x_{split}.npy", prepared_dir / f"y_{split}.npy"
    try:
        x = np.load(x_path, mmap_mode="r" if mmap else None, allow_pickle=False)
        y = np.load(y_path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise WardrobeError(f"{x_path.parent}: cannot load split {split!r}: {exc}") from exc
    if x.shape[1:] != IMAGE_SHAPE or x.dtype != np.float32 or y.shape != (x.shape[0],):
        raise WardrobeError(
            f"{x_path}: expected N×28×28 float32 with {x.shape[0]} labels, got {x.shape} {x.dtype} and labels {y.shape}"
        )
    return x, y


@contextlib.contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temp path beside `target`; on success fsync and rename it over `target`.

    A failure leaves `target` (and any earlier result in it) untouched and removes the temp file.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    prefix, suffix = f".{target.name}.", ".tmp" + target.suffix
    for stale in target.parent.glob(f"{prefix}*{suffix}"):  # left by a killed run
        stale.unlink(missing_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=prefix, suffix=suffix)
    os.close(fd)
    tmp = Path(tmp_name)
    tmp.chmod(0o644)  # mkstemp makes 0600; results are meant to be read by everyone
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(target: Path, text: str) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(target: Path, data: Any) -> None:
    write_text_atomic(target, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def load_model(path: Path) -> Any:
    """Load a saved Keras model safely (no code from the file) and check it maps 28×28 to 10 classes."""
    import keras

    if not path.is_file():
        raise WardrobeError(f"{path}: model file not found; run the train stage first")
    try:
        model = keras.models.load_model(path, safe_mode=True)
    except Exception as exc:  # Keras raises many types for a corrupt archive
        raise WardrobeError(f"{path}: cannot load model: {' '.join(str(exc).split())[:200]}") from exc
    if tuple(model.input_shape[1:]) != IMAGE_SHAPE or tuple(model.output_shape[1:]) != (NUM_CLASSES,):
        raise WardrobeError(
            f"{path}: model maps {model.input_shape[1:]} to {model.output_shape[1:]}, expected 28×28 to 10 classes"
        )
    return model


def wants_flip_tta(model: Any, setting: str) -> bool:
    """auto: average over mirrored images only for models trained with flips (they contain a
    RandomFlip layer); on a model trained without, flip-TTA costs accuracy (measured: -6 points
    for the mlp)."""
    if setting == "auto":
        import keras

        return any(isinstance(layer, keras.layers.RandomFlip) for layer in model.layers)
    return setting == "always"


def predict_proba(model: Any, x: np.ndarray, batch_size: int, flip_tta: bool) -> np.ndarray:
    """Class probabilities; with flip_tta, the mean over each image and its left-right mirror."""
    probs = model.predict(x, batch_size=batch_size, verbose=0)
    if flip_tta:
        probs = (probs + model.predict(x[:, :, ::-1], batch_size=batch_size, verbose=0)) / 2
    return probs


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and TensorFlow, and make TF ops deterministic: same inputs, same bits."""
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()


def find_tool(name: str) -> str:
    """The `name` command installed next to the running Python (the venv's dvc), else on PATH.

    So `.venv/bin/python -m stages.validate` works without activating the venv.
    """
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise WardrobeError(
            f"{name}: command not found next to {sys.executable} or on PATH; install the project (make venv)"
        )
    return found


def run_main(body: Callable[[], None]) -> None:
    """Run a stage body: a WardrobeError becomes one line on stderr and exit status 1.

    Set WARDROBE_DEBUG=1 to see the full traceback instead.
    """
    try:
        body()
    except WardrobeError as exc:
        if os.environ.get("WARDROBE_DEBUG"):
            raise
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
