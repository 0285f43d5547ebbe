"""wardrobe/model/file.py: the model file's views, its saving and reading, and the two classifiers."""

from __future__ import annotations

import re
import zipfile
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import CLASS_NAMES, FASHION_INFO, save_wrong_shape_model
from wardrobe.common import WardrobeError
from wardrobe.model.file import (
    SHIFT_KEY,
    ModelRecord,
    Views,
    decide_flip,
    load_keras_classifier,
    predict_proba,
    read_record,
    save_model,
    shifted,
)

REPO = Path(__file__).resolve().parent.parent


def dense_model(flip_layer: bool = False):
    """The smallest 28×28 → 10 model; with a RandomFlip layer as models saved before the views
    were recorded had when trained with flips."""
    import keras

    inputs = keras.Input((28, 28))
    x = keras.layers.Reshape((28, 28, 1))(inputs)
    if flip_layer:
        x = keras.layers.RandomFlip("horizontal")(x)
    return keras.Model(inputs, keras.layers.Dense(10, activation="softmax")(keras.layers.Flatten()(x)))


def test_views_list_the_image_its_moves_and_their_mirrors() -> None:
    assert Views(False).offsets() == [(0, 0, False)] and len(Views(False)) == 1
    assert Views(True).offsets() == [(0, 0, False), (0, 0, True)] and len(Views(True)) == 2
    assert len(Views(True, 1)) == len(Views(True, 1).offsets()) == 10
    assert Views(False, 2).offsets() == [(0, 0, False), (2, 0, False), (-2, 0, False), (0, 2, False), (0, -2, False)]
    assert decide_flip(False, "auto") is False and decide_flip(True, "auto") is True
    assert decide_flip(False, "always") is True and decide_flip(True, "never") is False


def test_predict_proba_is_the_mean_over_the_views() -> None:
    image = np.arange(9, dtype=np.float32).reshape(1, 3, 3)
    np.testing.assert_array_equal(shifted(image, 1, 0)[0], [[0, 0, 0], [0, 1, 2], [3, 4, 5]])
    np.testing.assert_array_equal(shifted(image, 0, -1)[0], [[1, 2, 0], [4, 5, 0], [7, 8, 0]])
    model = dense_model()
    x = np.random.default_rng(1).random((4, 28, 28), dtype=np.float32)
    moved = [x, shifted(x, 2, 0), shifted(x, -2, 0), shifted(x, 0, 2), shifted(x, 0, -2)]
    expected = np.mean([model.predict(v, verbose=0) for v in moved], axis=0)
    # Other batch sizes take other oneDNN kernels: equal to a few float32 ulps, not bit for bit.
    np.testing.assert_allclose(predict_proba(model, x, 4, Views(False, 2)), expected, rtol=1e-5)
    mirrored = (model.predict(x, verbose=0) + model.predict(x[:, :, ::-1], verbose=0)) / 2
    np.testing.assert_allclose(predict_proba(model, x, 2, Views(True)), mirrored, rtol=1e-5)


def test_the_views_inside_the_serving_graph_are_exactly_the_numpy_views() -> None:
    from wardrobe.model.layers import TestTimeViews

    x = np.random.default_rng(0).random((3, 28, 28), dtype=np.float32)
    views = Views(True, 2).offsets()
    got = np.asarray(TestTimeViews(views)(x))
    want = [(shifted(x, dy, dx)[:, :, ::-1] if mirror else shifted(x, dy, dx)) for dy, dx, mirror in views]
    assert got.shape == (10, 3, 28, 28)
    np.testing.assert_array_equal(got, np.stack(want))


def test_a_saved_file_records_its_views_and_classes_and_every_reader_gets_them(tmp_path: Path) -> None:
    model = dense_model()
    save_model(model, tmp_path / "m.keras", Views(True, 1), FASHION_INFO)
    with zipfile.ZipFile(tmp_path / "m.keras") as archive:
        assert b'"wardrobe_flip_tta": true, "wardrobe_tta_shift": 1' in archive.read("metadata.json")
    want = ModelRecord(Views(True, 1), CLASS_NAMES, (28, 28), "object", "Fashion-MNIST")
    assert read_record(tmp_path / "m.keras") == want
    assert load_keras_classifier(tmp_path / "m.keras").record == want


def test_a_file_without_a_record_is_refused_by_every_reader(tmp_path: Path) -> None:
    """Files saved before the dataset was a params choice record no class names: refused in one
    line, with what to do, by the record's one reader (evaluate, export, predict and the card use it)."""
    path = tmp_path / "old.keras"
    dense_model().save(path)
    with pytest.raises(WardrobeError, match=r"old\.keras: the model file records no class names.*retrain it"):
        read_record(path)
    with pytest.raises(WardrobeError, match=r"old\.keras: the model file records no class names"):
        load_keras_classifier(path)


def test_the_recorded_views_have_one_reader() -> None:
    """evaluate, export, predict, the card and the benchmarks read a model file's record only
    through modelfile.read_record: no other code opens metadata.json or names its keys."""
    readers = []
    for path in sorted([*REPO.glob("stages/*.py"), *REPO.glob("src/wardrobe/**/*.py"), *REPO.glob("bench/*.py")]):
        text = path.read_text()
        if path != REPO / "src/wardrobe/model/file.py" and re.search(
            r"metadata\.json|_KEY\b|wardrobe_(flip|tta|class|image|photo|dataset)", text
        ):
            readers.append(path.name)
    assert readers == []


def test_unreadable_files_fail_in_one_line(tmp_path: Path) -> None:
    with pytest.raises(WardrobeError, match=r"missing.keras: model file not found; run the train stage first$"):
        read_record(tmp_path / "missing.keras")
    (tmp_path / "notes.keras").write_text("not a zip")
    with pytest.raises(WardrobeError, match=r"notes.keras: cannot read the model's metadata: File is not a zip file$"):
        read_record(tmp_path / "notes.keras")
    save_wrong_shape_model(tmp_path / "m.keras")
    with pytest.raises(
        WardrobeError, match=r"model maps \(32, 32\) to \(10,\), but its file records \(28, 28\) images of 10"
    ):
        load_keras_classifier(tmp_path / "m.keras")
    assert SHIFT_KEY == "wardrobe_tta_shift"  # the key files already written carry: renaming it breaks them
