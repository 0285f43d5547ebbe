"""The output contract (wardrobe/outputs.py): metric definitions, and agreement with dvc.yaml."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.conftest import CLASS_NAMES, REPO
from wardrobe.calibration import brier, ece
from wardrobe.outputs import (
    CSV_COLUMNS,
    HEADLINE_METRICS,
    STAGE_OUTPUTS,
    Predictions,
    compute_metrics,
    confusion_matrix,
    cross_entropy,
    per_class_scores,
    predicted_confidence,
)

DVC_YAML = yaml.safe_load((REPO / "dvc.yaml").read_text())


def test_confusion_matrix_rows_are_actual() -> None:
    cm = confusion_matrix(np.array([0, 0, 1, 2]), np.array([0, 1, 1, 1]), 10)
    assert cm.shape == (10, 10) and cm.sum() == 4
    assert cm[0, 0] == 1 and cm[0, 1] == 1 and cm[1, 1] == 1 and cm[2, 1] == 1


def test_per_class_scores_known_values() -> None:
    y_true = np.array([0, 0, 0, 0, 1, 1])
    y_pred = np.array([0, 0, 0, 1, 1, 0])
    confidence = np.linspace(0.5, 0.95, 10)
    scores = per_class_scores(confusion_matrix(y_true, y_pred, 10), CLASS_NAMES, confidence).set_index("class")
    assert scores.loc["T-shirt/top", "precision"] == pytest.approx(3 / 4)
    assert scores.loc["T-shirt/top", "recall"] == pytest.approx(3 / 4)
    assert scores.loc["Trouser", "precision"] == pytest.approx(1 / 2)
    assert scores.loc["Trouser", "f1"] == pytest.approx(1 / 2)
    assert scores.loc["Bag"].tolist() == [0.0, 0.0, 0.0, confidence[8], 0]  # absent class: zeros, no NaN
    assert scores["confidence"].tolist() == confidence.tolist()
    assert scores["support"].tolist() == [4, 2] + [0] * 8


def test_cross_entropy_matches_definition() -> None:
    probs = np.array([[0.5, 0.5] + [0] * 8, [0.1, 0.9] + [0] * 8])
    assert cross_entropy(probs, np.array([0, 1])) == pytest.approx(-(np.log(0.5) + np.log(0.9)) / 2)
    assert np.isfinite(cross_entropy(np.zeros((1, 10)), np.array([3])))


def test_compute_metrics_document() -> None:
    rng = np.random.default_rng(0)
    y = np.arange(20) % 10
    probs = rng.dirichlet(np.ones(10), size=20)
    probs[np.arange(15), y[:15]] += 5  # 15 of 20 right
    probs[np.arange(15, 20), y[15:]] = 0  # the other 5 surely wrong
    probs /= probs.sum(axis=1, keepdims=True)
    distances = np.arange(20, dtype=np.float32)  # 0..19: 16 of them within 15
    ood = np.array([14.0, 30, 40, 50])  # one within 15; all but it beyond every test image
    metrics = compute_metrics(Predictions(probs, y, probs[:10], y[:10], CLASS_NAMES, probs, 1.0, 15.0, distances, ood))
    assert metrics["accuracy"] == 0.75 and metrics["val_accuracy"] == 1.0
    assert metrics["ece"] == metrics["ece_uncalibrated"] == pytest.approx(ece(probs, y), abs=1e-6)
    assert metrics["brier"] == pytest.approx(brier(probs, y), abs=1e-6) and metrics["temperature"] == 1.0
    assert metrics["accepted"] == 0.8 and metrics["ood_rejected"] == 0.75
    # AUROC of the distance: 14 is farther than 14 test images (0..13), ties one (half), the rest beyond all
    assert metrics["ood_auroc"] == pytest.approx((14.5 + 3 * 20) / 80, abs=1e-6)
    assert list(metrics["per_class"]) == list(CLASS_NAMES)
    assert set(metrics["per_class"]["Shirt"]) == {"precision", "recall", "f1"}
    assert list(metrics) == [*HEADLINE_METRICS, "per_class"]
    f1 = [metrics["per_class"][name]["f1"] for name in CLASS_NAMES]
    assert metrics["macro_f1"] == pytest.approx(np.mean(f1), abs=1e-6)
    assert metrics["loss"] == pytest.approx(cross_entropy(probs, y), abs=1e-6)
    assert json.loads(json.dumps(metrics)) == metrics


def _path(entry: str | dict) -> Path:
    return Path(entry if isinstance(entry, str) else next(iter(entry)))


def test_dvc_yaml_declares_exactly_the_contracts_outputs() -> None:
    declared = {
        name: tuple(_path(entry) for entry in stage.get("metrics", []) + stage.get("outs", []))
        for name, stage in DVC_YAML["stages"].items()
    }
    assert {name: set(paths) for name, paths in declared.items()} == {
        name: set(paths) for name, paths in STAGE_OUTPUTS.items()
    }


def test_dvc_yaml_plots_use_the_contracts_columns() -> None:
    for plot in DVC_YAML["plots"]:
        if isinstance(plot, str):  # an image
            assert any(Path(plot) in paths for paths in STAGE_OUTPUTS.values()), plot
            continue
        ((title, spec),) = plot.items()
        for path, columns in spec["y"].items():
            wanted = {spec["x"], *([columns] if isinstance(columns, str) else columns)}
            assert wanted <= set(CSV_COLUMNS[Path(path)]), title


def test_predicted_confidence_is_the_mean_top_probability_per_predicted_class() -> None:
    probs = np.array([[0.9, 0.1, 0.0], [0.7, 0.3, 0.0], [0.2, 0.8, 0.0]])
    np.testing.assert_allclose(predicted_confidence(probs, 3), [0.8, 0.8, 0.0])
