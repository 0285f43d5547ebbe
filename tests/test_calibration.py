"""Temperature scaling, its measures and the "unlike the training data" threshold (wardrobe/calibration.py),
on synthetic probabilities whose right answers are known."""

from __future__ import annotations

import numpy as np
import pytest

from wardrobe.calibration import (
    DensityFit,
    auroc,
    brier,
    calibrate,
    distance_threshold,
    ece,
    fit_temperature,
    nll,
    reliability,
    scrambled,
    unlike_training,
)


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def sampled(true_logits: np.ndarray, seed: int = 0) -> np.ndarray:
    """Labels drawn from softmax(true_logits): a model reporting exactly that is calibrated."""
    probs, rng = softmax(true_logits), np.random.default_rng(seed)
    return (probs.cumsum(axis=1) > rng.random((len(probs), 1))).argmax(axis=1)


@pytest.mark.parametrize("sharpness", [0.5, 2.0])
def test_a_known_temperature_is_recovered(sharpness: float) -> None:
    """Labels drawn from softmax(z); the model reports softmax(z / sharpness) (over-confident for
    0.5, under-confident for 2): the fitted temperature is the one that undoes it, 1 / sharpness
    ... as T divides log p: softmax(z / sharpness / T) = softmax(z) at T = 1 / sharpness."""
    logits = np.random.default_rng(1).normal(0, 3, (20_000, 10))
    labels = sampled(logits)
    reported = softmax(logits / sharpness).astype(np.float32)
    temperature = fit_temperature(reported, labels)
    assert temperature == pytest.approx(1 / sharpness, rel=0.04)
    after = calibrate(reported, temperature)
    assert nll(after, labels) < nll(reported, labels)
    assert ece(after, labels) < 0.015 < ece(reported, labels)
    assert (after.argmax(axis=1) == reported.argmax(axis=1)).all()  # top-1 never changes
    assert fit_temperature(reported, labels) == temperature  # deterministic


def test_calibrated_probabilities_need_no_temperature() -> None:
    logits = np.random.default_rng(2).normal(0, 2, (20_000, 5))
    labels = sampled(logits)
    assert fit_temperature(softmax(logits), labels) == pytest.approx(1.0, abs=0.04)
    assert calibrate(softmax(logits), 1.0) is not None
    probs = softmax(logits)
    assert calibrate(probs, 1.0) is probs  # T = 1: the probabilities themselves


def test_ece_brier_and_reliability_on_known_values() -> None:
    # Two bins used: 0.95 confident and right 3 times of 4; 0.55 confident and right once of 2.
    probs = np.array([[0.95, 0.05]] * 4 + [[0.55, 0.45]] * 2)
    labels = np.array([0, 0, 0, 1, 0, 1])
    count, confidence, accuracy = reliability(probs, labels)
    assert count.sum() == 6 and count[14] == 4 and count[8] == 2
    assert confidence[14] == pytest.approx(0.95) and accuracy[14] == pytest.approx(0.75)
    assert np.isnan(accuracy[0])  # an empty bin
    assert ece(probs, labels) == pytest.approx((4 * 0.2 + 2 * 0.05) / 6)
    assert brier(np.array([[1.0, 0.0], [0.5, 0.5]]), np.array([0, 1])) == pytest.approx((0 + 0.5) / 2)


def gaussian_classes(count: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Features of 3 classes in 4 dimensions: class means far apart, one shared, skewed covariance."""
    rng = np.random.default_rng(seed)
    means = np.array([[0, 0, 0, 0], [20, 0, 0, 0], [0, 20, 5, 0]], float)
    mixing = np.array([[3, 0, 0, 0], [1, 0.5, 0, 0], [0, 0, 2, 0], [0, 0, 1, 0.1]])
    labels = rng.integers(0, 3, count)
    return means[labels] + rng.normal(size=(count, 4)) @ mixing.T, labels, means, mixing @ mixing.T


def test_feature_density_measures_mahalanobis_distance() -> None:
    features, labels, means, covariance = gaussian_classes(20_000, seed=5)
    fit = DensityFit(3, 4)
    for start in range(0, len(features), 7000):  # chunk by chunk, as train feeds it
        fit.add(features[start : start + 7000], labels[start : start + 7000])
    density = fit.result()
    np.testing.assert_allclose(density.means, means, atol=0.1)
    # whitened, the features have identity covariance: the fit found the shared covariance
    white = (features - density.means[labels]) @ density.whitening
    np.testing.assert_allclose(np.cov(white, rowvar=False), np.eye(4), atol=0.03)
    # a point's distance is the Mahalanobis distance to its nearest class mean
    point = means[1] + np.array([0.0, 0.5, 0.0, 0.1])
    expected = np.sqrt((point - means[1]) @ np.linalg.inv(covariance) @ (point - means[1]))
    assert density.distance(point[None])[0] == pytest.approx(expected, rel=0.02)
    # in 4 dimensions the squared distance of an inside point is chi-square(4): 95 % stay under 9.49
    fresh, _, _, _ = gaussian_classes(5000, seed=6)
    threshold = distance_threshold(density.distance(fresh), 0.95)
    assert threshold == pytest.approx(np.sqrt(9.488), rel=0.03)
    assert np.mean(unlike_training(density.distance(fresh), threshold)) == pytest.approx(0.05, abs=0.002)
    # a point off the classes' thin direction is far in Mahalanobis terms, near in Euclidean ones
    odd = means[0] + np.array([0.0, 0.0, 0.0, 1.0])
    assert unlike_training(density.distance(odd[None]), threshold).tolist() == [True]
    assert unlike_training(density.distance(fresh[:3]), None).tolist() == [False] * 3  # no threshold: no flag


def test_feature_density_of_constant_features_is_finite() -> None:
    """A feature that never varies (a dead ReLU) gets the ridge, not a division by zero."""
    features = np.zeros((50, 3))
    features[:, 0] = np.random.default_rng(7).normal(size=50)
    fit = DensityFit(2, 3)
    fit.add(features, np.arange(50) % 2)
    distances = fit.result().distance(features)
    assert np.all(np.isfinite(distances)) and distances.max() < 10


def test_auroc() -> None:
    assert auroc(np.array([0.9, 0.8]), np.array([0.1, 0.2])) == 1.0
    assert auroc(np.array([0.1, 0.2]), np.array([0.9, 0.8])) == 0.0
    assert auroc(np.array([0.5, 0.5]), np.array([0.5])) == 0.5  # ties count half
    assert auroc(np.array([0.3, 0.9]), np.array([0.5])) == 0.5


def test_scrambled_images_keep_their_pixels_not_their_shapes() -> None:
    images = np.random.default_rng(4).random((3, 6, 5, 3)).astype(np.float32)
    out = scrambled(images)
    assert out.shape == images.shape and not np.array_equal(out, images)
    for before, after in zip(images, out, strict=True):
        np.testing.assert_array_equal(np.sort(before.reshape(-1, 3), axis=0), np.sort(after.reshape(-1, 3), axis=0))
    np.testing.assert_array_equal(scrambled(images), out)  # seeded
