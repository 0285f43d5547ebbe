"""Accuracy-per-minute exploration: train variants of a recipe on the prepared data, log val/test.

Usage: python -m bench.explore OUT.jsonl '{"epochs": 20, "augment_flip": true}' ...
Selection is by val accuracy; test accuracy is logged only to report it, never to choose.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from wardrobe.common import enable_determinism, load_split, read_dataset
from wardrobe.model.file import Views, shifted
from wardrobe.outputs import PREPARED_DIR
from wardrobe.params import TrainParams, load_section
from wardrobe.training import fit


def view_accuracies(per_view: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Accuracy at no views, flip views (2), all 10 views, and the 10 views weighted as airbench
    weights them (TTA weighting): the unmoved pair half of the vote, the 8 moved views the other.

    per_view: V×N×classes, in Views(True, 1).offsets() order (the unmoved image and its mirror
    first), so every setting comes from one inference per view.
    """
    settings = {
        "": per_view[0],
        "_tta": per_view[:2].mean(0),
        "_tta10": per_view.mean(0),
        "_tta10w": 0.5 * per_view[:2].mean(0) + 0.5 * per_view[2:].mean(0),
    }
    return {suffix: float(np.mean(probs.argmax(1) == labels)) for suffix, probs in settings.items()}


def run_variant(base: TrainParams, overrides: dict, data: dict, probs_path: Path) -> dict:
    params = dataclasses.replace(base, **{k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()})
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        model = fit(params, data["train"], data["val"], Path(tmp) / "h.csv", data["classes"], verbose=0)
        seconds = time.perf_counter() - start
        history = (Path(tmp) / "h.csv").read_text()
    result = {"overrides": overrides, "train_s": round(seconds, 1), "params": model.count_params()}
    views = Views(flip=True, shift=1).offsets()
    per_view = {}
    for split in ("val", "test"):
        x, y = data[split]
        moved = ((shifted(x, dy, dx) if dy or dx else x, mirror) for dy, dx, mirror in views)
        per_view[split] = np.stack(
            [model.predict(view[:, :, ::-1] if mirror else view, batch_size=1024, verbose=0) for view, mirror in moved]
        )
        for suffix, accuracy in view_accuracies(per_view[split], y).items():
            result[f"{split}_acc{suffix}"] = accuracy
    # Every view's probabilities, so another way of combining them can be scored without training.
    np.savez_compressed(probs_path, **per_view)
    result["probs"] = str(probs_path)
    result["history"] = history
    return result


def main() -> None:
    out = Path(sys.argv[1])
    enable_determinism()  # the numbers must be reproducible, as in the pipeline
    base = load_section(TrainParams)
    data = {split: load_split(PREPARED_DIR, split) for split in ("train", "val", "test")}
    data["classes"] = len(read_dataset(PREPARED_DIR).class_names)
    for spec in sys.argv[2:]:
        probs_path = out.with_name(f"{out.stem}-{time.strftime('%Y%m%dT%H%M%S')}.npz")
        result = run_variant(base, json.loads(spec), data, probs_path)
        with out.open("a") as handle:
            handle.write(json.dumps(result) + "\n")
        print({k: v for k, v in result.items() if k != "history"}, flush=True)


if __name__ == "__main__":
    main()
