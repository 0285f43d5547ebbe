"""export: the trained model in the formats serving systems load (a SavedModel and an ONNX file),
each checked against Keras before it replaces the last; src/wardrobe/model/export.py has the
formats, their inputs and outputs, and the parity gate."""

from __future__ import annotations

import json

from wardrobe.common import atomic_dir, atomic_path, load_split, run_main
from wardrobe.model.export import (
    check_float32,
    check_parity,
    export_onnx,
    finish_onnx,
    graph_batch,
    parity,
    read_reference,
    saved_model_outputs,
    serving_model,
)
from wardrobe.model.file import (
    file_sha256,
    load_keras_classifier,
    load_onnx_classifier,
)
from wardrobe.outputs import (
    DIGITS,
    EXPORT_JSON,
    MODEL_PATH,
    ONNX_PATH,
    PREPARED_DIR,
    SAVED_MODEL_DIR,
    SERVING_VERSION,
    TEST_PROBS,
    accuracy,
)


def main() -> None:
    classifier = load_keras_classifier(MODEL_PATH)
    check_float32(classifier.model, MODEL_PATH)
    x_test, y_test = load_split(PREPARED_DIR, "test")
    model = serving_model(classifier)
    reference = read_reference(TEST_PROBS, len(x_test), len(classifier.record.class_names))
    views = len(classifier.views)
    graph_images = graph_batch(views)
    report: dict[str, object] = {
        "test_images": len(x_test),
        "tta_views": views,
        "keras_accuracy": round(accuracy(reference, y_test), DIGITS),
    }
    # All three are written beside their targets and replace them only once both formats passed.
    with (
        atomic_dir(SAVED_MODEL_DIR) as saved_tmp,
        atomic_path(ONNX_PATH) as onnx_tmp,
        atomic_path(EXPORT_JSON) as json_tmp,
    ):
        model.export(str(saved_tmp / SERVING_VERSION), format="tf_saved_model", verbose=False)
        export_onnx(model, onnx_tmp)
        opset = finish_onnx(onnx_tmp, classifier.record, file_sha256(MODEL_PATH))
        candidates = {
            "saved_model": saved_model_outputs(saved_tmp / SERVING_VERSION, x_test, graph_images),
            "onnx": load_onnx_classifier(onnx_tmp).classify(x_test, graph_images),
        }
        reference_flags = classifier.record.unlike_training(classifier.distances(x_test, graph_images))
        for name, (probs, distances) in candidates.items():
            stats = parity(reference, probs, reference_flags, classifier.record.unlike_training(distances))
            check_parity(name, stats)
            report[name] = {**stats, "accuracy": round(accuracy(probs, y_test), DIGITS)}
        report["onnx"]["opset"] = opset
        json_tmp.write_text(json.dumps(report, indent=2) + "\n")
    print(
        f"export: wrote {SAVED_MODEL_DIR}/{SERVING_VERSION} and {ONNX_PATH}; parity on {len(x_test)} test images: "
        + ", ".join(
            f"{name} top-1 {report[name]['top1_agreement']:.4%}, max diff {report[name]['max_abs_diff']:.1e}"
            for name in candidates
        )
    )


if __name__ == "__main__":
    run_main(main)
