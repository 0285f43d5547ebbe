"""The output contract, defined once: every file the pipeline writes, its columns or keys, and how
each metric is computed.

The stages write these (train: the model, its history and environment record; evaluate: the
metrics, plot CSVs and pictures; export: the serving formats and their parity; card: the model
card); validate, the report, the card and the tests read and check them from here, and
tests/test_outputs.py checks that dvc.yaml declares the same paths and plots these columns. Adding
a headline metric is one entry in HEADLINE_METRICS: evaluate computes and writes it, validate
checks its presence and range, `dvc metrics diff` shows it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from wardrobe.calibration import ECE_BINS, TEMPERATURE_RANGE, auroc, brier, ece, reliability, unlike_training

if TYPE_CHECKING:  # imported where used: predict's TensorFlow-free install has no pandas
    import pandas as pd

PREPARED_DIR = Path("data/prepared")
MODEL_PATH = Path("data/model/model.keras")
METRICS_PATH = Path("metrics/metrics.json")
ENVIRONMENT_JSON = Path("metrics/environment.json")  # train's library versions, device, precision
HISTORY_CSV = Path("plots/train_history.csv")
# train's live log: DVCLive's Keras callback rewrites it after every epoch (the chief's only), so
# `dvc exp show` shows a running experiment's latest epoch (docs/experiments.md, "Following a run live").
LIVE_DIR = Path("dvclive")
LIVE_METRICS = LIVE_DIR / "metrics.json"  # step (epochs from 0), train.{accuracy,loss}, eval.{...}
CONFUSION_CSV = Path("plots/confusion.csv")
PER_CLASS_CSV = Path("plots/per_class.csv")
CURVES_PNG = Path("plots/training_curves.png")
CONFUSION_PNG = Path("plots/confusion_matrix.png")
PREDICTIONS_PNG = Path("plots/predictions.png")
# evaluate's reliability diagram: per bin of the top probability, the test accuracy with and
# without the model file's temperature (docs/trust.md "Probabilities you can trust").
CALIBRATION_CSV = Path("plots/calibration.csv")
# evaluate's (calibrated) probabilities of every test image, float32 N×classes: export's parity
# reference, so the Keras model runs the test images' views once between the two stages.
TEST_PROBS = Path("data/predictions/test.npy")
RELIABILITY_PNG = Path("plots/reliability.png")
# export: the model in serving formats, test-time augmentation inside (docs/serving.md "Serving the model").
SAVED_MODEL_DIR = Path("data/export/saved_model")  # TF Serving's model base path: version 1/ inside
ONNX_PATH = Path("data/export/model.onnx")
EXPORT_JSON = Path("metrics/export.json")  # parity of each format with the Keras model
MODEL_CARD = Path("metrics/model_card.md")  # card: written from the run's own files

# export: the serving layout and the parity gate (export enforces it, the card states it, validate
# checks metrics/export.json against it).
SERVING_VERSION = "1"  # TF Serving loads the highest numbered folder under its model base path
# the exported graphs' input and outputs (export.serving_model; the ONNX classifier reads them by name)
SERVING_INPUT, SERVING_OUTPUT, SERVING_DISTANCE = "image", "probabilities", "distance"
PARITY_TOP1 = 0.9995  # share of test images whose top-1 class must equal the Keras model's
PARITY_ATOL = 1e-4  # largest allowed difference of any probability
EXPORT_FORMATS = ("saved_model", "onnx")
EXPORT_KEYS = ("test_images", "tta_views", "keras_accuracy", *EXPORT_FORMATS)  # metrics/export.json
# each format's entry (onnx adds `opset`): parity with the Keras model on the test images (its top-1
# class, its probabilities, its unlike-the-training-data flags) and the format's own accuracy
FORMAT_KEYS = ("top1_agreement", "max_abs_diff", "flag_agreement", "accuracy")


def parity_problem(name: str, entry: dict[str, float]) -> str | None:
    """The parity gate, defined once (export refuses to write, validate fails): what is outside it."""
    if (
        entry["top1_agreement"] >= PARITY_TOP1
        and entry["max_abs_diff"] <= PARITY_ATOL
        and entry["flag_agreement"] >= PARITY_TOP1
    ):
        return None
    return (
        f"{name} disagrees with the Keras model on the test images: top-1 agreement "
        f"{entry['top1_agreement']:.4%} (needs {PARITY_TOP1:.2%}), largest probability difference "
        f"{entry['max_abs_diff']:.2e} (allowed {PARITY_ATOL:.0e}), unlike-the-training-data flags agreeing "
        f"{entry['flag_agreement']:.4%} (needs {PARITY_TOP1:.2%})"
    )


# train's metrics/environment.json: flat strings and numbers, one line each in `dvc metrics diff`.
ENVIRONMENT_KEYS = (
    "python",
    "tensorflow",
    "keras",
    "numpy",
    "device",
    "device_name",
    "kernels",
    "replicas",
    "precision",
    "precision_reason",
)

# What each stage writes, as dvc.yaml declares it (outs and metrics).
STAGE_OUTPUTS: dict[str, tuple[Path, ...]] = {
    "prepare": (PREPARED_DIR,),
    "train": (MODEL_PATH, HISTORY_CSV, ENVIRONMENT_JSON, LIVE_DIR),
    "evaluate": (
        METRICS_PATH,
        TEST_PROBS,
        CONFUSION_CSV,
        PER_CLASS_CSV,
        CALIBRATION_CSV,
        CURVES_PNG,
        CONFUSION_PNG,
        PREDICTIONS_PNG,
        RELIABILITY_PNG,
    ),
    "export": (SAVED_MODEL_DIR, ONNX_PATH, EXPORT_JSON),
    "card": (MODEL_CARD,),
}
PNGS = (CURVES_PNG, CONFUSION_PNG, PREDICTIONS_PNG, RELIABILITY_PNG)

# Keras' CSVLogger writes `epoch` then the logs in sorted order: the compiled loss and accuracy,
# for the training and the validation data.
HISTORY_COLUMNS = ("epoch", "accuracy", "loss", "val_accuracy", "val_loss")
CLASS_SCORES = ("precision", "recall", "f1")
CSV_COLUMNS: dict[Path, tuple[str, ...]] = {
    HISTORY_CSV: HISTORY_COLUMNS,
    CONFUSION_CSV: ("actual", "predicted"),  # one row per test image, for DVC's confusion template
    # confidence: the mean (calibrated) top probability of the test images predicted as the class,
    # beside its precision (the share of them that were right): calibration class by class.
    PER_CLASS_CSV: ("class", *CLASS_SCORES, "confidence", "support"),
    # per bin of the top probability: its centre, the test accuracy there with and without the
    # temperature, the diagonal a perfectly calibrated model follows, and the images in the bin.
    CALIBRATION_CSV: ("confidence", "accuracy", "accuracy_uncalibrated", "perfect", "images", "images_uncalibrated"),
}
DIGITS = 6  # metrics and CSV floats are rounded to this many decimals


@dataclass(frozen=True)
class Predictions:
    """What the metrics are computed from: the (calibrated) class probabilities and true labels of
    both splits, the names of the classes (the probabilities' columns), the test probabilities
    before the temperature, the model file's temperature and distance threshold, and the feature
    distances of the test images and of the out-of-distribution set (calibration.scrambled test
    images)."""

    test_probs: np.ndarray
    y_test: np.ndarray
    val_probs: np.ndarray
    y_val: np.ndarray
    class_names: tuple[str, ...]
    test_uncalibrated: np.ndarray
    temperature: float
    distance_threshold: float | None
    test_distances: np.ndarray
    ood_distances: np.ndarray

    def per_class(self) -> pd.DataFrame:
        cm = confusion_matrix(self.y_test, self.test_probs.argmax(axis=1), len(self.class_names))
        return per_class_scores(cm, self.class_names, predicted_confidence(self.test_probs, len(self.class_names)))


@dataclass(frozen=True)
class Metric:
    """A headline number of metrics.json: how it is computed, and the range validate accepts."""

    compute: Callable[[Predictions], float]
    low: float = 0.0
    high: float = 1.0


def accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(probs.argmax(axis=1) == labels))


def cross_entropy(probs: np.ndarray, y_true: np.ndarray) -> float:
    """Mean sparse categorical cross-entropy, clipped like Keras' (epsilon 1e-7)."""
    picked = np.clip(probs[np.arange(len(y_true)), y_true], 1e-7, 1.0)
    return float(-np.mean(np.log(picked)))


def accepted(distances: np.ndarray, threshold: float | None) -> float:
    """The share of images whose feature distance is within the threshold (not flagged)."""
    return 1 - float(np.mean(unlike_training(distances, threshold))) if len(distances) else 0.0


# In this order in metrics.json, so in `dvc exp show`'s first metric columns (evaluate's metrics
# come first there: train's environment and live log are dvc.yaml's top-level metrics, listed last).
# loss is the test NLL of the probabilities every format serves (calibrated); ece and
# ece_uncalibrated the expected calibration error with and without the temperature; accepted the
# share of test images the "unlike the training data" flag lets through, ood_rejected the share of
# the out-of-distribution set it flags, ood_auroc how well the feature distance separates the two.
HEADLINE_METRICS: dict[str, Metric] = {
    "accuracy": Metric(lambda p: accuracy(p.test_probs, p.y_test)),
    "macro_f1": Metric(lambda p: float(p.per_class()["f1"].mean())),
    "val_accuracy": Metric(lambda p: accuracy(p.val_probs, p.y_val)),
    "loss": Metric(lambda p: cross_entropy(p.test_probs, p.y_test), high=math.inf),
    "ece": Metric(lambda p: ece(p.test_probs, p.y_test)),
    "ece_uncalibrated": Metric(lambda p: ece(p.test_uncalibrated, p.y_test)),
    "brier": Metric(lambda p: brier(p.test_probs, p.y_test), high=2.0),
    "temperature": Metric(lambda p: p.temperature, low=TEMPERATURE_RANGE[0], high=TEMPERATURE_RANGE[1]),
    "accepted": Metric(lambda p: accepted(p.test_distances, p.distance_threshold)),
    "ood_rejected": Metric(lambda p: 1 - accepted(p.ood_distances, p.distance_threshold)),
    "ood_auroc": Metric(lambda p: auroc(-p.test_distances, -p.ood_distances)),
}


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, classes: int) -> np.ndarray:
    """Rows: actual class, columns: predicted class."""
    pairs = y_true.astype(np.int64) * classes + y_pred.astype(np.int64)
    return np.bincount(pairs, minlength=classes**2).reshape(classes, classes)


def predicted_confidence(probs: np.ndarray, classes: int) -> np.ndarray:
    """Per class: the mean top probability of the images predicted as it (0 where none is)."""
    predicted = probs.argmax(axis=1)
    count = np.bincount(predicted, minlength=classes)
    total = np.bincount(predicted, weights=probs.max(axis=1).astype(np.float64), minlength=classes)
    return np.divide(total, count, out=np.zeros(classes), where=count > 0)


def per_class_scores(cm: np.ndarray, class_names: tuple[str, ...], confidence: np.ndarray) -> pd.DataFrame:
    """Precision, recall, F1, mean confidence of the predictions (predicted_confidence) and
    support per class; 0 where a class is never predicted/present."""
    true_pos = np.diag(cm).astype(np.float64)
    predicted, support = cm.sum(axis=0), cm.sum(axis=1)
    precision = np.divide(true_pos, predicted, out=np.zeros_like(true_pos), where=predicted > 0)
    recall = np.divide(true_pos, support, out=np.zeros_like(true_pos), where=support > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(true_pos), where=denom > 0)
    import pandas as pd

    frame = pd.DataFrame(
        {
            "class": class_names,
            "precision": precision,
            "recall": recall,
            "f1": f1,
            "confidence": confidence,
            "support": support,
        }
    )
    return frame[list(CSV_COLUMNS[PER_CLASS_CSV])]


def mistake_counts(confusion: pd.DataFrame) -> pd.Series:
    """Test images per off-diagonal (actual, predicted) cell, from confusion.csv's rows."""
    mistakes = confusion[confusion["actual"] != confusion["predicted"]]
    return mistakes.groupby(["actual", "predicted"]).size()


def compute_metrics(predictions: Predictions) -> dict:
    """The metrics.json document: headline numbers first, then per-class scores by class name."""
    scores = predictions.per_class()
    per_class = {
        row["class"]: {key: round(float(row[key]), DIGITS) for key in CLASS_SCORES} for _, row in scores.iterrows()
    }
    headline = {name: round(metric.compute(predictions), DIGITS) for name, metric in HEADLINE_METRICS.items()}
    return {**headline, "per_class": per_class}


def reliability_rows(predictions: Predictions) -> pd.DataFrame:
    """plots/calibration.csv: one row per bin of the top probability (calibration.reliability)."""
    import pandas as pd

    count, _, accuracy_after = reliability(predictions.test_probs, predictions.y_test)
    count_before, _, accuracy_before = reliability(predictions.test_uncalibrated, predictions.y_test)
    centres = (np.arange(ECE_BINS) + 0.5) / ECE_BINS
    frame = pd.DataFrame(
        {
            "confidence": centres,
            "accuracy": accuracy_after,
            "accuracy_uncalibrated": accuracy_before,
            "perfect": centres,
            "images": count,
            "images_uncalibrated": count_before,
        }
    )
    return frame[list(CSV_COLUMNS[CALIBRATION_CSV])]
