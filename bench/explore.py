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

from stages.common import enable_determinism, load_split
from stages.modelfile import Views, predict_proba
from stages.outputs import PREPARED_DIR
from stages.params import TrainParams, load_section
from stages.train import fit


def run_variant(base: TrainParams, overrides: dict, data: dict) -> dict:
    params = dataclasses.replace(base, **{k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()})
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        model = fit(params, data["train"], data["val"], Path(tmp) / "h.csv", verbose=0)
        seconds = time.perf_counter() - start
        history = (Path(tmp) / "h.csv").read_text()
    result = {"overrides": overrides, "train_s": round(seconds, 1), "params": model.count_params()}
    # No TTA, flip-TTA (2 views), flip + 1 px shifts (10 views): what tta_flip / tta_shift choose.
    for suffix, flip, shift in (("", False, 0), ("_tta", True, 0), ("_tta10", True, 1)):
        for split in ("val", "test"):
            x, y = data[split]
            probs = predict_proba(model, x, 1024, Views(flip, shift))
            result[f"{split}_acc{suffix}"] = float(np.mean(probs.argmax(1) == y))
    result["history"] = history
    return result


def main() -> None:
    out = Path(sys.argv[1])
    enable_determinism()  # the numbers must be reproducible, as in the pipeline
    base = load_section(TrainParams)
    data = {split: load_split(PREPARED_DIR, split) for split in ("train", "val", "test")}
    for spec in sys.argv[2:]:
        result = run_variant(base, json.loads(spec), data)
        with out.open("a") as handle:
            handle.write(json.dumps(result) + "\n")
        print({k: v for k, v in result.items() if k != "history"}, flush=True)


if __name__ == "__main__":
    main()
