from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from tests.conftest import CLASS_NAMES, FASHION_INFO, FASHION_RECORD, png_claiming, run_module, save_wrong_shape_model
from wardrobe.cli.predict import BLANK_NOTE, collect, load_image, main, to_training_format, top_k
from wardrobe.common import WardrobeError
from wardrobe.model.file import Views, decide_flip, load_keras_classifier, load_model, save_model
from wardrobe.outputs import MODEL_PATH


def test_dark_28x28_is_taken_unchanged() -> None:
    gray = np.random.default_rng(0).integers(0, 60, (28, 28), dtype=np.uint8)
    np.testing.assert_array_equal(to_training_format(gray, (28, 28)), gray.astype(np.float32) / 255)


def test_light_background_is_inverted_and_fitted() -> None:
    photo = np.full((200, 100), 255, dtype=np.uint8)  # white page
    photo[50:150, 25:75] = 0  # a dark 100×50 garment
    out = to_training_format(photo, (28, 28))
    assert out.shape == (28, 28) and out.dtype == np.float32
    rows, cols = np.nonzero(out > 0.5)
    assert rows.min() == 0 and rows.max() == 27  # longer side fills the frame
    assert 12 <= cols.max() - cols.min() + 1 <= 15  # aspect ratio 2:1 kept
    assert abs((cols.min() + cols.max()) / 2 - 13.5) <= 1  # centered
    assert out[0, 0] == 0  # background is black


def test_top_k_orders_by_probability() -> None:
    probs = np.zeros((1, 10))
    probs[0, [3, 7, 1]] = [0.2, 0.7, 0.1]
    assert top_k(probs, 2, CLASS_NAMES) == [[("Sneaker", 0.7), ("Dress", 0.2)]]


@pytest.mark.pipeline
def test_predict_agrees_with_evaluate_on_exported_test_images(tiny_run: Path) -> None:
    result = run_module("wardrobe", "predict", "pngs", "--json", "--top-k", "3", "--batch-size", "7", cwd=tiny_run)
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    expected = pd.read_csv(tiny_run / "plots/confusion.csv")["predicted"].tolist()
    assert [r["path"] for r in records] == [f"pngs/{i:03d}.png" for i in range(len(expected))]
    assert [r["top_k"][0]["class"] for r in records] == expected
    assert all(len(r["top_k"]) == 3 for r in records)
    assert all(r["top_k"][0]["probability"] >= r["top_k"][1]["probability"] for r in records)


@pytest.mark.pipeline
@pytest.mark.parametrize(("setting", "shift"), [("auto", 0), ("always", 0), ("never", 0), ("never", 1)])
def test_predict_agrees_with_evaluate_under_every_tta_setting(
    tiny_run: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
    setting: str,
    shift: int,
) -> None:
    """train.tta_flip and train.tta_shift are decided once and written into the model file;
    evaluate and predict both read them from there, so they agree, and a downloaded model needs
    no params.yaml."""
    from stages.evaluate import main as evaluate_main

    work = tmp_path / "w"
    shutil.copytree(tiny_run, work)
    model = load_model(work / MODEL_PATH)
    flip = decide_flip(False, setting)  # the tiny model is an mlp trained without flips
    assert flip is {"auto": False, "always": True, "never": False}[setting]
    save_model(model, work / MODEL_PATH, Views(flip, shift), FASHION_INFO)  # what train writes for these params
    monkeypatch.chdir(work)
    evaluate_main()
    capsys.readouterr()
    main(["pngs", "--json", "--batch-size", "7"])
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    expected = pd.read_csv("plots/confusion.csv")["predicted"].tolist()
    assert [r["top_k"][0]["class"] for r in records] == expected
    classifier = load_keras_classifier(MODEL_PATH)
    assert classifier.views == Views(flip, shift)
    x = np.load("data/prepared/x_test.npy")
    plain = classifier.model.predict(x, verbose=0)
    tta = flip or shift > 0
    assert np.allclose(classifier.predict_proba(x, 64), plain, atol=1e-6) is not tta  # TTA really differs


@pytest.mark.pipeline
def test_predict_npy_and_text_output(tiny_run: Path, tmp_path: Path) -> None:
    x = np.load(tiny_run / "data/prepared/x_test.npy")[:2]
    (tmp_path / "data").symlink_to(tiny_run / "data")
    np.save(tmp_path / "two.npy", np.round(x * 255).astype(np.uint8))
    np.save(tmp_path / "one.npy", x[0])
    result = run_module("wardrobe", "predict", "two.npy", "one.npy", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == ["two.npy[0]", "two.npy[1]", "one.npy[0]"]
    assert lines[0].split(": ")[1] == lines[2].split(": ")[1]  # same image, uint8 or float


@pytest.mark.pipeline
@pytest.mark.parametrize(
    ("setup", "args", "message"),
    [
        (lambda d: None, ["nope.png"], "error: nope.png: no such file or folder"),
        (lambda d: (d / "e").mkdir(), ["e"], "error: e: folder has no images (.bmp, .gif, .jpeg, .jpg, .png, .npy)"),
        (lambda d: (d / "z.png").write_bytes(b""), ["z.png"], "error: z.png: empty file"),
        (lambda d: (d / "t.png").write_text("hello"), ["t.png"], "error: t.png: not a readable image"),
        (
            lambda d: png_claiming(d / "h.png", 9000, 8000),
            ["h.png"],
            "error: h.png: image is over the 64,000,000-pixel cap",
        ),
        (
            lambda d: png_claiming(d / "h.png", 20000, 20000),
            ["h.png"],
            "error: h.png: image is over the 64,000,000-pixel cap",
        ),
        (
            lambda d: np.save(d / "w.npy", np.zeros((2, 27, 28))),
            ["w.npy"],
            "error: w.npy: expected shape N×28×28 or 28×28, got (2, 27, 28)",
        ),
        (
            lambda d: np.save(d / "f.npy", np.full((28, 28), 2.0)),
            ["f.npy"],
            "error: f.npy: float pixels must be finite and in [0, 1]",
        ),
        (lambda d: (d / "p.npy").write_bytes(b"\x93NUMPY junk"), ["p.npy"], "error: p.npy: not a readable .npy array"),
        (
            lambda d: None,
            ["pngs/000.png", "--model", "missing.keras"],
            "error: missing.keras: model file not found; run the train stage first",
        ),
        (
            lambda d: (d / "bad.keras").write_bytes(b"PK\x03\x04 not a zip"),
            ["pngs/000.png", "--model", "bad.keras"],
            "error: bad.keras: cannot read the model's metadata",
        ),
        (
            lambda d: save_wrong_shape_model(d / "wrong.keras"),
            ["pngs/000.png", "--model", "wrong.keras"],
            "error: wrong.keras: model maps (32, 32) to (10,), but its file records (28, 28) images of 10 classes",
        ),
    ],
    ids=[
        "missing",
        "empty-dir",
        "zero-byte",
        "not-image",
        "huge",
        "huger",
        "npy-shape",
        "npy-range",
        "npy-corrupt",
        "no-model",
        "corrupt-model",
        "wrong-model-shape",
    ],
)
def test_predict_bad_input_is_one_line(tiny_run: Path, tmp_path: Path, setup, args: list[str], message: str) -> None:
    for link in ("pngs", "data"):
        (tmp_path / link).symlink_to(tiny_run / link)
    setup(tmp_path)
    result = run_module("wardrobe", "predict", *args, cwd=tmp_path)
    assert result.returncode == 1
    assert result.stdout == ""  # nothing printed for the good inputs either
    assert result.stderr.startswith(message), result.stderr
    assert len(result.stderr.splitlines()) == 1 and "Traceback" not in result.stderr


@pytest.mark.pipeline
def test_predict_debug_shows_traceback(tiny_run: Path) -> None:
    result = run_module("wardrobe", "predict", "nope.png", "--debug", cwd=tiny_run)
    assert result.returncode == 1 and "Traceback" in result.stderr and "WardrobeError" in result.stderr


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=2048))
def test_image_loader_only_raises_our_error(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "x.png"
    path.write_bytes(data)
    try:
        out = load_image(path, FASHION_RECORD)
    except WardrobeError:
        return
    assert out.shape == (28, 28)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(position=st.integers(0, 10_000), value=st.integers(0, 255))
def test_mutated_png_only_raises_our_error(tmp_path: Path, position: int, value: int) -> None:
    path = tmp_path / "m.png"
    Image.fromarray(np.arange(28 * 28, dtype=np.uint8).reshape(28, 28)).save(path)
    data = bytearray(path.read_bytes())
    data[position % len(data)] = value
    path.write_bytes(bytes(data))
    with contextlib.suppress(WardrobeError):  # our error is fine; anything else fails the test
        assert collect([path], FASHION_RECORD)[0].pixels.shape == (28, 28)


# ---- a new user's first hour (issue #27) -------------------------------------------------------


@pytest.mark.pipeline
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--top-k", "0", "a.png"], "error: --top-k must be >= 1, got 0"),
        (["--batch-size", "0", "a.png"], "error: --batch-size must be >= 1, got 0"),
        (["--runtime", "tflite", "a.png"], "error: argument --runtime: invalid choice: 'tflite'"),
        ([], "error: the following arguments are required: PATH"),
    ],
    ids=["top-k", "batch-size", "runtime", "no-path"],
)
def test_usage_errors_are_one_line_with_status_2(tmp_path: Path, args: list[str], message: str) -> None:
    """argparse's exit status for a usage error (2; bad inputs exit 1), in one line like every error."""
    result = run_module("wardrobe", "predict", *args, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith(message) and result.stderr.endswith("(usage: wardrobe predict --help)\n")
    assert len(result.stderr.splitlines()) == 1, result.stderr


@pytest.mark.pipeline
def test_predict_finds_the_project_model_from_a_subfolder(tiny_run: Path) -> None:
    """Run from inside the project but not at its top (the default paths are looked up in the
    parents too), the answers are the ones predict gives at the top."""
    top = run_module("wardrobe", "predict", "pngs/000.png", "--json", cwd=tiny_run)
    inside = run_module("wardrobe", "predict", "000.png", "--json", cwd=tiny_run / "pngs")
    assert top.returncode == 0 and inside.returncode == 0, inside.stderr
    assert json.loads(inside.stdout)["top_k"] == json.loads(top.stdout)["top_k"]


def test_outside_any_project_the_error_says_where_it_looked(tmp_path: Path, monkeypatch) -> None:
    import wardrobe.cli.predict as predict

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(predict, "SOURCE_PROJECT", tmp_path / "installed-from")
    with pytest.raises(WardrobeError) as error:
        predict.project_file(MODEL_PATH)
    assert str(error.value) == (
        f"{MODEL_PATH}: not found in {tmp_path}, its parents or {tmp_path / 'installed-from'}; "
        "run the pipeline (dvc repro) or give the file with --model"
    )
    (tmp_path / "installed-from" / MODEL_PATH).parent.mkdir(parents=True)
    (tmp_path / "installed-from" / MODEL_PATH).write_bytes(b"model")
    assert predict.project_file(MODEL_PATH) == tmp_path / "installed-from" / MODEL_PATH  # the install's project


@pytest.mark.pipeline
def test_auto_runtime_is_onnx_while_the_export_matches_the_model(tiny_run: Path, tmp_path: Path, monkeypatch) -> None:
    """export records the model file's SHA-256 in the ONNX file; auto uses ONNX Runtime only while
    it matches (same answers, a fraction of the time), keras once the model file changed."""
    from wardrobe.cli.predict import choose_runtime

    monkeypatch.chdir(tiny_run)
    runtime, classifier = choose_runtime("auto", None)
    assert runtime == "onnx" and classifier is not None
    assert choose_runtime("auto", Path("data/model/model.keras")) == ("keras", None)  # --model decides
    assert choose_runtime("keras", None) == ("keras", None)
    project = tmp_path / "retrained"
    shutil.copytree(tiny_run / "data", project / "data")
    with (project / MODEL_PATH).open("ab") as model:  # another model file (a zip's trailing bytes)
        model.write(b"\0")
    monkeypatch.chdir(project)
    assert choose_runtime("auto", None) == ("keras", None)


@pytest.mark.pipeline
def test_blank_pictures_are_flagged(tiny_run: Path, tmp_path: Path) -> None:
    """An all-black picture and a transparent one carry no garment: the answer says so."""
    (tmp_path / "data").symlink_to(tiny_run / "data")
    Image.new("L", (28, 28)).save(tmp_path / "black.png")
    Image.new("RGBA", (1, 1), (0, 0, 0, 0)).save(tmp_path / "clear.png")
    shutil.copy(tiny_run / "pngs/000.png", tmp_path / "garment.png")
    names = ("black.png", "clear.png", "garment.png")
    text = run_module("wardrobe", "predict", *names, cwd=tmp_path)
    answers = run_module("wardrobe", "predict", *names, "--json", cwd=tmp_path)
    assert text.returncode == 0 and answers.returncode == 0, text.stderr + answers.stderr
    lines = text.stdout.splitlines()
    assert [line.endswith(BLANK_NOTE) for line in lines] == [True, True, False], lines
    assert [json.loads(line)["blank"] for line in answers.stdout.splitlines()] == [True, True, False]


@pytest.mark.pipeline
def test_a_long_library_message_ends_with_a_whole_sentence(tiny_run: Path, tmp_path: Path) -> None:
    """Issue #27: `--model notes.txt` (a model file under another name) ended mid-sentence."""
    shutil.copy(tiny_run / MODEL_PATH, tmp_path / "notes.txt")
    shutil.copy(tiny_run / "pngs/000.png", tmp_path / "a.png")
    result = run_module("wardrobe", "predict", "a.png", "--model", "notes.txt", cwd=tmp_path)
    assert result.returncode == 1
    (line,) = result.stderr.splitlines()
    assert line.startswith("error: notes.txt: cannot load model: File format not supported: filepath=notes.txt.")
    assert line.endswith("is not supported by `load_model()` in Keras 3. …"), line
