"""The export stage, the card stage and `wardrobe-predict --runtime onnx`, on a tiny real run.

The tiny model is re-saved with flip and 1-px shift views recorded (what train writes for
tta_flip: always, tta_shift: 1), so the exported graphs carry 10 views and parity covers them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from stages.common import WardrobeError, load_classifier, load_model, shifted, tta_views
from stages.outputs import EXPORT_JSON, METRICS_PATH, MODEL_CARD, MODEL_PATH, ONNX_PATH, PER_CLASS_CSV, SAVED_MODEL_DIR
from tests.conftest import REPO, run_module, sh, write_params


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory, idx_source: tuple[Path, dict[str, str]]) -> Path:
    """A tiny project after prepare, train (10 views recorded), evaluate, export and card."""
    from stages.train import save_model
    from tests.conftest import tiny_params

    work = tmp_path_factory.mktemp("export")
    write_params(work, tiny_params(*idx_source))
    for stage in ("prepare", "train"):
        assert run_module(f"stages.{stage}", cwd=work).returncode == 0
    save_model(load_model(work / MODEL_PATH), work / MODEL_PATH, True, 1)
    for stage in ("evaluate", "export", "card"):
        result = run_module(f"stages.{stage}", cwd=work)
        assert result.returncode == 0, result.stderr
    x_test = np.load(work / "data/prepared/x_test.npy")
    (work / "pngs").mkdir()
    for i, image in enumerate(x_test):
        Image.fromarray(np.round(image * 255).astype(np.uint8)).save(work / f"pngs/{i:03d}.png")
    return work


def keras_probs(work: Path) -> np.ndarray:
    return load_classifier(work / MODEL_PATH).predict_proba(np.load(work / "data/prepared/x_test.npy"), 64)


def test_the_views_inside_the_graph_are_exactly_the_numpy_views() -> None:
    from stages.export import TestTimeViews

    x = np.random.default_rng(0).random((3, 28, 28), dtype=np.float32)
    views = tta_views(True, 2)
    got = np.asarray(TestTimeViews(views)(x))
    want = [
        (shifted(x, dy, dx) if dy or dx else x)[:, :, ::-1] if mirror else shifted(x, dy, dx)
        for dy, dx, mirror in views
    ]
    assert got.shape == (10, 3, 28, 28)
    np.testing.assert_array_equal(got, np.stack(want))


@pytest.mark.parametrize(
    ("views", "images"),
    [(1, 500), (2, 250), (10, 50), (501, 1)],  # 2 views: 250 images a call, as before round 6
)
def test_parity_batches_keep_the_images_through_an_exported_graph_bounded(views: int, images: int) -> None:
    from stages.export import graph_batch

    assert graph_batch(views) == images


def test_a_bfloat16_model_is_refused_in_one_line_before_anything_is_exported() -> None:
    import keras

    from stages.export import check_float32
    from stages.train import dtype_policy

    with dtype_policy("mixed_bfloat16"):
        inputs = keras.Input((28, 28))
        model = keras.Model(inputs, keras.layers.Dense(10)(keras.layers.Flatten()(inputs)))
    with pytest.raises(WardrobeError, match=r"^m\.keras: the model computes in bfloat16, which ONNX Runtime cannot"):
        check_float32(model, Path("m.keras"))
    plain = keras.Input((28, 28))
    check_float32(keras.Model(plain, keras.layers.Dense(10)(keras.layers.Flatten()(plain))), Path("m.keras"))


def test_both_formats_match_keras_within_the_stated_parity(exported: Path) -> None:
    import onnxruntime
    import tensorflow as tf

    report = json.loads((exported / EXPORT_JSON).read_text())
    reference = keras_probs(exported)
    assert report["test_images"] == len(reference) == 40 and report["tta_views"] == 10
    x_test = np.load(exported / "data/prepared/x_test.npy")

    session = onnxruntime.InferenceSession(str(exported / ONNX_PATH), providers=["CPUExecutionProvider"])
    (image,), (probabilities,) = session.get_inputs(), session.get_outputs()
    assert (image.name, image.shape, image.type) == ("image", ["batch", 28, 28], "tensor(float)")
    assert (probabilities.name, probabilities.shape) == ("probabilities", ["batch", 10])
    onnx_probs = session.run(None, {"image": x_test})[0]

    signature = tf.saved_model.load(str(exported / SAVED_MODEL_DIR / "1")).signatures["serving_default"]
    saved_probs = signature(image=tf.constant(x_test))["probabilities"].numpy()

    for name, probs in (("onnx", onnx_probs), ("saved_model", saved_probs)):
        difference = float(np.abs(probs - reference).max())
        assert difference <= 1e-4, name
        assert (probs.argmax(1) == reference.argmax(1)).all(), name
        assert report[name]["top1_agreement"] == 1.0
        assert report[name]["max_abs_diff"] == pytest.approx(difference, abs=1e-6)
    # The views matter: without them the model's own output is further from the TTA answer.
    assert np.abs(load_model(exported / MODEL_PATH).predict(x_test, verbose=0) - onnx_probs).max() > 1e-3


def test_a_graph_that_breaks_parity_is_refused_and_the_previous_export_stays(
    exported: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real fault, not a fake: a serving graph without the views the model file records."""
    import keras

    import stages.export

    work = tmp_path / "w"
    shutil.copytree(exported, work)
    before = {p: p.read_bytes() for p in (work / "data/export").rglob("*") if p.is_file()}
    before[work / EXPORT_JSON] = (work / EXPORT_JSON).read_bytes()
    monkeypatch.chdir(work)

    def without_views(classifier: object) -> keras.Model:
        model = classifier.model
        return keras.Model(model.inputs, {"probabilities": model.outputs[0]})

    monkeypatch.setattr(stages.export, "serving_model", without_views)
    with pytest.raises(WardrobeError) as error:
        stages.export.main()
    assert re.fullmatch(
        r"export: saved_model disagrees with the Keras model on the test images: top-1 agreement \d+\.\d{4}% "
        r"\(needs 99\.95%\), largest probability difference \d\.\d\de-\d\d \(allowed 1e-04\); nothing was exported",
        str(error.value),
    )
    after = {p: p.read_bytes() for p in (work / "data/export").rglob("*") if p.is_file()}
    after[work / EXPORT_JSON] = (work / EXPORT_JSON).read_bytes()
    assert after == before  # no temp files left either


def test_onnx_predict_gives_the_keras_answers_on_the_exported_pngs(exported: Path) -> None:
    runs = {
        runtime: run_module("stages.predict", "pngs", "--json", "--runtime", runtime, cwd=exported)
        for runtime in ("keras", "onnx")
    }
    answers = {}
    for runtime, result in runs.items():
        assert result.returncode == 0, result.stderr
        answers[runtime] = [json.loads(line)["top_k"][0] for line in result.stdout.splitlines()]
    assert [a["class"] for a in answers["onnx"]] == [a["class"] for a in answers["keras"]]
    assert [a["class"] for a in answers["onnx"]] == pd.read_csv(exported / "plots/confusion.csv")["predicted"].tolist()
    for onnx_answer, keras_answer in zip(answers["onnx"], answers["keras"], strict=True):
        assert onnx_answer["probability"] == pytest.approx(keras_answer["probability"], abs=2e-6)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "error: {path}: ONNX model not found; run `dvc repro export` (or dvc pull) first"),
        (b"not an onnx file", "error: {path}: cannot load ONNX model: "),
        (
            "wrong-shape",
            "error: {path}: ONNX model maps x tensor(float) ['n', 3] → ['n', 3], expected float N×28×28 to N×10",
        ),
    ],
)
def test_bad_or_missing_onnx_files_fail_in_one_line(
    exported: Path, tmp_path: Path, content: bytes | str | None, message: str
) -> None:
    path = tmp_path / "model.onnx"
    if content == "wrong-shape":
        import onnx
        from onnx import TensorProto, helper

        value = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3])
        out = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])
        graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [value], [out])
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)]), str(path))
    elif content is not None:
        path.write_bytes(content)
    result = run_module("stages.predict", "pngs/000.png", "--model", str(path), cwd=exported)
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.startswith(message.format(path=path))
    assert result.stderr.count("\n") == 1


def test_predict_runs_without_tensorflow_in_the_documented_install(exported: Path, tmp_path: Path) -> None:
    """`make venv-serve`: requirements-serve.lock and the project without its dependencies."""
    venv = tmp_path / "serve"
    result = sh(REPO, "make", "venv-serve", f"SERVE_VENV={venv}", check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    python = venv / "bin/python"
    missing = subprocess.run([python, "-c", "import tensorflow"], capture_output=True, text=True)
    assert "No module named 'tensorflow'" in missing.stderr
    for module in ("keras", "pandas", "tf2onnx"):
        assert subprocess.run([python, "-c", f"import {module}"], capture_output=True).returncode == 1, module

    # auto picks onnx (TensorFlow is missing) and data/export/model.onnx
    served = subprocess.run([venv / "bin/wardrobe-predict", "pngs"], cwd=exported, capture_output=True, text=True)
    assert served.returncode == 0, served.stderr
    expected = pd.read_csv(exported / "plots/confusion.csv")["predicted"].tolist()
    assert [line.split(": ")[1].split(" (")[0] for line in served.stdout.splitlines()] == expected
    refused = subprocess.run(
        [venv / "bin/wardrobe-predict", "pngs", "--runtime", "keras"], cwd=exported, capture_output=True, text=True
    )
    assert refused.returncode == 1
    assert refused.stderr == (
        "error: TensorFlow is not installed, so --runtime keras cannot run; "
        "use --runtime onnx (data/export/model.onnx)\n"
    )


def test_the_card_states_the_runs_own_numbers(exported: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from stages.card import confused_pairs, read_run, render

    card = (exported / MODEL_CARD).read_text()
    metrics = json.loads((exported / METRICS_PATH).read_text())
    report = json.loads((exported / EXPORT_JSON).read_text())
    params = yaml.safe_load((exported / "params.yaml").read_text())
    assert f"Test accuracy **{metrics['accuracy']:.4f}**, macro-F1 **{metrics['macro_f1']:.4f}**" in card
    assert f"validation accuracy {metrics['val_accuracy']:.4f}" in card
    assert f"MD5 `{hashlib.md5((exported / MODEL_PATH).read_bytes()).hexdigest()}`" in card
    assert "10 views (the image, moved 1 px up, down, left and right, each also mirrored left-right)" in card
    for name, digest in params["prepare"]["sha256"].items():
        assert f"`{name}`: `{digest}`" in card
    assert "Splits: 90 training, 30 validation" in card and ", 40 test" in card
    assert "```yaml\n" + yaml.safe_dump(params["train"], sort_keys=False) + "```" in card
    for _, row in pd.read_csv(exported / PER_CLASS_CSV).iterrows():
        assert f"| {row['class']} | {row['precision']:.4f} | {row['recall']:.4f} | {row['f1']:.4f} | 4 |" in card
    assert f"{report['onnx']['top1_agreement']:.2%} | {report['onnx']['max_abs_diff']:.1e} |" in card

    # The confused pairs, counted here independently of the card's code.
    confusion = pd.read_csv(exported / "plots/confusion.csv").to_numpy()
    pairs: dict[tuple[str, str], int] = {}
    for actual, predicted in confusion:
        if actual != predicted:
            pairs[(actual, predicted)] = pairs.get((actual, predicted), 0) + 1
    top = sorted(pairs.items(), key=lambda item: (-item[1], item[0]))[:5]
    assert [(a, p, n) for (a, p), n in top] == [
        tuple(r) for r in confused_pairs(pd.read_csv(exported / "plots/confusion.csv")).to_numpy()
    ]
    for (actual, predicted), count in top:
        assert f"| {actual} | {predicted} | {count} |" in card

    monkeypatch.chdir(exported)
    assert render(read_run()) == card  # same files, same bytes: no dates, no randomness


def test_a_run_without_mistakes_still_gets_its_card(exported: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from stages.card import read_run, render

    monkeypatch.chdir(exported)
    run = read_run()
    card = render(dataclasses.replace(run, confusion=run.confusion.assign(predicted=run.confusion["actual"])))
    assert re.search(r"\d% of the\n  test images are misclassified\.\n", card)
    assert "| actual | predicted as | test images |\n|---|---|---|\n\n## Known limitations" in card


def test_the_committed_card_states_the_committed_numbers() -> None:
    """The committed metrics/model_card.md against the committed metrics, export report and dvc.lock
    (the card stage's own test above covers the rest; this one needs no data)."""
    card = (REPO / MODEL_CARD).read_text()
    metrics = json.loads((REPO / METRICS_PATH).read_text())
    report = json.loads((REPO / EXPORT_JSON).read_text())
    lock = yaml.safe_load((REPO / "dvc.lock").read_text())
    model_md5 = next(out["md5"] for out in lock["stages"]["train"]["outs"] if out["path"] == str(MODEL_PATH))
    assert f"Test accuracy **{metrics['accuracy']:.4f}**, macro-F1 **{metrics['macro_f1']:.4f}**" in card
    assert f"MD5 `{model_md5}`" in card
    for name in ("saved_model", "onnx"):
        assert f"{report[name]['top1_agreement']:.2%} | {report[name]['max_abs_diff']:.1e} |" in card
    for _, row in pd.read_csv(REPO / PER_CLASS_CSV).iterrows():
        assert f"| {row['class']} | {row['precision']:.4f} | {row['recall']:.4f} | {row['f1']:.4f} |" in card
    card_deps = {dep["path"]: dep["md5"] for dep in lock["stages"]["card"]["deps"]}
    for path in (METRICS_PATH, EXPORT_JSON, PER_CLASS_CSV):
        assert card_deps[str(path)] == hashlib.md5((REPO / path).read_bytes()).hexdigest(), path
    card_out = lock["stages"]["card"]["outs"][0]
    assert card_out["md5"] == hashlib.md5(card.encode()).hexdigest()
