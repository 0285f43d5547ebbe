from __future__ import annotations

import dataclasses
from pathlib import Path

import keras
import numpy as np
import pytest

from stages.model import build_model
from stages.params import parse_params
from tests.conftest import committed_params


@pytest.fixture
def mlp(params_dict: dict):
    return parse_params(params_dict).train


def test_mlp_is_the_original_model(mlp) -> None:
    model = build_model(mlp)
    kinds = [(type(layer).__name__, getattr(layer, "units", None)) for layer in model.layers[1:]]
    assert kinds == [("Flatten", None), ("Dense", 128), ("Dropout", None), ("Dense", 10)]
    assert model.layers[2].activation is keras.activations.relu
    assert model.layers[3].rate == 0.2
    assert model.layers[4].activation is keras.activations.softmax
    assert model.count_params() == 784 * 128 + 128 + 128 * 10 + 10


def test_cnn_shapes_and_probabilities(idx_source: tuple[Path, dict[str, str]]) -> None:
    overrides = ("train=cnn", "train.filters=[4,8]", "train.convs_per_block=[1,2]", "train.dense_units=16")
    model = build_model(parse_params(committed_params(*idx_source, *overrides)).train)
    probs = model.predict(np.random.default_rng(0).random((3, 28, 28), dtype=np.float32), verbose=0)
    assert model.input_shape == (None, 28, 28)
    assert probs.shape == (3, 10)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    momenta = [layer.momentum for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert momenta == [0.99] * 4  # one per conv (3) and the dense layer, from the recipe's bn_momentum
    convs = [layer.filters for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    assert convs == [4, 8, 8]


def test_augmentation_only_in_training(mlp) -> None:
    model = build_model(dataclasses.replace(mlp, augment_flip=True, augment_shift=2, augment_erase=0.5))
    assert any(isinstance(layer, keras.layers.RandomFlip) for layer in model.layers)
    x = np.random.default_rng(1).random((4, 28, 28), dtype=np.float32)
    # Inference ignores augmentation and dropout: two calls agree exactly.
    np.testing.assert_array_equal(model(x, training=False), model(x, training=False))
    assert not np.allclose(model(x, training=True), model(x, training=False))
