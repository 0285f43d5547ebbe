"""audit: the images whose label the trained model most disputes, ranked for a person to review.

    wardrobe audit [--top 50] [--folds K] [--out audit]

Only out-of-sample predictions count: the validation and test splits, which the model never
trained on; with --folds K also the training split, each fold predicted by a model of the same
recipe trained on the other K-1 folds (K more trainings: K times train's time, no outputs of the
pipeline touched). Probabilities are calibrated as the model file says (fold models: a temperature
fitted on the validation split, as train does).

The rule is confident learning's (Northcutt, Jiang and Chuang 2021, the default of cleanlab's
`find_label_issues`): an image is a label issue when the model's top class is another than its
label and the probability of its label is under that label's threshold, the mean probability the
model gives the label over the images that carry it; issues are ranked by that probability, lowest
first (cleanlab's `self_confidence`). It is a few lines of NumPy here: cleanlab would bring
scikit-learn and SciPy into every install for the same arithmetic (docs/trust.md "Probabilities you can
trust").

Writes OUT/label_issues.csv (rank, split, row, origin: the picture's path or IDX file#index,
label, predicted class and both probabilities) and OUT/label_issues.png (the first --top, with
their labels and the model's answer). Not a DVC stage: run it when you want to clean the data.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from wardrobe.calibration import calibrate
from wardrobe.cli import OneLineParser
from wardrobe.common import (
    ORIGINS_FILE,
    SPLITS,
    ImageFile,
    atomic_path,
    enable_determinism,
    load_split,
    read_csv,
    read_dataset,
    run_main,
)
from wardrobe.model.file import load_keras_classifier
from wardrobe.outputs import DIGITS, MODEL_PATH, PREPARED_DIR

ISSUES_CSV, ISSUES_PNG = "label_issues.csv", "label_issues.png"
COLUMNS = ("rank", "split", "row", "origin", "label", "predicted", "label_probability", "predicted_probability")
GRID_COLUMNS = 10
BATCH = 1024


def label_issues(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Indices of the label issues (confident learning, above), the most disputed first."""
    classes = probs.shape[1]
    given = probs[np.arange(len(labels)), labels]
    thresholds = np.array([given[labels == c].mean() if (labels == c).any() else 1.0 for c in range(classes)])
    issue = (probs.argmax(axis=1) != labels) & (given < thresholds[labels])
    candidates = np.flatnonzero(issue)
    return candidates[np.argsort(given[candidates], kind="stable")]


@dataclasses.dataclass(frozen=True)
class Rows:
    """Some rows of a prepared split, indexed like the split itself (train.make_dataset reads it)."""

    images: ImageFile | np.ndarray
    indices: np.ndarray

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.indices), *self.images.shape[1:])

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key: Any) -> np.ndarray:
        return np.asarray(self.images[self.indices[key]])


def fold_probabilities(folds: int, x: ImageFile, y: np.ndarray, val: tuple[ImageFile, np.ndarray]) -> np.ndarray:
    """Each training image's calibrated probabilities from a model of the recipe (params.yaml's
    train) trained on the other folds."""
    from wardrobe.model.file import Views, decide_flip, predict_proba
    from wardrobe.params import TrainParams, load_section
    from wardrobe.training import fit, validation_temperature

    params = load_section(TrainParams)
    classes = len(read_dataset(PREPARED_DIR).class_names)
    fold_of = np.random.default_rng(params.seed).permutation(len(y)) % folds
    probs = np.zeros((len(y), classes), np.float32)
    views = Views(decide_flip(bool(params.augment_flip), params.tta_flip), params.tta_shift)
    for fold in range(folds):
        keep, held = np.flatnonzero(fold_of != fold), np.flatnonzero(fold_of == fold)
        print(f"audit: fold {fold + 1}/{folds}: training on {len(keep):,} images, predicting {len(held):,}")
        with tempfile.TemporaryDirectory() as scratch:
            model = fit(params, (Rows(x, keep), y[keep]), val, Path(scratch) / "history.csv", classes, verbose=0)
        temperature, _ = validation_temperature(model, val, views, params)
        probs[held] = calibrate(predict_proba(model, Rows(x, held), BATCH, views), temperature)
    return probs


def plot_issues(images: list[np.ndarray], titles: list[str], path: Path) -> None:
    rows = max(1, -(-len(images) // GRID_COLUMNS))
    fig = Figure(figsize=(1.6 * GRID_COLUMNS, 1.9 * rows))
    axes = fig.subplots(rows, GRID_COLUMNS, squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k < len(images):
            ax.imshow(images[k], cmap="gray_r", vmin=0, vmax=1)
            ax.set_title(titles[k], fontsize=6.5)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")


def audit(top: int, folds: int, out: Path) -> pd.DataFrame:
    classifier = load_keras_classifier(MODEL_PATH)
    names = classifier.record.class_names
    splits = {split: load_split(PREPARED_DIR, split) for split in SPLITS}
    audited = ["val", "test"] + (["train"] if folds else [])
    probs = {split: classifier.predict_proba(splits[split][0], BATCH) for split in ("val", "test")}
    if folds:
        probs["train"] = fold_probabilities(folds, *splits["train"], splits["val"])
    all_probs = np.concatenate([probs[split] for split in audited])
    all_labels = np.concatenate([splits[split][1] for split in audited]).astype(np.int64)
    where = [(split, row) for split in audited for row in range(len(splits[split][1]))]
    ranked = label_issues(all_probs, all_labels)
    origins = read_csv(PREPARED_DIR / ORIGINS_FILE).set_index(["split", "row"])["origin"]
    predicted = all_probs.argmax(axis=1)
    frame = pd.DataFrame(
        [
            (
                rank + 1,
                where[i][0],
                where[i][1],
                origins.get(where[i], ""),
                names[all_labels[i]],
                names[predicted[i]],
                round(float(all_probs[i, all_labels[i]]), DIGITS),
                round(float(all_probs[i, predicted[i]]), DIGITS),
            )
            for rank, i in enumerate(ranked)
        ],
        columns=list(COLUMNS),
    )
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / ISSUES_CSV) as tmp:
        frame.to_csv(tmp, index=False)
    shown = frame.head(top)
    images = [splits[split][0][int(row)] for split, row in zip(shown["split"], shown["row"], strict=True)]
    titles = [
        f"#{r.rank} {r.split} {r.row}\nlabel {r.label} {r.label_probability:.2f}\n"
        f"model {r.predicted} {r.predicted_probability:.2f}"
        for r in shown.itertuples()
    ]
    plot_issues(images, titles, out / ISSUES_PNG)
    print(
        f"audit: {len(frame):,} of {len(all_labels):,} labels disputed ({', '.join(audited)}); "
        f"wrote {out / ISSUES_CSV} and {out / ISSUES_PNG} (the first {len(shown)})"
    )
    return frame


def main(argv: list[str] | None = None) -> None:
    parser = OneLineParser(prog="wardrobe audit", description="Rank the images whose label the trained model disputes.")
    parser.add_argument("--top", type=int, default=50, help="pictures in the grid (default 50)")
    parser.add_argument("--folds", type=int, default=0, help="also audit the training split with K fold models")
    parser.add_argument("--out", type=Path, default=Path("audit"), help="output folder (default audit/)")
    args = parser.parse_args(argv)
    if args.top < 1 or args.folds == 1 or args.folds < 0:
        parser.error("--top must be >= 1 and --folds 0 (off) or >= 2")

    def run() -> None:
        enable_determinism()
        audit(args.top, args.folds, args.out)

    run_main(run)
