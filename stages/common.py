"""Things every stage shares, defined once: class names, errors, atomic writes, loading, seeding.

Output paths and their contents are defined in stages/outputs.py."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
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


# Test-time augmentation in the model file's metadata.json, written by train (save_model).
FLIP_TTA_KEY = "wardrobe_flip_tta"
SHIFT_TTA_KEY = "wardrobe_tta_shift"


def load_model(path: Path) -> Any:
    """Load a saved Keras model safely (no code from the file) and check it maps 28×28 to 10 classes."""
    import keras

    import stages.layers  # noqa: F401  (registers the project's layers for deserialization)

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


def decide_flip_tta(trained_with_flips: bool, setting: str) -> bool:
    """The one test-time-augmentation policy (train records the decision in the model file).

    auto: average over mirrored images only for models trained with flips; on a model trained
    without, flip-TTA costs accuracy (measured: -6 points for the mlp). always / never force it.
    """
    return trained_with_flips if setting == "auto" else setting == "always"


def has_flip_layer(model: Any) -> bool:
    """Whether a model file from before train recorded flip-TTA was trained with flips: those
    models flipped with a RandomFlip layer inside (flips now happen in the input pipeline)."""
    import keras

    return any(isinstance(layer, keras.layers.RandomFlip) for layer in model.layers)


@dataclass(frozen=True)
class Classifier:
    """A saved model and the test-time augmentation its file records: what evaluate, predict and
    the benchmarks all predict with, so they agree without params.yaml."""

    model: Any
    flip_tta: bool
    tta_shift: int = 0

    def predict_proba(self, x: np.ndarray, batch_size: int) -> np.ndarray:
        return predict_proba(self.model, x, batch_size, self.flip_tta, self.tta_shift)


def load_classifier(path: Path) -> Classifier:
    model = load_model(path)
    with zipfile.ZipFile(path) as archive:
        metadata = json.loads(archive.read("metadata.json"))
    recorded = metadata.get(FLIP_TTA_KEY)
    flip = decide_flip_tta(has_flip_layer(model), "auto") if recorded is None else bool(recorded)
    return Classifier(model, flip, int(metadata.get(SHIFT_TTA_KEY, 0)))


def shifted(x: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """N×H×W images moved dy pixels down and dx right, zero-filled (the background is 0)."""
    out = np.zeros_like(x)
    height, width = x.shape[1:]
    out[:, max(dy, 0) : height + min(dy, 0), max(dx, 0) : width + min(dx, 0)] = x[
        :, max(-dy, 0) : height + min(-dy, 0), max(-dx, 0) : width + min(-dx, 0)
    ]
    return out


def tta_views(flip: bool, shift: int) -> list[tuple[int, int, bool]]:
    """(dy, dx, mirrored) of every view: the image, ±shift px on each axis, each also mirrored."""
    offsets = [(0, 0)] + ([(shift, 0), (-shift, 0), (0, shift), (0, -shift)] if shift else [])
    return [(dy, dx, mirror) for dy, dx in offsets for mirror in ((False, True) if flip else (False,))]


def predict_proba(model: Any, x: np.ndarray, batch_size: int, flip_tta: bool, tta_shift: int = 0) -> np.ndarray:
    """Class probabilities: the mean over the views of tta_views (just the image when both are off).

    One view at a time, so memory stays at one copy of x however many views there are.
    """
    total = None
    views = tta_views(flip_tta, tta_shift)
    for dy, dx, mirror in views:
        view = shifted(x, dy, dx) if dy or dx else x
        probs = model.predict(view[:, :, ::-1] if mirror else view, batch_size=batch_size, verbose=0)
        total = probs if total is None else total + probs
    return total / len(views)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and TensorFlow (and so Keras' initializers, dropout and augmentation)."""
    import keras

    keras.utils.set_random_seed(seed)


def enable_determinism() -> None:
    """Make TensorFlow ops deterministic: same inputs, same bits (a little slower).

    Process-wide and one-way (TensorFlow has no public switch back), so only entry points call
    it: `python -m stages.train`, and the tests and benchmarks that compare bits, by name.
    """
    import tensorflow as tf

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


def run_main(body: Callable[[], None], debug: bool = False) -> None:
    """The one entry-point wrapper: a WardrobeError becomes one line on stderr and exit status 1.

    WARDROBE_DEBUG=1 (any command) or `debug` (predict's --debug) shows the full traceback instead.
    """
    try:
        body()
    except WardrobeError as exc:
        if debug or os.environ.get("WARDROBE_DEBUG"):
            raise
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
