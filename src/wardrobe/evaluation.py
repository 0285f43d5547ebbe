"""What the evaluate stage (stages/evaluate.py) draws and writes beside the metrics: the confusion
rows, the CSVs and the pictures (training curves, confusion matrix, example grid, reliability)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

# The Figure API, not pyplot: no backend to choose (pyplot's would be process-wide state), files only.
from matplotlib.figure import Figure

from wardrobe.common import (
    atomic_path,
)
from wardrobe.outputs import (
    CONFUSION_CSV,
    CSV_COLUMNS,
    DIGITS,
)


def confusion_rows(y_true: np.ndarray, y_pred: np.ndarray, class_names: tuple[str, ...]) -> pd.DataFrame:
    """One row per test image, class names, for DVC's `confusion` template."""
    names = np.array(class_names)
    frame = pd.DataFrame({"actual": names[y_true], "predicted": names[y_pred]})
    return frame[list(CSV_COLUMNS[CONFUSION_CSV])]


def write_csv(frame: pd.DataFrame, path: Path) -> None:
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False, float_format=f"%.{DIGITS}f")


def _save_figure(fig: Figure, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")


def plot_training_curves(history: pd.DataFrame, path: Path) -> None:
    """Accuracy and loss, train vs val, per epoch: the original script's two panels."""
    fig = Figure(figsize=(10, 4))
    axes = fig.subplots(1, 2)
    for ax, metric in zip(axes, ("accuracy", "loss"), strict=True):
        ax.plot(history["epoch"], history[metric], marker="o", label=f"train {metric}")
        ax.plot(history["epoch"], history[f"val_{metric}"], marker="o", label=f"val {metric}")
        ax.set(xlabel="epoch", ylabel=metric, title=f"Training and validation {metric}")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    _save_figure(fig, path)


def plot_confusion_matrix(cm: np.ndarray, class_names: tuple[str, ...], path: Path) -> None:
    """Row-normalized (recall per class) heatmap with the share printed in each cell."""
    shares = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    fig = Figure(figsize=(8, 7))
    ax = fig.subplots()
    image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    classes = len(class_names)
    ax.set_xticks(range(classes), class_names, rotation=45, ha="right")
    ax.set_yticks(range(classes), class_names)
    ax.set(xlabel="predicted", ylabel="actual", title="Confusion matrix (share of each actual class)")
    for i in range(classes):
        for j in range(classes):
            ax.text(
                j,
                i,
                f"{shares[i, j]:.2f}",
                ha="center",
                va="center",
                fontsize=7,
                color="white" if shares[i, j] > 0.5 else "black",
            )
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    _save_figure(fig, path)


def plot_predictions(
    x: np.ndarray, y_true: np.ndarray, y_pred: np.ndarray, class_names: tuple[str, ...], grid: int, path: Path
) -> None:
    """The first grid×grid test images with predicted (true) labels; mistakes in red."""
    count = min(grid * grid, len(x))
    fig = Figure(figsize=(1.6 * grid, 1.8 * grid))
    axes = fig.subplots(grid, grid, squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k >= count:
            continue
        ax.imshow(x[k], cmap="gray_r", vmin=0, vmax=1)
        correct = y_pred[k] == y_true[k]
        ax.set_title(
            f"{class_names[y_pred[k]]}\n({class_names[y_true[k]]})",
            fontsize=7,
            color="tab:blue" if correct else "tab:red",
        )
    fig.tight_layout()
    _save_figure(fig, path)


# evaluate's out-of-distribution set: the first test images, each with its pixels scrambled.
OOD_IMAGES = 2000


def plot_reliability(rows: pd.DataFrame, path: Path) -> None:
    """The reliability diagram: test accuracy against the top probability, per bin, with and
    without the temperature; a calibrated model follows the diagonal."""
    fig = Figure(figsize=(5.5, 5))
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], color="gray", linestyle="--", label="perfectly calibrated")
    ax.plot(rows["confidence"], rows["accuracy_uncalibrated"], marker="o", label="before (views' mean)")
    ax.plot(rows["confidence"], rows["accuracy"], marker="o", label="calibrated (what every format serves)")
    ax.set(xlabel="top probability (bin centre)", ylabel="test accuracy", title="Reliability diagram", xlim=(0, 1))
    ax.set(ylim=(0, 1))
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left")
    fig.tight_layout()
    _save_figure(fig, path)
