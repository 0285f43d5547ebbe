"""evaluate: score the trained model on the held-out test set; write metrics, plot CSVs, pictures."""

from __future__ import annotations

import numpy as np

from wardrobe.calibration import calibrate, scrambled
from wardrobe.common import (
    atomic_path,
    load_split,
    read_csv,
    run_main,
    write_json_atomic,
)
from wardrobe.evaluation import (
    OOD_IMAGES,
    confusion_rows,
    plot_confusion_matrix,
    plot_predictions,
    plot_reliability,
    plot_training_curves,
    write_csv,
)
from wardrobe.model.file import load_keras_classifier
from wardrobe.outputs import (
    CALIBRATION_CSV,
    CONFUSION_CSV,
    CONFUSION_PNG,
    CURVES_PNG,
    HISTORY_CSV,
    METRICS_PATH,
    MODEL_PATH,
    PER_CLASS_CSV,
    PREDICTIONS_PNG,
    PREPARED_DIR,
    RELIABILITY_PNG,
    TEST_PROBS,
    Predictions,
    compute_metrics,
    confusion_matrix,
    reliability_rows,
)
from wardrobe.params import EvaluateParams, load_section


def main() -> None:
    params = load_section(EvaluateParams)
    classifier = load_keras_classifier(MODEL_PATH)
    record = classifier.record
    x_test, y_test = load_split(PREPARED_DIR, "test")
    x_val, y_val = load_split(PREPARED_DIR, "val")
    test_raw = classifier.predict_uncalibrated(x_test, params.batch_size)
    test_probs = calibrate(test_raw, record.temperature)
    val_probs = classifier.predict_proba(x_val, params.batch_size)
    test_distances = classifier.distances(x_test, params.batch_size)
    ood_distances = classifier.distances(scrambled(x_test[:OOD_IMAGES]), params.batch_size)
    y_pred = test_probs.argmax(axis=1)
    history = read_csv(HISTORY_CSV)

    names = record.class_names
    predictions = Predictions(
        test_probs,
        y_test,
        val_probs,
        y_val,
        names,
        test_raw,
        record.temperature,
        record.distance_threshold,
        test_distances,
        ood_distances,
    )
    metrics = compute_metrics(predictions)
    cm = confusion_matrix(y_test, y_pred, len(names))
    write_csv(confusion_rows(y_test, y_pred, names), CONFUSION_CSV)
    write_csv(predictions.per_class(), PER_CLASS_CSV)
    rows = reliability_rows(predictions)
    write_csv(rows, CALIBRATION_CSV)
    plot_training_curves(history, CURVES_PNG)
    plot_confusion_matrix(cm, names, CONFUSION_PNG)
    plot_predictions(x_test[: params.example_grid**2], y_test, y_pred, names, params.example_grid, PREDICTIONS_PNG)
    plot_reliability(rows, RELIABILITY_PNG)
    with atomic_path(TEST_PROBS) as tmp, open(tmp, "wb") as handle:
        np.save(handle, test_probs.astype(np.float32), allow_pickle=False)
    write_json_atomic(METRICS_PATH, metrics)  # last: its presence means the rest is complete
    print(
        f"evaluate: test accuracy {metrics['accuracy']:.4f}, macro-F1 {metrics['macro_f1']:.4f}, "
        f"ECE {metrics['ece_uncalibrated']:.4f} → {metrics['ece']:.4f} (temperature {record.temperature:g}); "
        f"flag: {metrics['accepted']:.1%} of test images pass, {metrics['ood_rejected']:.1%} of scrambled ones flagged"
    )


if __name__ == "__main__":
    run_main(main)
