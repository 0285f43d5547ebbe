"""predict: classify your own images with the trained model.

    wardrobe predict PATH... [--model M] [--runtime auto|keras|onnx] [--top-k K] [--json] [--batch-size B]
    wardrobe predict PATH...

Two runtimes give the same answers: keras (data/model/model.keras, TensorFlow) and onnx
(data/export/model.onnx from the export stage, ONNX Runtime only: TensorFlow is never imported,
so it starts in a fraction of the time and installs without it). auto picks the format of
--model; without one, onnx where the exported file was made from the current model file (export
records its SHA-256) or TensorFlow is not installed, else keras. The default files are looked up
in the current folder, then its parents, then the project this package was installed from.

PATHs are image files (PNG/JPEG/BMP/GIF), folders of them, or .npy arrays (N×H×W or H×W in the
model's image shape, uint8 0..255 or float 0..1). The model file records its class names, image
shape and how to fit a photo to it (conf/data `photo_fit`): Fashion-MNIST's `object` inverts a light
background and crops to the garment, `resize` only resizes. Every input is checked before any
prediction: one bad file is a one-line error naming it, and nothing is printed for the others.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from wardrobe.cli import OneLineParser
from wardrobe.common import WardrobeError, complete_text, run_main, shape_text
from wardrobe.data.images import IMAGE_SUFFIXES, decode_image, resize
from wardrobe.model.file import (
    Classifier,
    ModelRecord,
    OnnxClassifier,
    file_sha256,
    load_keras_classifier,
    load_onnx_classifier,
    read_record,
)
from wardrobe.outputs import MODEL_PATH, ONNX_PATH

# Pixels at most this dark (0..255) count as background when finding the object's bounding box.
BACKGROUND_LEVEL = 24
# An input whose pixels span less than this after preprocessing (0..1) carries no picture: an
# all-black image, a blank page, a transparent PNG. The model still answers; the output says blank.
BLANK_RANGE = 8 / 255
SOURCE_PROJECT = Path(__file__).resolve().parents[3]  # where an editable install (make venv) lives


@dataclass(frozen=True)
class Item:
    """One image to classify: where it came from and its H×W float32 pixels in [0, 1]."""

    label: str
    pixels: np.ndarray

    @property
    def blank(self) -> bool:
        return float(self.pixels.max() - self.pixels.min()) < BLANK_RANGE


def to_training_format(gray: np.ndarray, shape: tuple[int, int], photo_fit: str = "object") -> np.ndarray:
    """Fit a grayscale picture to the training images' `shape`, as the model file says (`photo_fit`).

    object (Fashion-MNIST's look: a light object on black): a light background (product photos)
    is inverted, the object's bounding box scaled so its longer side fills the frame and centered,
    as Fashion-MNIST's own conversion did; images already of `shape` on a dark background are used
    unchanged. resize: the whole picture resized to `shape`, nothing else.
    """
    if photo_fit == "resize":
        return resize(gray, shape).astype(np.float32) / 255.0
    border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
    if border.mean() > 127:
        gray = 255 - gray
    if gray.shape == shape:
        return gray.astype(np.float32) / 255.0
    rows, cols = np.nonzero(gray > BACKGROUND_LEVEL)
    if len(rows):
        gray = gray[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    height, width = gray.shape
    scale = min(shape[0] / height, shape[1] / width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    resized = np.asarray(Image.fromarray(gray).resize(size, Image.Resampling.LANCZOS))
    canvas = np.zeros(shape, dtype=np.uint8)
    top, left = (shape[0] - size[1]) // 2, (shape[1] - size[0]) // 2
    canvas[top : top + size[1], left : left + size[0]] = resized
    return canvas.astype(np.float32) / 255.0


def load_image(path: Path, record: ModelRecord, data: bytes | None = None) -> np.ndarray:
    """Decode one image file (first frame; `data`: its bytes, already read) to the model's image
    shape; bad files raise WardrobeError."""
    height, width, *channels = record.image_shape
    if channels:  # RGB: a plain resize (the object fit is for grayscale on black)
        return resize(decode_image(path, 3, data), (height, width)).astype(np.float32) / 255.0
    return to_training_format(decode_image(path, 1, data), (height, width), record.photo_fit)


def load_array(path: Path, shape: tuple[int, ...]) -> np.ndarray:
    """A .npy of images of `shape`; uint8 means 0..255, floats must already be in [0, 1]."""
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise WardrobeError(f"{path}: not a readable .npy array ({complete_text(exc)})") from exc
    if array.shape == shape:
        array = array[None]
    if array.shape[1:] != shape or len(array) == 0:
        one = shape_text(shape)
        raise WardrobeError(f"{path}: expected shape N×{one} or {one}, got {array.shape}")
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 255.0
    if not np.issubdtype(array.dtype, np.floating):
        raise WardrobeError(f"{path}: expected uint8 or float pixels, got {array.dtype}")
    if not np.all(np.isfinite(array)) or array.min() < 0 or array.max() > 1:
        raise WardrobeError(f"{path}: float pixels must be finite and in [0, 1]")
    return array.astype(np.float32)


def collect(paths: list[Path], record: ModelRecord) -> list[Item]:
    """Expand folders, load everything; the first bad input raises, naming it."""
    items: list[Item] = []
    for path in paths:
        if path.is_dir():
            try:
                files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES | {".npy"})
            except OSError as exc:
                raise WardrobeError(f"{path}: cannot list folder: {exc.strerror}") from exc
            if not files:
                raise WardrobeError(f"{path}: folder has no images ({', '.join(sorted(IMAGE_SUFFIXES))}, .npy)")
            items += collect(files, record)
        elif not path.exists():
            raise WardrobeError(f"{path}: no such file or folder")
        elif path.suffix.lower() == ".npy":
            array = load_array(path, record.image_shape)
            items += [Item(f"{path}[{i}]", pixels) for i, pixels in enumerate(array)]
        else:
            if path.stat().st_size == 0:
                raise WardrobeError(f"{path}: empty file")
            items.append(Item(str(path), load_image(path, record)))
    return items


def top_k(probs: np.ndarray, k: int, class_names: tuple[str, ...]) -> list[list[tuple[str, float]]]:
    """Per row, the k most likely classes with their probabilities, most likely first."""
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return [[(class_names[j], float(row[j])) for j in idx] for row, idx in zip(probs, order, strict=True)]


def project_file(relative: Path) -> Path:
    """A pipeline output where the user means it: in the current folder or the nearest parent that
    has it, else in the project this package was installed from (make venv's editable install)."""
    here = Path.cwd()
    for folder in (here, *here.parents):
        if (folder / relative).exists():
            return relative if folder == here else folder / relative
    if (SOURCE_PROJECT / relative).exists():
        return SOURCE_PROJECT / relative
    raise WardrobeError(
        f"{relative}: not found in {here}, its parents or {SOURCE_PROJECT}; "
        "run the pipeline (dvc repro) or give the file with --model"
    )


def exported_from_current_model() -> OnnxClassifier | None:
    """The exported ONNX model if it was made from the current Keras model file (the SHA-256 export
    recorded matches): the same answers (export's parity check), in a fraction of the time."""
    try:
        keras_file, onnx_file = project_file(MODEL_PATH), project_file(ONNX_PATH)
        classifier = load_onnx_classifier(onnx_file)
    except WardrobeError:  # no exported file, or not loadable: keras answers
        return None
    return classifier if classifier.exported_from == file_sha256(keras_file) else None


def choose_runtime(runtime: str, model: Path | None) -> tuple[str, Classifier | None]:
    """The runtime, and its classifier if choosing loaded it. auto: the format of --model if given;
    else onnx where the exported file matches the model file or TensorFlow is not installed."""
    if runtime != "auto":
        return runtime, None
    if model is not None:
        return ("onnx" if model.suffix.lower() == ".onnx" else "keras"), None
    if not importlib.util.find_spec("tensorflow"):
        return "onnx", None
    exported = exported_from_current_model()
    return ("onnx", exported) if exported else ("keras", None)


def load(runtime: str, model: Path | None) -> Classifier:
    if runtime == "onnx":
        return load_onnx_classifier(model or project_file(ONNX_PATH))
    if not importlib.util.find_spec("tensorflow"):
        raise WardrobeError(
            f"TensorFlow is not installed, so --runtime keras cannot run; use --runtime onnx ({ONNX_PATH})"
        )
    return load_keras_classifier(model or project_file(MODEL_PATH))


def predict(classifier: Classifier, items: list[Item], batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities as evaluate computes them (the test-time augmentation and temperature the model
    file records), and each picture's feature distance from the training images."""
    pixels = np.stack([item.pixels for item in items])
    return classifier.classify(pixels, batch_size)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = OneLineParser(prog="wardrobe predict", description="Classify images with the trained model.")
    parser.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="image files, folders, .npy arrays")
    parser.add_argument(
        "--model", type=Path, help=f"model file (default: {MODEL_PATH} for keras, {ONNX_PATH} for onnx)"
    )
    parser.add_argument(
        "--runtime",
        choices=("auto", "keras", "onnx"),
        default="auto",
        help="auto (default): the format of --model; without one, onnx if the exported file matches the model"
        " file or TensorFlow is not installed, else keras",
    )
    parser.add_argument("--top-k", type=int, default=1, help="classes to show per image (default 1)")
    parser.add_argument("--json", action="store_true", help="one JSON object per input line")
    parser.add_argument("--batch-size", type=int, default=256, help="images per model call (default 256)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    args = parser.parse_args(argv)
    if args.top_k < 1:
        parser.error(f"--top-k must be >= 1, got {args.top_k}")
    if args.batch_size < 1:
        parser.error(f"--batch-size must be >= 1, got {args.batch_size}")
    return args


def answer(best: list[tuple[str, float]], blank: bool, unlike: bool, distance: float) -> dict:
    """One picture's answer as --json prints it and `wardrobe serve` returns it."""
    return {
        "top_k": [{"class": c, "probability": round(p, 6)} for c, p in best],
        "blank": blank,
        "unlike_training": unlike,
        "distance": round(distance, 4),
    }


BLANK_NOTE = "  [blank: nothing left to classify after preprocessing; the answer means nothing]"


def unlike_note(distance: float, threshold: float | None) -> str:
    """The human line's flag for a picture unlike the training data (calibration.unlike_training)."""
    return (
        f"  [unlike the training data: its features are {distance:.1f} from the training images' "
        f"(over {threshold:.1f}); the class may be wrong]"
    )


def run(args: argparse.Namespace) -> None:
    runtime, classifier = choose_runtime(args.runtime, args.model)
    # The inputs are checked before the model loads: a Keras file's record needs no TensorFlow.
    if runtime == "onnx" and classifier is None:
        classifier = load(runtime, args.model)
    record = classifier.record if classifier else read_record(args.model or project_file(MODEL_PATH))
    names = record.class_names
    if args.top_k > len(names):
        raise WardrobeError(f"--top-k {args.top_k}: the model knows {len(names)} classes")
    items = collect(args.paths, record)
    classifier = classifier or load(runtime, args.model)
    probs, distances = predict(classifier, items, args.batch_size)
    unlike = record.unlike_training(distances)
    answers = zip(items, top_k(probs, args.top_k, names), distances.tolist(), unlike.tolist(), strict=True)
    for item, best, distance, strange in answers:
        if args.json:
            print(json.dumps({"path": item.label, **answer(best, item.blank, strange, distance)}))
        else:
            note = BLANK_NOTE if item.blank else unlike_note(distance, record.distance_threshold) if strange else ""
            print(f"{item.label}: " + ", ".join(f"{c} ({p:.3f})" for c, p in best) + note)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    run_main(lambda: run(args), debug=args.debug)
