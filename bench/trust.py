"""How the "unlike the training data" flag behaves on real pictures of another kind (issue #36).

    python -m bench.trust        (part of `make bench`; needs `dvc repro` first, and PyPI)

The committed model through the exported ONNX graph, as wardrobe-predict runs it, on:
- the test images (what the threshold was chosen to let through: 95 % of validation);
- the scrambled test images evaluate reports (metrics/metrics.json's ood_rejected);
- scikit-learn's 1,797 handwritten digits (UCI's, 8×8, scaled to 20×20 and centred on 28×28 black,
  as MNIST's digits are: light strokes on black, Fashion-MNIST's look), taken from the
  scikit-learn wheel, which `pip download` fetches from PyPI (nothing is installed);
- the wheel's two photographs (a temple in China, a flower), fitted as predict fits any photo.
For each: images, the share flagged, the mean top probability, and the AUROC of the top
probability between the test images and the set.
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

from stages.calibration import auroc, scrambled
from stages.common import load_split
from stages.modelfile import load_onnx_classifier
from stages.outputs import ONNX_PATH, PREPARED_DIR
from stages.predict import to_training_format

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
    threshold = classifier.record.accept_threshold
    x_test, _ = load_split(PREPARED_DIR, "test")
    test = classifier.predict_proba(x_test, 500).max(axis=1)
    with tempfile.TemporaryDirectory() as tmp:
        wheel = sklearn_wheel(Path(tmp))
        sets = {
            "Fashion-MNIST test images": test,
            "the same, pixels scrambled (evaluate's set)": classifier.predict_proba(scrambled(x_test[:2000]), 500).max(
                axis=1
            ),
            "handwritten digits (scikit-learn's 1,797)": classifier.predict_proba(digits(wheel), 500).max(axis=1),
            "photographs (scikit-learn's 2)": classifier.predict_proba(photos(wheel), 500).max(axis=1),
        }
    print(f"Threshold {threshold:.4f} (the top probability 95 % of the validation images reach); ONNX model\n")
    print("| pictures | images | flagged | mean top probability | AUROC against the test images |")
    print("|---|---|---|---|---|")
    for name, top in sets.items():
        separation = "—" if top is test else f"{auroc(test, top):.3f}"
        print(f"| {name} | {len(top):,} | {np.mean(top < threshold):.1%} | {top.mean():.3f} | {separation} |")


if __name__ == "__main__":
    main()
