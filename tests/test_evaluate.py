from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from stages.common import CLASS_NAMES
from stages.evaluate import (
    compute_metrics,
    confusion_matrix,
    confusion_rows,
    cross_entropy,
    per_class_scores,
    write_csv,
)
from tests.conftest import run_module, write_params


def test_confusion_matrix_rows_are_actual() -> None:
    cm = confusion_matrix(np.array([0, 0, 1, 2]), np.array([0, 1, 1, 1]))
    assert cm.shape == (10, 10) and cm.sum() == 4
    assert cm[0, 0] == 1 and cm[0, 1] == 1 and cm[1, 1] == 1 and cm[2, 1] == 1


def test_per_class_scores_known_values() -> None:
    y_true = np.array([0, 0, 0, 0, 1, 1])
    y_pred = np.array([0, 0, 0, 1, 1, 0])
    scores = per_class_scores(confusion_matrix(y_true, y_pred)).set_index("class")
    assert scores.loc["T-shirt/top", "precision"] == pytest.approx(3 / 4)
    assert scores.loc["T-shirt/top", "recall"] == pytest.approx(3 / 4)
    assert scores.loc["Trouser", "precision"] == pytest.approx(1 / 2)
    assert scores.loc["Trouser", "f1"] == pytest.approx(1 / 2)
    assert scores.loc["Bag"].tolist() == [0.0, 0.0, 0.0, 0]  # absent class: zeros, no NaN
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
    metrics = compute_metrics(probs, y, probs[:10], y[:10])
    assert metrics["accuracy"] == 0.75 and metrics["val_accuracy"] == 1.0
    assert list(metrics["per_class"]) == list(CLASS_NAMES)
    assert set(metrics["per_class"]["Shirt"]) == {"precision", "recall", "f1"}
    assert 0 < metrics["macro_f1"] < 1 and metrics["loss"] > 0
    assert json.loads(json.dumps(metrics)) == metrics


def test_confusion_rows_and_csv(tmp_path: Path) -> None:
    frame = confusion_rows(np.array([9, 0]), np.array([7, 0]))
    write_csv(frame, tmp_path / "c.csv")
    assert (tmp_path / "c.csv").read_text() == "actual,predicted\nAnkle boot,Sneaker\nT-shirt/top,T-shirt/top\n"
    assert list(tmp_path.iterdir()) == [tmp_path / "c.csv"]  # no temp file left behind


def test_stages_end_to_end(tmp_path: Path, params_dict: dict) -> None:
    """prepare -> train -> evaluate on tiny data, without DVC: every output is written and sane."""
    write_params(tmp_path, params_dict)
    for stage in ("prepare", "train", "evaluate"):
        result = run_module(f"stages.{stage}", cwd=tmp_path)
        assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / "metrics/metrics.json").read_text())
    assert 0 <= metrics["accuracy"] <= 1 and len(metrics["per_class"]) == 10
    confusion = pd.read_csv(tmp_path / "plots/confusion.csv")
    assert list(confusion.columns) == ["actual", "predicted"] and len(confusion) == 40
    assert set(confusion["actual"]) == set(CLASS_NAMES)
    per_class = pd.read_csv(tmp_path / "plots/per_class.csv")
    assert list(per_class.columns) == ["class", "precision", "recall", "f1", "support"]
    assert per_class["support"].sum() == 40
    history = pd.read_csv(tmp_path / "plots/train_history.csv")
    assert history["epoch"].tolist() == [1]
    for png in ("training_curves", "confusion_matrix", "predictions"):
        with Image.open(tmp_path / f"plots/{png}.png") as image:
            assert image.format == "PNG" and image.width >= 300 and image.height >= 300
    assert (tmp_path / "data/model/model.keras").stat().st_size > 0


def test_evaluate_without_model_fails_cleanly(tmp_path: Path, params_dict: dict) -> None:
    write_params(tmp_path, params_dict)
    result = run_module("stages.evaluate", cwd=tmp_path)
    assert result.returncode == 1
    # TensorFlow's import banner may precede it (absl logs before InitializeLog ignore levels).
    assert result.stderr.splitlines()[-1] == (
        "error: data/model/model.keras: model file not found; run the train stage first"
    )
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "metrics").exists()


def test_flip_tta_only_for_flip_trained_models() -> None:
    import keras

    from stages.common import predict_proba, wants_flip_tta

    plain_in = keras.Input((28, 28))
    plain = keras.Model(plain_in, keras.layers.Dense(10, activation="softmax")(keras.layers.Flatten()(plain_in)))
    flip_in = keras.Input((28, 28, 1))
    flipped = keras.Model(flip_in, keras.layers.RandomFlip("horizontal")(flip_in))
    assert wants_flip_tta(plain, "auto") is False
    assert wants_flip_tta(flipped, "auto") is True
    assert wants_flip_tta(plain, "always") is True and wants_flip_tta(flipped, "never") is False
    x = np.random.default_rng(0).random((3, 28, 28), dtype=np.float32)
    averaged = predict_proba(plain, x, 2, flip_tta=True)
    expected = (plain.predict(x, verbose=0) + plain.predict(x[:, :, ::-1], verbose=0)) / 2
    # Other batch sizes take other oneDNN kernels: equal to a few float32 ulps, not bit for bit.
    np.testing.assert_allclose(averaged, expected, rtol=1e-5)
