"""How the "unlike the training data" flag behaves on real pictures of another kind (issue #36).

    python -m bench.trust        (part of `make bench`; needs `dvc repro` first, and PyPI)

The committed model through the exported ONNX graph, as wardrobe predict runs it, on:
- the test images (what the threshold was chosen to let through: 95 % of validation);
- the scrambled test images evaluate reports (metrics/metrics.json's ood_rejected);
- scikit-learn's 1,797 handwritten digits (UCI's, 8×8, scaled to 20×20 and centred on 28×28 black,
  as MNIST's digits are: light strokes on black, Fashion-MNIST's look), taken from the
  scikit-learn wheel, which `pip download` fetches from PyPI (nothing is installed);
- the wheel's two photographs (a temple in China, a flower), fitted as predict fits any photo.
For each: images, the share flagged (the feature distance beyond the model file's threshold), the
share the top probability alone would flag at the same 95 % validation acceptance (the score tried
first), the mean top probability, and the AUROC of each score between the test images and the set.
"""

from __future__ import annotations

import csv
import gzip
import io
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

from wardrobe.calibration import auroc, scrambled
from wardrobe.cli.predict import to_training_format
from wardrobe.common import load_split
from wardrobe.model.file import load_onnx_classifier
from wardrobe.outputs import ONNX_PATH, PREPARED_DIR

WHEEL = "scikit-learn"


def sklearn_wheel(directory: Path) -> zipfile.ZipFile:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary",
            ":all:",
            "-q",
            "-d",
            str(directory),
            WHEEL,
        ],
        check=True,
    )
    return zipfile.ZipFile(next(directory.glob("scikit_learn-*.whl")))


def digits(wheel: zipfile.ZipFile) -> np.ndarray:
    """The 1,797 8×8 digits (0..16) as 28×28 floats in [0, 1]: 20×20 strokes centred on black."""
    with gzip.open(wheel.open("sklearn/datasets/data/digits.csv.gz")) as stream:
        rows = list(csv.reader(io.TextIOWrapper(stream)))
    pixels = np.array([[float(v) for v in row[:64]] for row in rows]).reshape(-1, 8, 8) / 16.0
    out = np.zeros((len(pixels), 28, 28), np.float32)
    for k, image in enumerate(pixels):
        big = Image.fromarray((image * 255).astype(np.uint8)).resize((20, 20), Image.Resampling.LANCZOS)
        out[k, 4:24, 4:24] = np.asarray(big, np.float32) / 255.0
    return out


def photos(wheel: zipfile.ZipFile) -> np.ndarray:
    images = []
    for name in ("china.jpg", "flower.jpg"):
        with Image.open(wheel.open(f"sklearn/datasets/images/{name}")) as photo:
            gray = np.asarray(photo.convert("L"))
        images.append(to_training_format(gray, (28, 28), "object"))
    return np.stack(images)


def main() -> None:
    classifier = load_onnx_classifier(ONNX_PATH)
    threshold = classifier.record.distance_threshold
    x_test, _ = load_split(PREPARED_DIR, "test")
    x_val, _ = load_split(PREPARED_DIR, "val")
    # the top probability's own threshold, chosen as the distance's was: 95 % of validation pass
    top_threshold = np.quantile(classifier.predict_proba(x_val, 500).max(axis=1), 0.05, method="lower")
    with tempfile.TemporaryDirectory() as tmp:
        wheel = sklearn_wheel(Path(tmp))
        images = {
            "Fashion-MNIST test images": x_test,
            "the same, pixels scrambled (evaluate's set)": scrambled(x_test[:2000]),
            "handwritten digits (scikit-learn's 1,797)": digits(wheel),
            "photographs (scikit-learn's 2)": photos(wheel),
        }
    sets = {name: classifier.classify(x, 500) for name, x in images.items()}
    test_probs, test_distances = sets["Fashion-MNIST test images"]
    print(
        f"Distance threshold {threshold:.4g}, top-probability threshold {top_threshold:.4f} (each: 95 % of the "
        "validation images pass); ONNX model\n"
    )
    print(
        "| pictures | images | flagged (distance) | flagged (top probability) | mean top probability "
        "| AUROC distance | AUROC top probability |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, (probs, distances) in sets.items():
        top = probs.max(axis=1)
        inside = distances is test_distances
        separation = (
            "— | —"
            if inside
            else f"{auroc(-test_distances, -distances):.3f} | {auroc(test_probs.max(axis=1), top):.3f}"
        )
        print(
            f"| {name} | {len(top):,} | {np.mean(distances > threshold):.1%} | {np.mean(top < top_threshold):.1%} "
            f"| {top.mean():.3f} | {separation} |"
        )


if __name__ == "__main__":
    main()
