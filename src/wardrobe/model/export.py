"""The exported formats (the export stage, stages/export.py, writes them), each checked against Keras.

- data/export/saved_model/1/: a TensorFlow SavedModel in TF Serving's versioned layout (model base
  path data/export/saved_model, version 1); signature `serving_default`.
- data/export/model.onnx: the same graph for ONNX Runtime (Keras' own exporter, which runs tf2onnx).

Both take `image`, float32 N×height×width in [0, 1], and return `probabilities`, float32 N×classes
(the prepared data's shape and class count), and `distance`, float32 N: how far each picture's
features are from the training images' (calibration.FeatureDensity; beyond the threshold the model
file records, the picture is unlike the training data). Both contain the test-time augmentation
the model file records (the mirrored and shifted views, averaged) and the temperature, so a served
model answers what evaluate measured, with no code on the client's side.

Parity: on every test image, each format must choose the Keras model's class (evaluate's
probabilities, data/predictions/test.npy: the Keras model runs the test images once) for at least
PARITY_TOP1 of them, give every probability within PARITY_ATOL of it, and flag the same pictures
as the Keras model's feature distances for at least PARITY_TOP1 of them (metrics/export.json keeps
the measured numbers). Otherwise the stage fails in one line and the previous export stays.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import keras
import numpy as np

from wardrobe.calibration import TINY
from wardrobe.common import WardrobeError
from wardrobe.model.file import (
    KerasClassifier,
    ModelRecord,
    feature_model,
    onnx_metadata,
)
from wardrobe.model.layers import FeatureDistance, TestTimeViews
from wardrobe.outputs import (
    MODEL_PATH,
    SERVING_DISTANCE,
    SERVING_INPUT,
    SERVING_OUTPUT,
    parity_problem,
)

# The exported graphs run all views of a call at once: images per call × views go through the model
# together. 500 keeps export's peak RSS near 1 GB at any view count (with 250 images × 10 views,
# a `tta_shift: 1` model's export peaked at 2.0 GB, docs/benchmarks.md round 6); 2 views → 250 images.
GRAPH_IMAGES_AT_ONCE = 500


def graph_batch(views: int) -> int:
    """Images per call of an exported graph that computes `views` views of each image at once."""
    return max(1, GRAPH_IMAGES_AT_ONCE // views)


def serving_model(classifier: KerasClassifier) -> keras.Model:
    """One graph: the views, the trained model on all of them at once, their mean probabilities,
    calibrated by the temperature the model file records (calibration.calibrate, in graph ops), and
    the feature distance of the unmoved view (calibration.FeatureDensity.distance)."""
    if classifier.density is None:
        raise WardrobeError(
            f"{MODEL_PATH}: the model file holds no feature density (an older train); `dvc repro train`"
        )
    views = classifier.views.offsets()
    shape, classes = classifier.record.image_shape, len(classifier.record.class_names)
    images = keras.Input(shape, name=SERVING_INPUT, dtype="float32")
    stacked = TestTimeViews(views)(images)
    features, probs = feature_model(classifier.model)(keras.ops.reshape(stacked, (-1, *shape)), training=False)
    mean = keras.ops.mean(keras.ops.reshape(probs, (len(views), -1, classes)), axis=0)
    if classifier.record.temperature != 1.0:
        log_p = keras.ops.log(keras.ops.maximum(mean, TINY)) / classifier.record.temperature
        mean = keras.ops.softmax(log_p, axis=-1)
    plain = keras.ops.reshape(features, (len(views), -1, features.shape[-1]))[0]  # offsets()[0]: the unmoved view
    distance = FeatureDistance(classifier.density.means, classifier.density.whitening)(plain)
    return keras.Model(images, {SERVING_OUTPUT: mean, SERVING_DISTANCE: distance}, name="serving")


def parity(
    reference: np.ndarray, probs: np.ndarray, reference_flags: np.ndarray, flags: np.ndarray
) -> dict[str, float]:
    """How closely `probs` and the unlike-the-training-data `flags` follow the Keras model's."""
    return {
        "top1_agreement": float(np.mean(reference.argmax(axis=1) == probs.argmax(axis=1))),
        "max_abs_diff": float(np.max(np.abs(reference.astype(np.float64) - probs))),
        "flag_agreement": float(np.mean(reference_flags == flags)),
    }


def check_parity(name: str, stats: dict[str, float]) -> None:
    if problem := parity_problem(name, stats):
        raise WardrobeError(f"export: {problem}; nothing was exported")


def export_onnx(model: keras.Model, path: Path) -> None:
    """Keras' ONNX export, the same bytes on every run. tf2onnx keeps nodes in sets of Node objects,
    which Python orders by memory address, and some of those orders become the graph's: its
    optimizers then choose and name differently from run to run (onnx/tensorflow-onnx #1789,
    #2006; each `dvc repro` here wrote a different model.onnx), and it lists an output's consumers
    from a set of names, in the order of Python's per-process string hashing. Hashing each Node by
    the order it was made in, and listing consumers by name, makes both the same every run."""
    import itertools

    from tf2onnx.graph import Graph, Node

    made = itertools.count()
    create, consumers = Node.__init__, Graph.find_output_consumers

    def numbered(node: Node, *args: object, **kwargs: object) -> None:
        node._made = next(made)
        create(node, *args, **kwargs)

    def consumers_by_name(graph: Graph, output_name: str) -> list[Node]:
        return sorted(consumers(graph, output_name), key=lambda node: node.name)

    Node.__init__, Node.__hash__ = numbered, lambda node: node._made
    Graph.find_output_consumers = consumers_by_name
    try:
        with warnings.catch_warnings():  # Keras' tf2onnx patch trips a NumPy FutureWarning
            warnings.simplefilter("ignore", FutureWarning)
            model.export(str(path), format="onnx", verbose=False)
    finally:
        Node.__init__, Node.__hash__ = create, object.__hash__
        Graph.find_output_consumers = consumers


def finish_onnx(path: Path, record: ModelRecord, source_sha256: str) -> int:
    """Call the ONNX graph's first input and output dimension `batch` (tf2onnx leaves `unk__N`),
    write the model file's record into its metadata (class names, photo fit, views: JSON values),
    so the file alone is enough to predict, and the SHA-256 of the model file it was exported from
    (wardrobe predict's auto runtime uses it only while it matches); return its opset."""
    import onnx

    graph_model = onnx.load(str(path))
    for value in (*graph_model.graph.input, *graph_model.graph.output):
        value.type.tensor_type.shape.dim[0].dim_param = "batch"
    onnx.helper.set_model_props(graph_model, onnx_metadata(record, source_sha256))
    onnx.save(graph_model, str(path))
    return next(op.version for op in graph_model.opset_import if op.domain in ("", "ai.onnx"))


def saved_model_outputs(directory: Path, x: np.ndarray, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """What TF Serving computes: the `serving_default` signature of the SavedModel in `directory`,
    its probabilities and distances."""
    import tensorflow as tf

    signature = tf.saved_model.load(str(directory)).signatures["serving_default"]
    batches = [signature(**{SERVING_INPUT: tf.constant(x[i : i + batch_size])}) for i in range(0, len(x), batch_size)]
    return tuple(
        np.concatenate([batch[name].numpy() for batch in batches]) for name in (SERVING_OUTPUT, SERVING_DISTANCE)
    )


def read_reference(path: Path, images: int, classes: int) -> np.ndarray:
    """The Keras model's probabilities of the test images, as evaluate computed them (the views
    and the temperature the model file records): what each exported format must reproduce."""
    try:
        reference = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise WardrobeError(f"{path}: not found; run the evaluate stage first (`dvc repro evaluate`)") from None
    except (OSError, ValueError) as exc:
        raise WardrobeError(f"{path}: cannot load evaluate's test probabilities: {exc}") from exc
    if reference.shape != (images, classes):
        raise WardrobeError(
            f"{path}: {reference.shape} probabilities, not the {images} test images × {classes} classes; "
            "run `dvc repro evaluate`"
        )
    return reference


def check_float32(model: keras.Model, path: Path) -> None:
    """ONNX Runtime's CPU kernels have no bfloat16 convolution (the graph fails to load), and a
    float32 copy would not match what evaluate measured: refuse before exporting anything."""
    compute = sorted({layer.dtype_policy.compute_dtype for layer in model.layers} - {"float32"})
    if compute:
        raise WardrobeError(
            f"{path}: the model computes in {', '.join(compute)}, which ONNX Runtime cannot run on a CPU; "
            "export needs a float32 model: train with train.precision=float32 (the cnn default)"
        )
