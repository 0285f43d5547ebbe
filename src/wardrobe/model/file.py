"""The model file and inference, defined once: what train saves, what the file records beside the
weights (the test-time views, the class names and image shape, how to fit a photo), and the two
classifiers (Keras and the exported ONNX graph) every reader predicts with.

evaluate, export, predict, the card and the benchmarks all read it through `read_record`, so they
apply the same views and name the same classes, whatever the file. The exported ONNX graph carries
the same record in its metadata (export.finish_onnx), so predict needs nothing else beside it.
TensorFlow, Keras and ONNX Runtime are imported where used: predict's TensorFlow-free install
(`make venv-serve`) imports this module for the ONNX classifier.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from wardrobe.calibration import FeatureDensity, calibrate, unlike_training
from wardrobe.common import DatasetInfo, ImageFile, WardrobeError, complete_text, image_chunks, shape_text
from wardrobe.outputs import SERVING_DISTANCE, SERVING_OUTPUT

# The record in the model file's metadata.json (save_model writes it) and in the ONNX graph's
# metadata_props (export writes it, JSON-encoded values).
FLIP_KEY = "wardrobe_flip_tta"
SHIFT_KEY = "wardrobe_tta_shift"
CLASSES_KEY = "wardrobe_class_names"
PHOTO_FIT_KEY = "wardrobe_photo_fit"
DATASET_KEY = "wardrobe_dataset"
SHAPE_KEY = "wardrobe_image_shape"
EXPORTED_FROM_KEY = "wardrobe_exported_from"  # ONNX only: the SHA-256 of the model file it came from
TEMPERATURE_KEY = "wardrobe_temperature"  # temperature scaling of the averaged probabilities (1: none)
DISTANCE_KEY = "wardrobe_distance_threshold"  # a feature distance beyond it: unlike the training data
# The Keras model file's zip also holds the training features' density (calibration.FeatureDensity)
# the distance is measured with; the exported graphs hold it as constants and output the distance.
DENSITY_ENTRY = "wardrobe_density.npz"
OUTPUT_LAYER = "probabilities"  # model.build_model's last layer; its input is the features the distance measures


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
        return len(self.offsets())


def decide_flip(trained_with_flips: bool, setting: str) -> bool:
    """The one flip policy (train records the decision in the model file).

    auto: mirror-average only models trained with flips; on a model trained without, it costs
    accuracy (measured: -6 points for the mlp). always / never force it.
    """
    return trained_with_flips if setting == "auto" else setting == "always"


@dataclass(frozen=True)
class ModelRecord:
    """What a model file records beside its weights: how to predict with it and what it answers."""

    views: Views
    class_names: tuple[str, ...]
    image_shape: tuple[int, ...]  # height, width; then 3 for RGB
    photo_fit: str  # how wardrobe predict fits a photo to the training images (conf/data: photo_fit)
    dataset: str
    # train fits both on the validation split (wardrobe/calibration.py): every reader of the file
    # applies the temperature to the averaged probabilities, and flags a picture whose feature
    # distance is beyond the threshold. A file from before they existed: 1 and no flag.
    temperature: float = 1.0
    distance_threshold: float | None = None

    def metadata(self) -> dict[str, Any]:
        return {
            FLIP_KEY: self.views.flip,
            SHIFT_KEY: self.views.shift,
            CLASSES_KEY: list(self.class_names),
            SHAPE_KEY: list(self.image_shape),
            PHOTO_FIT_KEY: self.photo_fit,
            DATASET_KEY: self.dataset,
            TEMPERATURE_KEY: self.temperature,
            DISTANCE_KEY: self.distance_threshold,
        }

    def unlike_training(self, distances: np.ndarray) -> np.ndarray:
        """Per image: is its feature distance beyond the threshold?"""
        return unlike_training(distances, self.distance_threshold)


def parse_record(metadata: dict[str, Any], where: Path) -> ModelRecord:
    """The record from a file's metadata; a file without one (saved by a wardrobe from before the
    dataset was a params choice) is refused: its classes are unknown."""
    classes, shape, flip = metadata.get(CLASSES_KEY), metadata.get(SHAPE_KEY), metadata.get(FLIP_KEY)
    if (
        not isinstance(classes, list)
        or len(classes) < 2
        or not all(isinstance(c, str) for c in classes)
        or not isinstance(shape, list)
        or len(shape) not in (2, 3)
        or not all(isinstance(d, int) and d > 0 for d in shape)
        or not isinstance(flip, bool)
    ):
        raise WardrobeError(
            f"{where}: the model file records no class names, image shape or views "
            "(saved by an older wardrobe); retrain it with `dvc repro train`"
        )
    temperature, threshold = metadata.get(TEMPERATURE_KEY, 1.0), metadata.get(DISTANCE_KEY)
    numbers = [temperature] + ([threshold] if threshold is not None else [])
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in numbers) or not (
        temperature > 0 and (threshold is None or threshold >= 0)
    ):
        raise WardrobeError(f"{where}: the model file records a temperature {temperature!r} or threshold {threshold!r}")
    return ModelRecord(
        Views(flip, int(metadata.get(SHIFT_KEY, 0))),
        tuple(classes),
        tuple(shape),
        str(metadata.get(PHOTO_FIT_KEY, "resize")),
        str(metadata.get(DATASET_KEY, "")),
        float(temperature),
        float(threshold) if threshold is not None else None,
    )


def read_record(path: Path) -> ModelRecord:
    """What `path` records; the one reader of a Keras model file's record, with no TensorFlow."""
    try:
        with zipfile.ZipFile(path) as archive:
            metadata = json.loads(archive.read("metadata.json"))
    except FileNotFoundError:
        raise WardrobeError(f"{path}: model file not found; run the train stage first") from None
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as exc:
        raise WardrobeError(f"{path}: cannot read the model's metadata: {complete_text(exc)}") from exc
    return parse_record(metadata, path)


def save_model(model: Any, path: Path, views: Views, dataset: DatasetInfo) -> None:
    """model.save, minus what makes equal models differ in bytes, so DVC's hash of it is stable,
    plus the record every reader of the file needs (read_record): views, class names, photo fit;
    no temperature yet (record_calibration adds it, fitted on the saved model).

    Keras writes the save time into metadata.json, numbers shared objects in config.json by
    their memory address, and dates zip entries with the clock; the weights are already exact.
    The file holds Keras' own layers only (keras_only), so any Keras 3 opens it.
    """
    keras_only(model).save(path)
    write_record(path, ModelRecord(views, dataset.class_names, dataset.image_shape, dataset.photo_fit, dataset.name))


def keras_only(model: Any) -> Any:
    """The trained model with Keras' own layers only, uncompiled: each FusedBatchNormalization (a
    training-speed subclass, layers.py) becomes the BatchNormalization it computes at inference,
    with the same weights, and no optimizer is saved (the file is for predicting; the project's
    optimizers and schedules would need its code to load). Same predictions, bit for bit."""
    import keras

    from wardrobe.model.layers import FusedBatchNormalization

    def clone(layer: Any) -> Any:
        kind = keras.layers.BatchNormalization if type(layer) is FusedBatchNormalization else type(layer)
        return kind.from_config(layer.get_config())

    cloned = keras.models.clone_model(model, clone_function=clone)  # (compiled like the original)
    cloned.set_weights(model.get_weights())
    return keras.Model(cloned.input, cloned.output, name=cloned.name)  # the same layers, uncompiled


def record_calibration(path: Path, temperature: float, density: FeatureDensity, distance_threshold: float) -> None:
    """Write the fitted temperature, the training features' density and the distance threshold
    into a saved model file."""
    record = dataclasses.replace(read_record(path), temperature=temperature, distance_threshold=distance_threshold)
    buffer = io.BytesIO()
    np.savez(buffer, means=density.means, whitening=density.whitening)  # (np.savez's zip entries are undated)
    write_record(path, record, {DENSITY_ENTRY: buffer.getvalue()})


def read_density(path: Path) -> FeatureDensity | None:
    """The training features' density a model file holds (None: a file from before the flag)."""
    try:
        with zipfile.ZipFile(path) as archive:
            if DENSITY_ENTRY not in archive.namelist():
                return None
            with np.load(io.BytesIO(archive.read(DENSITY_ENTRY)), allow_pickle=False) as arrays:
                return FeatureDensity(arrays["means"], arrays["whitening"])
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as exc:
        raise WardrobeError(f"{path}: cannot read {DENSITY_ENTRY}: {complete_text(exc)}") from exc


def write_record(path: Path, record: ModelRecord, extra: dict[str, bytes] | None = None) -> None:
    """Rewrite a saved model file with `record` in its metadata.json, no save date, shared objects
    numbered by order of appearance (renumbering twice changes nothing), and `extra` entries
    (replacing any of the same name)."""
    extra = extra or {}
    with zipfile.ZipFile(path) as archive:
        entries = [(info, archive.read(info)) for info in archive.infolist() if info.filename not in extra]
    entries += [(zipfile.ZipInfo(name), data) for name, data in extra.items()]
    with zipfile.ZipFile(path, "w") as archive:
        for info, data in entries:
            if info.filename == "metadata.json":
                metadata = {k: v for k, v in json.loads(data).items() if k != "date_saved"}
                data = json.dumps({**metadata, **record.metadata()}).encode()
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


def load_model(path: Path, record: ModelRecord | None = None) -> Any:
    """Load a saved Keras model safely (no code from the file) and check it maps N×height×width
    images to the classes its file records."""
    import keras

    import wardrobe.model.layers  # noqa: F401  (registers the project's layers for deserialization)

    record = record or read_record(path)
    try:
        model = keras.models.load_model(path, safe_mode=True)
    except Exception as exc:  # Keras raises many types for a corrupt archive
        raise WardrobeError(f"{path}: cannot load model: {complete_text(exc)}") from exc
    classes = len(record.class_names)
    if tuple(model.input_shape[1:]) != record.image_shape or tuple(model.output_shape[1:]) != (classes,):
        raise WardrobeError(
            f"{path}: model maps {model.input_shape[1:]} to {model.output_shape[1:]}, "
            f"but its file records {record.image_shape} images of {classes} classes"
        )
    return model


def shifted(x: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """N×H×W images moved dy pixels down and dx right, zero-filled (the background is 0)."""
    out = np.zeros_like(x)
    height, width = x.shape[1:3]
    out[:, max(dy, 0) : height + min(dy, 0), max(dx, 0) : width + min(dx, 0)] = x[
        :, max(-dy, 0) : height + min(-dy, 0), max(-dx, 0) : width + min(-dx, 0)
    ]
    return out


def feature_model(model: Any) -> Any:
    """The trained model's last hidden layer (the input of its output layer) beside its output."""
    import keras

    return keras.Model(model.inputs, [model.get_layer(OUTPUT_LAYER).input, model.output])


def feature_chunks(model: Any, x: ImageFile | np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
    """The last hidden layer's values for the unmoved images (what the feature distance measures),
    a batch of x at a time, in order. Batch by batch, not common.image_chunks' 64 MB: train runs it
    over the whole training split, and a chunk of large pictures (with predict's copy of it) raised
    train's peak RSS by ~220 MB over a small split's (tests/test_datasets.py, 64×64 RGB)."""
    features = feature_model(model)  # once: a model per call would retrace its function each time
    for start in range(0, len(x), batch_size):
        yield np.asarray(features.predict_on_batch(np.asarray(x[start : start + batch_size]))[0])


def plain_features(model: Any, x: ImageFile | np.ndarray, batch_size: int) -> np.ndarray:
    """feature_chunks, concatenated: N×features."""
    parts = list(feature_chunks(model, x, batch_size))
    return np.concatenate(parts) if parts else np.zeros((0, model.get_layer(OUTPUT_LAYER).input.shape[-1]), np.float32)


def predict_proba(model: Any, x: ImageFile | np.ndarray, batch_size: int, views: Views) -> np.ndarray:
    """Class probabilities of a Keras model: the mean over the views.

    A chunk of x at a time (a prepared split is read from disk as it goes) and one view at a
    time, so memory holds a chunk, not the split. Each chunk is a whole number of batches: the
    model sees the batches it would see on all of x, and gives the same numbers.
    """
    parts = []
    for chunk in image_chunks(x, batch_size):
        total = None
        for dy, dx, mirror in views.offsets():
            view = shifted(chunk, dy, dx) if dy or dx else chunk
            probs = model.predict(view[:, :, ::-1] if mirror else view, batch_size=batch_size, verbose=0)
            total = probs if total is None else total + probs
        parts.append(total / len(views))
    return np.concatenate(parts) if parts else np.zeros((0, model.output_shape[-1]), np.float32)


class Classifier(Protocol):
    record: ModelRecord

    def predict_proba(self, x: ImageFile | np.ndarray, batch_size: int) -> np.ndarray: ...

    def classify(self, x: ImageFile | np.ndarray, batch_size: int) -> tuple[np.ndarray, np.ndarray]: ...


@dataclass(frozen=True)
class KerasClassifier:
    """A saved Keras model and what its file records."""

    model: Any
    record: ModelRecord
    density: FeatureDensity | None = None

    @property
    def views(self) -> Views:
        return self.record.views

    def classify(self, x: ImageFile | np.ndarray, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        """The calibrated probabilities and the feature distances (what the exported graphs output)."""
        return self.predict_proba(x, batch_size), self.distances(x, batch_size)

    def distances(self, x: ImageFile | np.ndarray, batch_size: int) -> np.ndarray:
        """Per image, the feature distance from the training images (0 for a file without density)."""
        if self.density is None:
            return np.zeros(len(x), np.float32)
        return self.density.distance(plain_features(self.model, x, batch_size)).astype(np.float32)

    def predict_proba(self, x: ImageFile | np.ndarray, batch_size: int) -> np.ndarray:
        """The calibrated probabilities (what the exported graphs compute)."""
        return calibrate(self.predict_uncalibrated(x, batch_size), self.record.temperature)

    def predict_uncalibrated(self, x: ImageFile | np.ndarray, batch_size: int) -> np.ndarray:
        """The views' mean probabilities, before the temperature (evaluate reports both)."""
        return predict_proba(self.model, x, batch_size, self.record.views)


def load_keras_classifier(path: Path) -> KerasClassifier:
    record = read_record(path)
    return KerasClassifier(load_model(path, record), record, read_density(path))


@dataclass(frozen=True)
class OnnxClassifier:
    """The exported ONNX graph: the views, the temperature and the feature distance are inside it
    and the record in its metadata, so this is the whole model."""

    session: Any  # onnxruntime.InferenceSession
    record: ModelRecord
    exported_from: str = ""  # SHA-256 of the Keras model file export converted ("" if unrecorded)

    def predict_proba(self, x: ImageFile | np.ndarray, batch_size: int) -> np.ndarray:
        return self._run([SERVING_OUTPUT], x, batch_size)[0]

    def classify(self, x: ImageFile | np.ndarray, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        probs, distances = self._run([SERVING_OUTPUT, SERVING_DISTANCE], x, batch_size)
        return probs, distances

    def _run(self, outputs: list[str], x: ImageFile | np.ndarray, batch_size: int) -> list[np.ndarray]:
        name = self.session.get_inputs()[0].name
        batches = [self.session.run(outputs, {name: x[i : i + batch_size]}) for i in range(0, len(x), batch_size)]
        return [np.concatenate([batch[k] for batch in batches]) for k in range(len(outputs))]


def load_onnx_classifier(path: Path, *, spinning: bool = True) -> OnnxClassifier:
    """Open an exported model with ONNX Runtime; check it maps N×height×width floats to the
    classes its metadata records. `spinning=False` lets ONNX Runtime's threads sleep between calls
    instead of spinning for the next one: a server's event loop needs those cycles (+14 % requests/s
    at 32 connections on 2 cores, docs/benchmarks.md)."""
    if not path.is_file():
        raise WardrobeError(f"{path}: ONNX model not found; run `dvc repro export` (or dvc pull) first")
    try:
        import onnxruntime
    except ImportError:
        raise WardrobeError(f"{path}: onnxruntime is not installed: pip install 'onnxruntime<2'") from None
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # errors only: its warnings would bury our one-line errors
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ONNX Runtime raises its own types for corrupt or invalid files
        raise WardrobeError(f"{path}: cannot load ONNX model: {complete_text(exc)}") from exc
    try:
        metadata = {k: json.loads(v) for k, v in session.get_modelmeta().custom_metadata_map.items()}
    except ValueError as exc:
        raise WardrobeError(f"{path}: unreadable metadata: {exc}") from None
    record = parse_record(metadata, path)
    inputs, outputs = session.get_inputs(), session.get_outputs()
    classes = len(record.class_names)
    shapes = {output.name: list(output.shape[1:]) for output in outputs}
    if (
        len(inputs) != 1
        or inputs[0].type != "tensor(float)"
        or list(inputs[0].shape[1:]) != list(record.image_shape)
        or shapes != {SERVING_OUTPUT: [classes], SERVING_DISTANCE: []}
    ):
        found = (
            ", ".join(f"{i.name} {i.type} {i.shape}" for i in inputs)
            + " → "
            + ", ".join(f"{o.name} {o.shape}" for o in outputs)
        )
        shape = shape_text(record.image_shape)
        raise WardrobeError(
            f"{path}: ONNX model maps {found}, expected float N×{shape} to {SERVING_OUTPUT} N×{classes} "
            f"and {SERVING_DISTANCE} N (re-export it: `dvc repro export`)"
        )
    return OnnxClassifier(session, record, str(metadata.get(EXPORTED_FROM_KEY, "")))


def onnx_metadata(record: ModelRecord, source_sha256: str) -> dict[str, str]:
    """The ONNX file's metadata_props (JSON values): the record, and the SHA-256 of the model file
    it was exported from."""
    return {key: json.dumps(value) for key, value in {**record.metadata(), EXPORTED_FROM_KEY: source_sha256}.items()}


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file's bytes (export records the model file's in the ONNX file)."""
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
