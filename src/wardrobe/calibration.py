"""Probabilities you can trust, defined once: temperature scaling, its measures (ECE, Brier,
reliability bins), the feature distance that flags pictures unlike the training data with its
threshold, and the out-of-distribution set evaluate builds from the test images. NumPy only: the
model file's readers (predict's TensorFlow-free install among them) apply the same numbers.

Temperature scaling (Guo et al. 2017) divides the log-probabilities by one number T fitted on the
validation split: T < 1 sharpens under-confident probabilities (label smoothing and averaging
views both soften them), T > 1 softens over-confident ones. It keeps every image's order of
classes, so top-1 answers never change. It acts on the probabilities as the model's views average
them (the model's output is softmax, so log p is the logits up to a constant per image).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ECE_BINS = 15  # equal-width bins of the top probability (Guo et al.'s choice)
TEMPERATURE_RANGE = (0.05, 20.0)  # searched for T; the fit's answer is rounded to 6 digits
TINY = 1e-30  # log of a probability that underflowed to 0


def calibrate(probs: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(log(probs) / temperature) per row; temperature 1 returns `probs` unchanged."""
    if temperature == 1.0:
        return probs
    logits = np.log(np.maximum(probs.astype(np.float64), TINY)) / temperature
    logits -= logits.max(axis=1, keepdims=True)
    scaled = np.exp(logits)
    return (scaled / scaled.sum(axis=1, keepdims=True)).astype(np.float32)


def nll(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean negative log-likelihood of the true labels."""
    return float(-np.mean(np.log(np.maximum(probs[np.arange(len(labels)), labels].astype(np.float64), TINY))))


def fit_temperature(probs: np.ndarray, labels: np.ndarray) -> float:
    """The T that minimizes the NLL of calibrate(probs, T) on (validation) labels.

    The NLL is convex in 1/T, so a golden-section search over 1/T finds its minimum; 100 steps
    narrow the range to 1e-20 of its width. Deterministic: same inputs, same T.
    """
    log_p = np.log(np.maximum(probs.astype(np.float64), TINY))
    true = log_p[np.arange(len(labels)), labels]

    def loss(beta: float) -> float:
        scaled = beta * log_p
        top = scaled.max(axis=1)
        return float(np.mean(top + np.log(np.exp(scaled - top[:, None]).sum(axis=1)) - beta * true))

    low, high = 1 / TEMPERATURE_RANGE[1], 1 / TEMPERATURE_RANGE[0]
    ratio = (np.sqrt(5) - 1) / 2
    a, b = high - ratio * (high - low), low + ratio * (high - low)
    loss_a, loss_b = loss(a), loss(b)
    for _ in range(100):
        if loss_a < loss_b:
            high, b, loss_b = b, a, loss_a
            a = high - ratio * (high - low)
            loss_a = loss(a)
        else:
            low, a, loss_a = a, b, loss_b
            b = low + ratio * (high - low)
            loss_b = loss(b)
    return round(1 / ((low + high) / 2), 6)


def reliability(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> tuple[np.ndarray, ...]:
    """Per equal-width bin of the top probability: images, mean top probability, accuracy
    (NaN for an empty bin)."""
    top = probs.max(axis=1).astype(np.float64)
    correct = probs.argmax(axis=1) == labels
    index = np.minimum((top * bins).astype(np.int64), bins - 1)
    count = np.bincount(index, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        confidence = np.bincount(index, weights=top, minlength=bins) / count
        accuracy = np.bincount(index, weights=correct, minlength=bins) / count
    return count, confidence, accuracy


def ece(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    """Expected calibration error: the images-weighted mean gap between accuracy and mean top
    probability over equal-width bins of the top probability."""
    count, confidence, accuracy = reliability(probs, labels, bins)
    used = count > 0
    return float(np.sum(count[used] * np.abs(accuracy[used] - confidence[used])) / max(len(labels), 1))


def brier(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean over images of the squared distance between the probabilities and the one-hot label."""
    target = np.zeros_like(probs, dtype=np.float64)
    target[np.arange(len(labels)), labels] = 1.0
    return float(np.mean(np.sum((probs - target) ** 2, axis=1)))


# The flag for pictures unlike the training data (issue #36). The top probability was tried first
# and kept only ~45 % of out-of-distribution pictures out at 95 % acceptance (docs/benchmarks.md,
# "A flag for pictures unlike the training data"); the distance of a picture's features (the model's
# last hidden layer, the unmoved view) from the nearest class of the training images' features,
# measured in their shared covariance (Mahalanobis; Lee et al. 2018), keeps out 96-100 % of them.
RIDGE = 1e-6  # added to the covariance's eigenvalues, relative to their mean (units no image moves)


@dataclass(frozen=True)
class FeatureDensity:
    """The training images' features as class means and a whitening of their shared covariance:
    (f - mean) @ whitening has identity covariance, so a Euclidean distance there is Mahalanobis'."""

    means: np.ndarray  # classes × features
    whitening: np.ndarray  # features × features

    def distance(self, features: np.ndarray) -> np.ndarray:
        """Per image: the Mahalanobis distance of its features from the nearest class mean."""
        white = features.astype(np.float64) @ self.whitening
        centres = self.means.astype(np.float64) @ self.whitening
        return np.sqrt(np.min([np.sum((white - centre) ** 2, axis=1) for centre in centres], axis=0))


class DensityFit:
    """Accumulates features chunk by chunk (a split need not fit in memory) into a FeatureDensity."""

    def __init__(self, classes: int, width: int) -> None:
        self.count = np.zeros(classes)
        self.sums = np.zeros((classes, width))
        self.scatter = np.zeros((width, width))

    def add(self, features: np.ndarray, labels: np.ndarray) -> None:
        f = features.astype(np.float64)
        np.add.at(self.sums, labels, f)
        self.count += np.bincount(labels, minlength=len(self.count))
        self.scatter += f.T @ f

    def result(self) -> FeatureDensity:
        seen = self.count > 0
        means = np.divide(self.sums, self.count[:, None], out=np.zeros_like(self.sums), where=seen[:, None])
        # within-class covariance, pooled: Σ f fᵀ minus each class's n μ μᵀ, over all images
        covariance = (self.scatter - (means * self.count[:, None]).T @ means) / max(self.count.sum(), 1)
        values, vectors = np.linalg.eigh((covariance + covariance.T) / 2)
        values = np.maximum(values, 0) + RIDGE * max(float(values.mean()), TINY)
        whitening = vectors / np.sqrt(values)
        return FeatureDensity(means.astype(np.float32), whitening.astype(np.float32))


def distance_threshold(distances: np.ndarray, accept_fraction: float) -> float:
    """The feature distance that `accept_fraction` of these (validation) images stay within: beyond
    it, a picture is flagged as unlike the training data."""
    return round(float(np.quantile(distances, accept_fraction, method="higher")), 6)


def unlike_training(distances: np.ndarray, threshold: float | None) -> np.ndarray:
    """Per image: is its feature distance beyond the threshold (the flag predict shows)? No
    threshold (a model file from before the flag): never."""
    return distances > threshold if threshold is not None else np.zeros(len(distances), bool)


def auroc(inside: np.ndarray, outside: np.ndarray) -> float:
    """Area under the ROC curve of a score that should be higher `inside` than `outside`: the
    chance that a random inside image scores above a random outside one (ties count half)."""
    scores = np.concatenate([inside, outside])
    order = np.argsort(scores, kind="stable")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    # average ranks over ties
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_scores)) + 1]
    ends = np.r_[starts[1:], len(scores)]
    for start, end in zip(starts, ends, strict=True):
        ranks[order[start:end]] = (start + end + 1) / 2
    inside_ranks = ranks[: len(inside)].sum()
    return float((inside_ranks - len(inside) * (len(inside) + 1) / 2) / (len(inside) * len(outside)))


OOD_SEED = 0


def scrambled(images: np.ndarray, seed: int = OOD_SEED) -> np.ndarray:
    """Each image with its pixel positions shuffled (the same shuffle for every channel): the same
    brightness and colours as a real picture of the dataset, none of its shapes. evaluate's
    out-of-distribution set, made without any download."""
    rng = np.random.default_rng(seed)
    height, width = images.shape[1:3]
    flat = images.reshape(len(images), height * width, -1)
    out = np.empty_like(flat)
    for k in range(len(images)):
        out[k] = flat[k, rng.permutation(height * width)]
    return out.reshape(images.shape)
