"""The export stage and `wardrobe predict --runtime onnx`, on the tiny real run (conftest's
`tiny_run`: its model records 10 views, so the exported graphs carry them and parity covers them).
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.conftest import FASHION_RECORD, REPO, module_env, run_module, sh
from wardrobe.common import WardrobeError
from wardrobe.model.file import KerasClassifier, Views, load_keras_classifier, load_model
from wardrobe.outputs import EXPORT_JSON, MODEL_CARD, MODEL_PATH, ONNX_PATH, SAVED_MODEL_DIR


def keras_probs(work: Path) -> np.ndarray:
    return load_keras_classifier(work / MODEL_PATH).predict_proba(np.load(work / "data/prepared/x_test.npy"), 64)


@pytest.mark.parametrize(
    ("views", "images"),
    [(1, 500), (2, 250), (10, 50), (501, 1)],  # 2 views: 250 images a call, as before round 6
)
def test_parity_batches_keep_the_images_through_an_exported_graph_bounded(views: int, images: int) -> None:
    from wardrobe.model.export import graph_batch

    assert graph_batch(views) == images


def test_a_bfloat16_model_is_refused_in_one_line_before_anything_is_exported() -> None:
    import keras

    from wardrobe.model.export import check_float32
    from wardrobe.training import dtype_policy

    with dtype_policy("mixed_bfloat16"):
        inputs = keras.Input((28, 28))
        model = keras.Model(inputs, keras.layers.Dense(10)(keras.layers.Flatten()(inputs)))
    with pytest.raises(WardrobeError, match=r"^m\.keras: the model computes in bfloat16, which ONNX Runtime cannot"):
        check_float32(model, Path("m.keras"))
    plain = keras.Input((28, 28))
    check_float32(keras.Model(plain, keras.layers.Dense(10)(keras.layers.Flatten()(plain))), Path("m.keras"))


@pytest.mark.pipeline
def test_both_formats_match_keras_within_the_stated_parity(tiny_run: Path) -> None:
    import onnxruntime
    import tensorflow as tf

    report = json.loads((tiny_run / EXPORT_JSON).read_text())
    reference = keras_probs(tiny_run)
    assert report["test_images"] == len(reference) == 40 and report["tta_views"] == 10
    x_test = np.load(tiny_run / "data/prepared/x_test.npy")

    session = onnxruntime.InferenceSession(str(tiny_run / ONNX_PATH), providers=["CPUExecutionProvider"])
    (image,) = session.get_inputs()
    assert (image.name, image.shape, image.type) == ("image", ["batch", 28, 28], "tensor(float)")
    outputs = {output.name: output.shape for output in session.get_outputs()}
    assert outputs == {"probabilities": ["batch", 10], "distance": ["batch"]}
    onnx_probs = session.run(["probabilities"], {"image": x_test})[0]

    signature = tf.saved_model.load(str(tiny_run / SAVED_MODEL_DIR / "1")).signatures["serving_default"]
    saved_probs = signature(image=tf.constant(x_test))["probabilities"].numpy()

    for name, probs in (("onnx", onnx_probs), ("saved_model", saved_probs)):
        difference = float(np.abs(probs - reference).max())
        assert difference <= 1e-4, name
        assert (probs.argmax(1) == reference.argmax(1)).all(), name
        assert report[name]["top1_agreement"] == 1.0 and report[name]["flag_agreement"] == 1.0
        assert report[name]["max_abs_diff"] == pytest.approx(difference, abs=1e-6)
    # The views matter: without them the model's own output is further from the TTA answer.
    assert np.abs(load_model(tiny_run / MODEL_PATH).predict(x_test, verbose=0) - onnx_probs).max() > 1e-3


@pytest.mark.pipeline
def test_a_graph_that_breaks_parity_is_refused_and_the_previous_export_stays(
    tiny_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real fault, not a fake: a serving graph without the views the model file records."""
    import keras

    import stages.export

    work = tmp_path / "w"
    shutil.copytree(tiny_run, work)
    before = {p: p.read_bytes() for p in (work / "data/export").rglob("*") if p.is_file()}
    before[work / EXPORT_JSON] = (work / EXPORT_JSON).read_bytes()
    monkeypatch.chdir(work)

    serving_model = stages.export.serving_model

    def without_views(classifier: KerasClassifier) -> keras.Model:
        record = dataclasses.replace(classifier.record, views=Views(flip=False))
        return serving_model(dataclasses.replace(classifier, record=record))

    monkeypatch.setattr(stages.export, "serving_model", without_views)
    with pytest.raises(WardrobeError) as error:
        stages.export.main()
    assert re.fullmatch(
        r"export: saved_model disagrees with the Keras model on the test images: top-1 agreement \d+\.\d{4}% "
        r"\(needs 99\.95%\), largest probability difference \d\.\d\de-\d\d \(allowed 1e-04\), "
        r"unlike-the-training-data flags agreeing 100\.0000% \(needs 99\.95%\); nothing was exported",
        str(error.value),
    )
    after = {p: p.read_bytes() for p in (work / "data/export").rglob("*") if p.is_file()}
    after[work / EXPORT_JSON] = (work / EXPORT_JSON).read_bytes()
    assert after == before  # no temp files left either


@pytest.mark.pipeline
def test_the_model_file_opens_in_plain_keras_with_the_cards_lines(tiny_run: Path, tmp_path: Path) -> None:
    """The card's Python block, run where wardrobe is not importable (only Keras reads the file,
    default safe mode): every layer is Keras' own and the probabilities are wardrobe's loader's."""
    card = (tiny_run / MODEL_CARD).read_text()
    block = re.search(r"```python\n(.*?)```", card, re.DOTALL)
    assert block and 'keras.models.load_model("data/model/model.keras")' in block.group(1), card
    script = "\n".join(
        [
            "import sys",
            'sys.modules["stages"] = None  # wardrobe cannot be imported',
            "import numpy as np",
            f"images = np.load({str(tiny_run / 'data/prepared/x_test.npy')!r})",
            block.group(1),
            f"np.save({str(tmp_path / 'plain.npy')!r}, probabilities)",
            'print(", ".join(sorted({type(layer).__module__.split(".")[0] for layer in model.layers})))',
        ]
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tiny_run)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "keras"  # every layer is Keras' own
    expected = load_model(tiny_run / MODEL_PATH).predict(np.load(tiny_run / "data/prepared/x_test.npy"), verbose=0)
    np.testing.assert_array_equal(np.load(tmp_path / "plain.npy"), expected)


@pytest.mark.pipeline
def test_onnx_predict_gives_the_keras_answers_on_the_exported_pngs(tiny_run: Path) -> None:
    runs = {
        runtime: run_module("wardrobe", "predict", "pngs", "--json", "--runtime", runtime, cwd=tiny_run)
        for runtime in ("keras", "onnx")
    }
    answers = {}
    for runtime, result in runs.items():
        assert result.returncode == 0, result.stderr
        answers[runtime] = [json.loads(line)["top_k"][0] for line in result.stdout.splitlines()]
    assert [a["class"] for a in answers["onnx"]] == [a["class"] for a in answers["keras"]]
    assert [a["class"] for a in answers["onnx"]] == pd.read_csv(tiny_run / "plots/confusion.csv")["predicted"].tolist()
    for onnx_answer, keras_answer in zip(answers["onnx"], answers["keras"], strict=True):
        assert onnx_answer["probability"] == pytest.approx(keras_answer["probability"], abs=2e-6)


@pytest.mark.pipeline
@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "error: {path}: ONNX model not found; run `dvc repro export` (or dvc pull) first"),
        (b"not an onnx file", "error: {path}: cannot load ONNX model: "),
        (
            "wrong-shape",
            "error: {path}: ONNX model maps x tensor(float) ['n', 3] → y ['n', 3], expected float N×28×28 to "
            "probabilities N×10 and distance N (re-export it: `dvc repro export`)",
        ),
        ("no-record", "error: {path}: the model file records no class names, image shape or views"),
    ],
)
def test_bad_or_missing_onnx_files_fail_in_one_line(
    tiny_run: Path, tmp_path: Path, content: bytes | str | None, message: str
) -> None:
    path = tmp_path / "model.onnx"
    if content in ("wrong-shape", "no-record"):
        import onnx
        from onnx import TensorProto, helper

        value = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3])
        out = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])
        graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [value], [out])
        graph_model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
        if content == "wrong-shape":  # a record like export writes, for Fashion-MNIST's 28×28 and 10 classes
            helper.set_model_props(graph_model, {k: json.dumps(v) for k, v in FASHION_RECORD.metadata().items()})
        onnx.save(graph_model, str(path))
    elif content is not None:
        path.write_bytes(content)
    result = run_module("wardrobe", "predict", "pngs/000.png", "--model", str(path), cwd=tiny_run)
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.startswith(message.format(path=path))
    assert result.stderr.count("\n") == 1


@pytest.mark.pipeline
def test_predict_runs_without_tensorflow_in_the_documented_install(tiny_run: Path, tmp_path: Path) -> None:
    """`make venv-serve`: requirements-serve.lock and the project without its dependencies."""
    venv = tmp_path / "serve"
    result = sh(REPO, "make", "venv-serve", f"SERVE_VENV={venv}", check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    python = venv / "bin/python"
    missing = subprocess.run([python, "-c", "import tensorflow"], capture_output=True, text=True)
    assert "No module named 'tensorflow'" in missing.stderr
    for module in ("keras", "pandas", "tf2onnx"):
        assert subprocess.run([python, "-c", f"import {module}"], capture_output=True).returncode == 1, module
    # `pip install .` puts one package on the path, wardrobe; the stages stay in the checkout
    installed = subprocess.run(
        [python, "-c", "import importlib.util as u; print(bool(u.find_spec('wardrobe')), bool(u.find_spec('stages')))"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert installed.stdout.split() == ["True", "False"], installed.stderr

    # auto picks onnx (TensorFlow is missing) and data/export/model.onnx
    served = subprocess.run([venv / "bin/wardrobe", "predict", "pngs"], cwd=tiny_run, capture_output=True, text=True)
    assert served.returncode == 0, served.stderr
    expected = pd.read_csv(tiny_run / "plots/confusion.csv")["predicted"].tolist()
    assert [line.split(": ")[1].split(" (")[0] for line in served.stdout.splitlines()] == expected
    refused = subprocess.run(
        [venv / "bin/wardrobe", "predict", "pngs", "--runtime", "keras"], cwd=tiny_run, capture_output=True, text=True
    )
    assert refused.returncode == 1
    assert refused.stderr == (
        "error: TensorFlow is not installed, so --runtime keras cannot run; "
        "use --runtime onnx (data/export/model.onnx)\n"
    )


@pytest.mark.pipeline
def test_the_recorded_temperature_is_inside_the_exported_graphs(tiny_run: Path) -> None:
    """train fitted a temperature on the validation split and recorded it with the distance
    threshold; the ONNX file carries both in its metadata and applies the temperature in its graph
    (the SavedModel's parity with the calibrated Keras answers is the test above): same top-1
    answers, other probabilities. Its distances are the Keras classifier's (the model file's
    density, as constants in the graph), and 95 % of validation stays within the threshold."""
    from wardrobe.calibration import calibrate
    from wardrobe.model.file import load_onnx_classifier

    keras_classifier = load_keras_classifier(tiny_run / MODEL_PATH)
    record = keras_classifier.record
    assert record.temperature != 1.0 and record.distance_threshold > 0 and keras_classifier.density is not None
    onnx_classifier = load_onnx_classifier(tiny_run / ONNX_PATH)
    assert onnx_classifier.record == record
    x_test = np.load(tiny_run / "data/prepared/x_test.npy")
    uncalibrated = keras_classifier.predict_uncalibrated(x_test, 64)
    served = onnx_classifier.predict_proba(x_test, 64)
    np.testing.assert_allclose(served, calibrate(uncalibrated, record.temperature), atol=1e-4)
    assert np.abs(served - uncalibrated).max() > 1e-3
    assert (served.argmax(axis=1) == uncalibrated.argmax(axis=1)).all()
    _, served_distances = onnx_classifier.classify(x_test, 64)
    np.testing.assert_allclose(served_distances, keras_classifier.distances(x_test, 64), rtol=1e-4)
    x_val = np.load(tiny_run / "data/prepared/x_val.npy")
    within = np.mean(onnx_classifier.classify(x_val, 64)[1] <= record.distance_threshold)
    assert within == pytest.approx(0.95, abs=1 / len(x_val) + 1e-6)


# A small convolutional graph with two views, the shape of the served one: tf2onnx's transpose
# optimizer works on it, which is where its run-to-run differences came from.
TOY_EXPORT = """
import sys
from pathlib import Path

import wardrobe  # noqa: F401  (oneDNN as the stages have it)
import keras
import numpy as np

from wardrobe.model.export import export_onnx

keras.utils.set_random_seed(0)
x = keras.Input((16, 16, 1), name="image")
views = keras.ops.concatenate([x, keras.ops.flip(x, axis=2)], axis=0)
h = keras.layers.Conv2D(8, 3, padding="same")(views)
h = keras.layers.ReLU()(keras.layers.BatchNormalization()(h, training=False))
h = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(keras.layers.MaxPooling2D()(h))
features = keras.layers.GlobalAveragePooling2D()(h)
probs = keras.ops.mean(keras.ops.reshape(keras.layers.Dense(5, activation="softmax")(features), (2, -1, 5)), axis=0)
distance = keras.ops.sum(keras.ops.square(keras.ops.reshape(features, (2, -1, 8))[0]), axis=-1)
model = keras.Model(x, {"probabilities": probs, "distance": distance})
model(np.zeros((1, 16, 16, 1), "float32"))
export_onnx(model, Path(sys.argv[1]))
"""


@pytest.mark.pipeline  # TensorFlow in subprocesses
def test_the_onnx_export_writes_the_same_bytes_in_every_process(tmp_path: Path) -> None:
    """Two processes with different string hashing (as two `dvc repro` runs have) export the same
    graph to the same bytes: tf2onnx alone did not (src/wardrobe/model/export.py, export_onnx)."""
    script = tmp_path / "toy_export.py"
    script.write_text(TOY_EXPORT)
    files = []
    for seed in ("1", "2"):
        target = tmp_path / f"toy-{seed}.onnx"
        command = [sys.executable, str(script), str(target)]
        env = module_env(PYTHONHASHSEED=seed)
        result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        files.append(target.read_bytes())
    assert len(files[0]) > 1000 and files[0] == files[1]
