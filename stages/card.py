"""card: metrics/model_card.md, the model card of this run, for whoever gets the artifact.

Every number in it is read from the run's own files (params.yaml, the prepared splits, the model
file's metadata, metrics/*.json, plots/*.csv), so it cannot disagree with them; no dates, so the
same run writes the same bytes. It needs neither TensorFlow nor ONNX Runtime, so it is cheap to
re-run when only its wording changes.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from stages.common import FLIP_TTA_KEY, SHIFT_TTA_KEY, SPLITS, WardrobeError, run_main, tta_views, write_text_atomic
from stages.outputs import (
    CONFUSION_CSV,
    ENVIRONMENT_JSON,
    EXPORT_JSON,
    METRICS_PATH,
    MODEL_CARD,
    MODEL_PATH,
    ONNX_PATH,
    PER_CLASS_CSV,
    PREPARED_DIR,
    SAVED_MODEL_DIR,
)
from stages.params import PARAMS_FILE, PrepareParams, TrainParams, load_section

ARTIFACT = "fashion-classifier"
TOP_CONFUSIONS = 5


@dataclass(frozen=True)
class Run:
    """Everything the card states, as read from the run's files."""

    prepare: PrepareParams
    train: TrainParams
    recipe: dict  # params.yaml's train section as written (validated as `train`)
    split_sizes: dict[str, int]
    model_md5: str
    tta: dict[str, int | bool]
    metrics: dict
    per_class: pd.DataFrame
    confusion: pd.DataFrame
    environment: dict
    export: dict


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise WardrobeError(f"{path}: not found; run `dvc repro` to produce it") from None
    except (OSError, ValueError) as exc:
        raise WardrobeError(f"{path}: cannot read JSON: {exc}") from exc


def read_csv(path: Path) -> pd.DataFrame:
    try:
        return pd.read_csv(path)
    except FileNotFoundError:
        raise WardrobeError(f"{path}: not found; run `dvc repro` to produce it") from None
    except (OSError, ValueError) as exc:
        raise WardrobeError(f"{path}: cannot read CSV: {exc}") from exc


def model_facts(path: Path) -> tuple[str, dict[str, int | bool]]:
    """The file's MD5 (DVC's hash of it, as in dvc.lock) and the test-time augmentation it records."""
    try:
        data = path.read_bytes()
        with zipfile.ZipFile(path) as archive:
            metadata = json.loads(archive.read("metadata.json"))
    except FileNotFoundError:
        raise WardrobeError(f"{path}: model file not found; run the train stage first") from None
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as exc:
        raise WardrobeError(f"{path}: cannot read the model's metadata: {exc}") from exc
    flip, shift = bool(metadata.get(FLIP_TTA_KEY, False)), int(metadata.get(SHIFT_TTA_KEY, 0))
    return hashlib.md5(data).hexdigest(), {"flip": flip, "shift": shift, "views": len(tta_views(flip, shift))}


def read_run() -> Run:
    prepare, train = load_section(PrepareParams), load_section(TrainParams)  # a params error first
    sizes = {}
    for split in SPLITS:
        try:
            sizes[split] = int(np.load(PREPARED_DIR / f"y_{split}.npy", mmap_mode="r").shape[0])
        except (OSError, ValueError) as exc:
            raise WardrobeError(f"{PREPARED_DIR}: cannot read the {split} labels: {exc}") from exc
    md5, tta = model_facts(MODEL_PATH)
    return Run(
        prepare=prepare,
        train=train,
        recipe=yaml.safe_load(PARAMS_FILE.read_text(encoding="utf-8"))["train"],
        split_sizes=sizes,
        model_md5=md5,
        tta=tta,
        metrics=read_json(METRICS_PATH),
        per_class=read_csv(PER_CLASS_CSV),
        confusion=read_csv(CONFUSION_CSV),
        environment=read_json(ENVIRONMENT_JSON),
        export=read_json(EXPORT_JSON),
    )


def confused_pairs(confusion: pd.DataFrame, top: int = TOP_CONFUSIONS) -> pd.DataFrame:
    """The most frequent (actual, predicted) mistakes of the test set, from confusion.csv's rows."""
    mistakes = confusion[confusion["actual"] != confusion["predicted"]]
    counts = mistakes.groupby(["actual", "predicted"]).size().rename("count").reset_index()
    return counts.sort_values(["count", "actual", "predicted"], ascending=[False, True, True]).head(top)


def table(header: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows])


def render(run: Run) -> str:
    """The card's markdown: a pure function of the run, so tests can recompute it."""
    m, env, exp = run.metrics, run.environment, run.export
    top_pairs = confused_pairs(run.confusion)  # the table, and its first row in the limitations
    per_class = table(
        ["class", "precision", "recall", "F1", "test images"],
        [
            [row["class"], f"{row['precision']:.4f}", f"{row['recall']:.4f}", f"{row['f1']:.4f}", int(row["support"])]
            for _, row in run.per_class.iterrows()
        ],
    )
    pairs = table(
        ["actual", "predicted as", "test images"],
        [[row["actual"], row["predicted"], int(row["count"])] for _, row in top_pairs.iterrows()],
    )
    formats = table(
        ["format", "path", "signature / input → output", "top-1 = Keras", "max probability difference"],
        [
            ["Keras 3", f"`{MODEL_PATH}`", "`Model.predict` on `image` → probabilities; views applied by the caller "
             "(`stages.common.load_classifier`)", "—", "—"],
            ["TensorFlow SavedModel", f"`{SAVED_MODEL_DIR}/1/`", "`serving_default`: `image` → `probabilities`",
             f"{exp['saved_model']['top1_agreement']:.2%}", f"{exp['saved_model']['max_abs_diff']:.1e}"],
            [f"ONNX (opset {exp['onnx']['opset']})", f"`{ONNX_PATH}`", "`image` → `probabilities`",
             f"{exp['onnx']['top1_agreement']:.2%}", f"{exp['onnx']['max_abs_diff']:.1e}"],
        ],
    )  # fmt: skip
    hashes = "\n".join(f"  - `{name}`: `{digest}`" for name, digest in run.prepare.sha256.items())
    views = (
        f"{run.tta['views']} views (the image"
        + (f", moved {run.tta['shift']} px up, down, left and right" if run.tta["shift"] else "")
        + (", each also mirrored left-right" if run.tta["flip"] else "")
        + "), probabilities averaged"
    )
    sizes = run.split_sizes
    most_often = (
        f", most often {top_pairs.iloc[0]['actual']} as {top_pairs.iloc[0]['predicted']}" if len(top_pairs) else ""
    )
    weakest = ", ".join(
        f"{row['class']} (F1 {row['f1']:.3f})" for _, row in run.per_class.nsmallest(3, "f1").iterrows()
    )
    return f"""# Model card: `{ARTIFACT}`

_Written by the pipeline's `card` stage (`python -m stages.card`) from this run's own files; do not
edit it by hand, re-run `dvc repro`._

## What it is

A {run.train.arch} classifier of Fashion-MNIST clothing images into 10 classes, trained by
[wardrobe](../README.md). Test accuracy **{m["accuracy"]:.4f}**, macro-F1 **{m["macro_f1"]:.4f}** on the
{sizes["test"]:,} Fashion-MNIST test images, with test-time augmentation: {views}.
The model file is `{MODEL_PATH}` (MD5 `{run.model_md5}`, DVC's hash of it in `dvc.lock`).

## Intended use

- Classifying single garment images that look like Fashion-MNIST: one centered article of
  clothing, footwear or bag, photographed alone, in grayscale.
- Teaching, benchmarking and testing ML tooling (training, reproducing, serving, monitoring).

## Out of scope

- Photos of people wearing clothes, several items per picture, street or catalogue scenes.
- Classes beyond the ten below: anything else is still given one of them, often confidently.
- Decisions about people, and any use where a wrong class has a cost: {1 - m["accuracy"]:.1%} of the
  test images are misclassified{most_often}.

## Input contract

- `image`: float32, shape N×28×28, values in [0, 1]; a light garment on a black background
  (0 = background), centered, as in Fashion-MNIST (pixels / 255 of the 8-bit images).
- Output `probabilities`: float32, N×10, in the class order of the table below.
- `wardrobe-predict` makes other pictures fit: any size and format PIL reads, colour or
  transparent; it converts to grayscale, inverts a light background, crops to the garment,
  scales its longer side to 28 px and centers it. Pictures far from Fashion-MNIST's look still
  get a class, with lower accuracy than measured here.

## Formats and parity

Every format contains the test-time augmentation, so each gives the numbers of this card. Parity
is measured by the `export` stage on all {exp["test_images"]:,} test images against the Keras model
(the stage fails if top-1 agreement drops below 99.95 % or any probability differs by more
than 1e-4):

{formats}

Serve the SavedModel with TF Serving (`--model_base_path=$PWD/{SAVED_MODEL_DIR}`), or the ONNX file
with ONNX Runtime: `wardrobe-predict --runtime onnx IMAGE...` needs no TensorFlow
(README "Serving the model").

## Training data

- Fashion-MNIST (Zalando Research, MIT licence): 70,000 28×28 grayscale images of 10 classes.
- The four files, verified by SHA-256 of their decompressed bytes before use:
{hashes}
- Splits: {sizes["train"]:,} training, {sizes["val"]:,} validation (a stratified
  {run.prepare.val_fraction:.0%} of the training file, split seed {run.prepare.seed}), {sizes["test"]:,} test
  (the test file, used only for these numbers).

## Recipe

The resolved `train` parameters (params.yaml); training seed {run.train.seed}:

```yaml
{yaml.safe_dump(run.recipe, sort_keys=False).rstrip()}
```

## Environment

| | |
|---|---|
| Python | {env["python"]} |
| TensorFlow | {env["tensorflow"]} |
| Keras | {env["keras"]} |
| NumPy | {env["numpy"]} |
| device | {env["device"]} {env["device_name"]} × {env["replicas"]} |
| precision | {env["precision"]} ({env["precision_reason"]}) |
| CPU kernels | {env.get("kernels", "not recorded")} |

## Results

Test accuracy {m["accuracy"]:.4f}, macro-F1 {m["macro_f1"]:.4f}, test loss {m["loss"]:.4f};
validation accuracy {m["val_accuracy"]:.4f}.

{per_class}

Most confused pairs on the test set:

{pairs}

## Known limitations

- Fashion-MNIST's images are centered, size-normalized product photos on a plain background;
  accuracy on real-world pictures is lower and not measured here.
- The weakest classes are {weakest}: at 28×28, garments of similar
  shape differ in details the images barely keep.
- Probabilities are not calibrated (no temperature scaling): treat them as scores.
- The numbers come from one training seed (`train.seed`); other seeds give somewhat different
  numbers, and that spread is not part of this card.

## Reproduce

Check out the commit that contains this card (`git log -n1 -- {MODEL_CARD}`), then
`dvc pull` to fetch this exact model, or `make repro` to train it again: same params, data and
code give the same metrics and the same model file (MD5 above) on the same machine.
"""


def main() -> None:
    write_text_atomic(MODEL_CARD, render(read_run()))
    print(f"card: wrote {MODEL_CARD}")


if __name__ == "__main__":
    run_main(main)
