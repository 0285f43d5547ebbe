"""train: fit the model selected by `train.*` on the prepared split and save it (Keras format)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from wardrobe.common import (
    atomic_path,
    enable_determinism,
    load_split,
    read_dataset,
    run_main,
)
from wardrobe.distribute import (
    distribution_strategy,
    worker_name,
    writes_outputs,
)
from wardrobe.environment import choose_precision, compute_device, environment_record
from wardrobe.model.file import (
    Views,
    decide_flip,
    load_model,
    record_calibration,
    save_model,
)
from wardrobe.outputs import ENVIRONMENT_JSON, HISTORY_CSV, LIVE_DIR, MODEL_PATH, PREPARED_DIR
from wardrobe.params import TrainParams, load_section
from wardrobe.training import (
    fit,
    fit_calibration,
)


def main() -> None:
    params = load_section(TrainParams)
    enable_determinism()  # the pipeline's promise: same params, data and code, same bits
    strategy = distribution_strategy(params.strategy)  # first: it may set up a cluster
    dataset = read_dataset(PREPARED_DIR)  # its shape and classes are the model's
    classes = len(dataset.class_names)
    train = load_split(PREPARED_DIR, "train")
    val = load_split(PREPARED_DIR, "val")
    if not writes_outputs(strategy):
        # Another worker of a cluster: trains in lockstep with the chief, which writes the model.
        with tempfile.TemporaryDirectory() as scratch:
            fit(params, train, val, Path(scratch) / "history.csv", classes, verbose=2, strategy=strategy)
        print(f"train: {worker_name(strategy)} done; the chief writes {MODEL_PATH} and {HISTORY_CSV}")
        return
    device = compute_device()
    precision, reason = choose_precision(params.precision, device)
    print(f"train: computing in {precision} on {device.kind} {device.name}: {reason}")
    # All outputs are written to temp files and renamed only after a successful fit.
    with (
        atomic_path(HISTORY_CSV) as history_tmp,
        atomic_path(MODEL_PATH) as model_tmp,
        atomic_path(ENVIRONMENT_JSON) as environment_tmp,
    ):
        model = fit(params, train, val, history_tmp, classes, 2, strategy, precision, live_dir=LIVE_DIR)
        views = Views(decide_flip(bool(params.augment_flip), params.tta_flip), params.tta_shift)
        save_model(model, model_tmp, views, dataset)
        # Calibrated on the model as saved and loaded, outside any distribution strategy: under
        # several workers the model in memory would predict only this worker's share.
        record_calibration(model_tmp, *fit_calibration(load_model(model_tmp), train, val, views, params))
        record = environment_record(device, precision, reason, strategy.num_replicas_in_sync)
        environment_tmp.write_text(json.dumps(record, indent=2) + "\n")
    print(f"train: wrote {MODEL_PATH}, {HISTORY_CSV}, {ENVIRONMENT_JSON} and {LIVE_DIR}/")


if __name__ == "__main__":
    run_main(main)
