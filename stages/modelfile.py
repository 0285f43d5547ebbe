"""The model file and inference, defined once: what train saves, the test-time views the file
records, and the two classifiers (Keras and the exported ONNX graph) every reader predicts with.

evaluate, export, predict, the card and the benchmarks all read the views through `read_views`,
so they apply the same ones, whatever the file (one from before the views were recorded included).
TensorFlow, Keras and ONNX Runtime are imported where used: predict's TensorFlow-free install
(`make venv-serve`) imports this module for the ONNX classifier.
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from stages.common import IMAGE_SHAPE, NUM_CLASSES, WardrobeError

# The test-time views in the model file's metadata.json (save_model writes them).
FLIP_KEY = "wardrobe_flip_tta"
SHIFT_KEY = "wardrobe_tta_shift"


@dataclass(frozen=True)
class Views:
    """The test-time views of a model: the image, moved ±shift px on each axis, each also mirrored
    when flip. Predictions are the mean over them."""

    flip: bool
    shift: int = 0

    def offsets(self) -> list[tuple[int, int, bool]]:
        """(dy, dx, mirrored) of every view, the unmoved image first."""
        moves = [(0, 0)] + ([(s, 0), (-s, 0), (0, s), (0, -s)] if (s := self.shift) else [])
        return [(dy, dx, mirror) for dy, dx in moves for mirror in ((False, True) if self.flip else (False,))]

    def __len__(self) -> int:
        return (5 if self.shift else 1) * (2 if self.flip else 1)


def decide_flip(trained_with_flips: bool, setting: str) -> bool:
    """The one flip policy (train records the decision in the model file).

    auto: mirror-average only models trained with flips; on a model trained without, it costs
    accuracy (measured: -6 points for the mlp). always / never force it.
    """
    return trained_with_flips if setting == "auto" else setting == "always"


def _has_class(config: Any, class_name: str) -> bool:
    if isinstance(config, dict):
        return config.get("class_name") == class_name or any(_has_class(v, class_name) for v in config.values())
    if isinstance(config, list):
        return any(_has_class(v, class_name) for v in config)
    return False


def read_views(path: Path) -> Views:
    """The views `path` records; the one reader, with no TensorFlow.

    A file from before train recorded the flip decision gets the `auto` rule: those models were
    trained with flips exactly when they hold a RandomFlip layer (flips were a layer then).
    """
    try:
        with zipfile.ZipFile(path) as archive:
            metadata = json.loads(archive.read("metadata.json"))
            flip = metadata.get(FLIP_KEY)
            if flip is None:
                flip = decide_flip(_has_class(json.loads(archive.read("config.json")), "RandomFlip"), "auto")
    except FileNotFoundError:
        raise WardrobeError(f"{path}: model file not found; run the train stage first") from None
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as exc:
        raise WardrobeError(f"{path}: cannot read the model's metadata: {' '.join(str(exc).split())[:200]}") from exc
    return Views(bool(flip), int(metadata.get(SHIFT_KEY, 0)))


def save_model(model: Any, path: Path, views: Views) -> None:
    """model.save, minus what makes equal models differ in bytes, so DVC's hash of it is stable,
    plus the views every reader of the file must apply (read_views).

    Keras writes the save time into metadata.json, numbers shared objects in config.json by
    their memory address, and dates zip entries with the clock; the weights are already exact.
    """
    model.save(path)
    with zipfile.ZipFile(path) as archive:
        entries = [(info, archive.read(info)) for info in archive.infolist()]
    with zipfile.ZipFile(path, "w") as archive:
        for info, data in entries:
            if info.filename == "metadata.json":
                metadata = {k: v for k, v in json.loads(data).items() if k != "date_saved"}
                data = json.dumps({**metadata, FLIP_KEY: views.flip, SHIFT_KEY: views.shift}).encode()
            elif info.filename == "config.json":
                data = json.dumps(renumber_shared_objects(json.loads(data), {})).encode()
            archive.writestr(zipfile.ZipInfo(info.filename), data, compress_type=info.compress_type)


def renumber_shared_objects(config: Any, numbers: dict[int, int]) -> Any:
    """Replace each `shared_object_id` (an id() in Keras) by its order of first appearance."""
    if isinstance(config, dict):
        return {
            key: numbers.setdefault(value, len(numbers) + 1)
            if key == "shared_object_id"
            else renumber_shared_objects(value, numbers)
            for key, value in config.items()
        }
    if isinstance(config, list):
        return [renumber_shared_objects(value, numbers) for value in config]
    return config


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


def shifted(x: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """N×H×W images moved dy pixels down and dx right, zero-filled (the background is 0)."""
    out = np.zeros_like(x)
    height, width = x.shape[1:]
    out[:, max(dy, 0) : height + min(dy, 0), max(dx, 0) : width + min(dx, 0)] = x[
        :, max(-dy, 0) : height + min(-dy, 0), max(-dx, 0) : width + min(-dx, 0)
    ]
    return out


def predict_proba(model: Any, x: np.ndarray, batch_size: int, views: Views) -> np.ndarray:
    """Class probabilities of a Keras model: the mean over the views.

    One view at a time, so memory stays at one copy of x however many views there are.
    """
    total = None
    for dy, dx, mirror in views.offsets():
        view = shifted(x, dy, dx) if dy or dx else x
        probs = model.predict(view[:, :, ::-1] if mirror else view, batch_size=batch_size, verbose=0)
        total = probs if total is None else total + probs
    return total / len(views)


class Classifier(Protocol):
    def predict_proba(self, x: np.ndarray, batch_size: int) -> np.ndarray: ...


@dataclass(frozen=True)
class KerasClassifier:
    """A saved Keras model and the views its file records."""

    model: Any
    views: Views

    def predict_proba(self, x: np.ndarray, batch_size: int) -> np.ndarray:
        return predict_proba(self.model, x, batch_size, self.views)


def load_keras_classifier(path: Path) -> KerasClassifier:
    return KerasClassifier(load_model(path), read_views(path))


@dataclass(frozen=True)
class OnnxClassifier:
    """The exported ONNX graph: the views are inside it, so this is the whole model."""

    session: Any  # onnxruntime.InferenceSession

    def predict_proba(self, x: np.ndarray, batch_size: int) -> np.ndarray:
        name = self.session.get_inputs()[0].name
        batches = [self.session.run(None, {name: x[i : i + batch_size]})[0] for i in range(0, len(x), batch_size)]
        return np.concatenate(batches)


def load_onnx_classifier(path: Path) -> OnnxClassifier:
    """Open an exported model with ONNX Runtime and check it maps N×28×28 floats to 10 classes."""
    if not path.is_file():
        raise WardrobeError(f"{path}: ONNX model not found; run `dvc repro export` (or dvc pull) first")
    try:
        import onnxruntime
    except ImportError:
        raise WardrobeError(f"{path}: onnxruntime is not installed: pip install 'onnxruntime<2'") from None
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # errors only: its warnings would bury our one-line errors
    try:
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ONNX Runtime raises its own types for corrupt or invalid files
        raise WardrobeError(f"{path}: cannot load ONNX model: {' '.join(str(exc).split())[:200]}") from exc
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if (
        len(inputs) != 1
        or inputs[0].type != "tensor(float)"
        or list(inputs[0].shape[1:]) != list(IMAGE_SHAPE)
        or len(outputs) != 1
        or list(outputs[0].shape[1:]) != [NUM_CLASSES]
    ):
        found = (
            ", ".join(f"{i.name} {i.type} {i.shape}" for i in inputs) + " → " + ", ".join(str(o.shape) for o in outputs)
        )
        raise WardrobeError(f"{path}: ONNX model maps {found}, expected float N×28×28 to N×10")
    return OnnxClassifier(session)
