"""The model card, for whoever gets the artifact (the card stage, stages/card.py, writes it to
metrics/model_card.md).

Every number in it is read from the run's own files (params.yaml, the prepared data's record, the
model file's record, metrics/*.json, plots/*.csv), so it cannot disagree with them; no dates, so the
same run writes the same bytes. It needs neither TensorFlow nor ONNX Runtime, so it is cheap to
re-run when only its wording changes.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import yaml

from wardrobe.common import (
    DatasetInfo,
    WardrobeError,
    markdown_table,
    read_csv,
    read_dataset,
    read_json,
    shape_text,
)
from wardrobe.model.file import ModelRecord, read_record
from wardrobe.outputs import (
    CONFUSION_CSV,
    ENVIRONMENT_JSON,
    EXPORT_JSON,
    METRICS_PATH,
    MODEL_CARD,
    MODEL_PATH,
    ONNX_PATH,
    PARITY_ATOL,
    PARITY_TOP1,
    PER_CLASS_CSV,
    PREPARED_DIR,
    SAVED_MODEL_DIR,
    SERVING_DISTANCE,
    SERVING_INPUT,
    SERVING_OUTPUT,
    SERVING_VERSION,
    mistake_counts,
)
from wardrobe.params import PARAMS_FILE, DataParams, PrepareParams, TrainParams, load_section

ARTIFACT = "classifier"
TEMPLATE = Path(__file__).with_name("card.md")  # str.format fields: render's `fields`
TOP_CONFUSIONS = 5
# A class whose predictions' mean top probability and precision differ by more is named in the card.
CLASS_CALIBRATION_GAP = 0.02


@dataclass(frozen=True)
class Run:
    """Everything the card states, as read from the run's files."""

    data: DataParams
    prepare: PrepareParams
    train: TrainParams
    recipe: dict  # params.yaml's train section as written (validated as `train`)
    dataset: DatasetInfo
    model_md5: str
    record: ModelRecord
    metrics: dict
    per_class: pd.DataFrame
    confusion: pd.DataFrame
    environment: dict
    export: dict


def model_md5(path: Path) -> str:
    """The file's MD5: DVC's hash of it, as in dvc.lock."""
    try:
        return hashlib.md5(path.read_bytes()).hexdigest()
    except FileNotFoundError:
        raise WardrobeError(f"{path}: model file not found; run the train stage first") from None
    except OSError as exc:
        raise WardrobeError(f"{path}: cannot read the model file: {exc.strerror}") from exc


def read_run() -> Run:
    sections = load_section(DataParams), load_section(PrepareParams), load_section(TrainParams)  # params first
    return Run(
        *sections,
        recipe=yaml.safe_load(PARAMS_FILE.read_text(encoding="utf-8"))["train"],
        dataset=read_dataset(PREPARED_DIR),
        model_md5=model_md5(MODEL_PATH),
        record=read_record(MODEL_PATH),
        metrics=read_json(METRICS_PATH),
        per_class=read_csv(PER_CLASS_CSV),
        confusion=read_csv(CONFUSION_CSV),
        environment=read_json(ENVIRONMENT_JSON),
        export=read_json(EXPORT_JSON),
    )


def confused_pairs(confusion: pd.DataFrame, top: int = TOP_CONFUSIONS) -> pd.DataFrame:
    """The most frequent (actual, predicted) mistakes of the test set, from confusion.csv's rows."""
    counts = mistake_counts(confusion).rename("count").reset_index()
    return counts.sort_values(["count", "actual", "predicted"], ascending=[False, True, True]).head(top)


def render(run: Run) -> str:
    """The card's markdown: wardrobe/card.md (the text) filled with what this function computes from
    the run (the logic); a pure function of the run, so tests can recompute it."""
    exp = run.export
    top_pairs = confused_pairs(run.confusion)  # the table, and its first row in the limitations
    per_class = markdown_table(
        ["class", "precision", "recall", "F1", "test images"],
        [
            [row["class"], f"{row['precision']:.4f}", f"{row['recall']:.4f}", f"{row['f1']:.4f}", int(row["support"])]
            for _, row in run.per_class.iterrows()
        ],
    )
    pairs = markdown_table(
        ["actual", "predicted as", "test images"],
        [[row["actual"], row["predicted"], int(row["count"])] for _, row in top_pairs.iterrows()],
    )
    signature = f"`{SERVING_INPUT}` → `{SERVING_OUTPUT}`, `{SERVING_DISTANCE}`"
    formats = markdown_table(
        ["format", "path", "signature / input → output", "top-1 = Keras", "max probability difference"],
        [
            ["Keras 3", f"`{MODEL_PATH}`", "`Model.predict` on `image` → probabilities; views applied by the caller "
             "(`wardrobe.model.file.read_record`)", "—", "—"],
            ["TensorFlow SavedModel", f"`{SAVED_MODEL_DIR}/{SERVING_VERSION}/`", f"`serving_default`: {signature}",
             f"{exp['saved_model']['top1_agreement']:.2%}", f"{exp['saved_model']['max_abs_diff']:.1e}"],
            [f"ONNX (opset {exp['onnx']['opset']})", f"`{ONNX_PATH}`", signature,
             f"{exp['onnx']['top1_agreement']:.2%}", f"{exp['onnx']['max_abs_diff']:.1e}"],
        ],
    )  # fmt: skip
    if run.data.format == "idx":
        source = "- Its files, verified by SHA-256 of their decompressed bytes before use:\n" + "\n".join(
            f"  - `{name}`: `{digest}`" for name, digest in (run.data.sha256 or {}).items()
        )
    else:
        folders = f"`{run.data.root}`" + (f" (test: `{run.data.test_root}`)" if run.data.test_root else "")
        source = f"- The pictures of {folders}, one sub-folder per class; SHA-256 of their names and bytes: "
        source += f"`{run.dataset.content_sha256}`."
    record = run.record
    views = (
        f"{len(record.views)} views (the image"
        + (f", moved {record.views.shift} px up, down, left and right" if record.views.shift else "")
        + (", each also mirrored left-right" if record.views.flip else "")
        + "), probabilities averaged"
    )
    size = shape_text(record.image_shape[:2])
    rgb = len(record.image_shape) == 3
    photo_fit = (
        f"resizes it to {size}"
        if record.photo_fit == "resize" or rgb
        else f"inverts a light background, crops to the object, scales it to fit {size} and centers it"
    )
    sizes = run.dataset.counts
    most_often = (
        f", most often {top_pairs.iloc[0]['actual']} as {top_pairs.iloc[0]['predicted']}" if len(top_pairs) else ""
    )
    weakest = ", ".join(
        f"{row['class']} (F1 {row['f1']:.3f})" for _, row in run.per_class.nsmallest(3, "f1").iterrows()
    )
    temperature_text = (
        f"Every format divides the views' averaged log-probabilities by a temperature of **{record.temperature:g}**, "
        f"fitted on the {sizes['val']:,} validation images after training (`train.calibrate`)."
        if record.temperature != 1.0
        else "The probabilities are the views' mean, with no temperature (`train.calibrate` is off)."
    )
    gaps = [
        f"{row['class']} (mean top probability {row['confidence']:.3f}, right {row['precision']:.3f})"
        for _, row in run.per_class.iterrows()
        if abs(row["confidence"] - row["precision"]) > CLASS_CALIBRATION_GAP
    ]
    class_calibration = (
        f"Where a class's predictions are off by more than {CLASS_CALIBRATION_GAP:.2f} on average: {', '.join(gaps)}."
        if gaps
        else "Every class's predictions are right as often as their mean probability says, within "
        f"{CLASS_CALIBRATION_GAP:.2f}."
    )
    fields = {
        "artifact": ARTIFACT,
        "temperature_text": temperature_text,
        "class_calibration": class_calibration,
        "threshold": record.distance_threshold if record.distance_threshold is not None else float("nan"),
        "accept_fraction": run.train.accept_fraction,
        "ood_passed": 1 - run.metrics["ood_rejected"],
        "arch": run.train.arch,
        "dataset": run.dataset.name,
        "description": run.data.description,
        "classes": len(record.class_names),
        "size": size,
        "shape": shape_text(record.image_shape),
        "color": "RGB" if rgb else "grayscale",
        "photo_fit": photo_fit,
        "m": run.metrics,
        "sizes": sizes,
        "views": views,
        "model_path": MODEL_PATH,
        "model_md5": run.model_md5,
        "error_share": 1 - run.metrics["accuracy"],
        "most_often": most_often,
        "serving_input": SERVING_INPUT,
        "serving_output": SERVING_OUTPUT,
        "serving_distance": SERVING_DISTANCE,
        "parity_images": exp["test_images"],
        "parity_top1": PARITY_TOP1,
        "parity_atol": PARITY_ATOL,
        "formats": formats,
        "saved_model_dir": SAVED_MODEL_DIR,
        "source": source,
        "val_fraction": run.prepare.val_fraction,
        "split_seed": run.prepare.seed,
        "train_seed": run.train.seed,
        "recipe_yaml": yaml.safe_dump(run.recipe, sort_keys=False).rstrip(),
        "env": run.environment,
        "kernels": run.environment.get("kernels", "not recorded"),
        "per_class": per_class,
        "pairs": pairs,
        "weakest": weakest,
        "model_card": MODEL_CARD,
    }
    return TEMPLATE.read_text(encoding="utf-8").format_map(fields)
