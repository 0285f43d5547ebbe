"""stages/common.py: the shared helpers every stage uses."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from stages.common import WardrobeError, atomic_path, find_tool, load_classifier
from stages.train import save_model
from tests.conftest import save_wrong_shape_model


def test_flip_tta_only_for_flip_trained_models() -> None:
    import keras

    from stages.common import decide_flip_tta, has_flip_layer, predict_proba

    assert decide_flip_tta(False, "auto") is False and decide_flip_tta(True, "auto") is True
    assert decide_flip_tta(False, "always") is True and decide_flip_tta(True, "never") is False
    plain_in = keras.Input((28, 28))
    plain = keras.Model(plain_in, keras.layers.Dense(10, activation="softmax")(keras.layers.Flatten()(plain_in)))
    flip_in = keras.Input((28, 28, 1))
    flipped = keras.Model(flip_in, keras.layers.RandomFlip("horizontal")(flip_in))
    assert (has_flip_layer(plain), has_flip_layer(flipped)) == (False, True)  # files saved before the key
    x = np.random.default_rng(0).random((3, 28, 28), dtype=np.float32)
    averaged = predict_proba(plain, x, 2, flip_tta=True)
    expected = (plain.predict(x, verbose=0) + plain.predict(x[:, :, ::-1], verbose=0)) / 2
    # Other batch sizes take other oneDNN kernels: equal to a few float32 ulps, not bit for bit.
    np.testing.assert_allclose(averaged, expected, rtol=1e-5)


def test_shift_tta_averages_ten_views_of_each_image() -> None:
    import keras

    from stages.common import predict_proba, shifted, tta_views

    image = np.arange(9, dtype=np.float32).reshape(1, 3, 3)
    np.testing.assert_array_equal(shifted(image, 1, 0)[0], [[0, 0, 0], [0, 1, 2], [3, 4, 5]])
    np.testing.assert_array_equal(shifted(image, 0, -1)[0], [[1, 2, 0], [4, 5, 0], [7, 8, 0]])
    assert len(tta_views(flip=True, shift=1)) == 10 and len(tta_views(flip=False, shift=2)) == 5
    assert tta_views(flip=False, shift=0) == [(0, 0, False)]

    inputs = keras.Input((28, 28))
    model = keras.Model(inputs, keras.layers.Dense(10, activation="softmax")(keras.layers.Flatten()(inputs)))
    x = np.random.default_rng(1).random((4, 28, 28), dtype=np.float32)
    views = [x, shifted(x, 2, 0), shifted(x, -2, 0), shifted(x, 0, 2), shifted(x, 0, -2)]
    expected = np.mean([model.predict(v, verbose=0) for v in views], axis=0)
    np.testing.assert_allclose(predict_proba(model, x, 4, flip_tta=False, tta_shift=2), expected, rtol=1e-5)


def test_atomic_path_keeps_the_old_file_when_writing_fails(tmp_path: Path) -> None:
    target = tmp_path / "out" / "result.txt"
    with atomic_path(target) as tmp:
        tmp.write_text("first")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")
    assert target.read_text() == "first"
    assert sorted(p.name for p in target.parent.iterdir()) == ["result.txt"]  # no temp file left


def test_find_tool_prefers_the_one_beside_this_python(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    assert find_tool("dvc") == str(Path(sys.executable).parent / "dvc")  # the venv's, not on PATH
    assert find_tool("git") == "/usr/bin/git"  # not beside this python: from PATH
    with pytest.raises(WardrobeError, match=r"^no-such-tool: command not found next to .* or on PATH; install"):
        find_tool("no-such-tool")


def test_a_model_file_without_a_recorded_policy_uses_the_auto_rule(tmp_path: Path) -> None:
    """Models saved before train recorded flip-TTA: no RandomFlip layer, no TTA."""
    import keras

    inputs = keras.Input((28, 28))
    model = keras.Model(inputs, keras.layers.Dense(10, activation="softmax")(keras.layers.Flatten()(inputs)))
    model.save(tmp_path / "old.keras")
    old = load_classifier(tmp_path / "old.keras")
    assert old.flip_tta is False and old.tta_shift == 0
    save_model(model, tmp_path / "new.keras", flip_tta=True, tta_shift=1)
    new = load_classifier(tmp_path / "new.keras")
    assert new.flip_tta is True and new.tta_shift == 1


def test_load_classifier_refuses_a_wrongly_shaped_model(tmp_path: Path) -> None:
    save_wrong_shape_model(tmp_path / "m.keras")
    with pytest.raises(WardrobeError, match=r"model maps \(32, 32\) to \(10,\), expected 28×28 to 10 classes"):
        load_classifier(tmp_path / "m.keras")
