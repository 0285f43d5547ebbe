from __future__ import annotations

import dataclasses
from pathlib import Path

import keras
import numpy as np
import pytest

from tests.conftest import committed_params, synthetic_images
from wardrobe.model.factory import build_model, identity_kernel, initialize_convs, whitening_filters
from wardrobe.params import parse_params


@pytest.fixture
def mlp(params_dict: dict):
    return parse_params(params_dict).train


def test_mlp_is_the_original_model(mlp) -> None:
    model = build_model(mlp, (28, 28), 10)
    kinds = [(type(layer).__name__, getattr(layer, "units", None)) for layer in model.layers[1:]]
    assert kinds == [("Flatten", None), ("Dense", 128), ("Dropout", None), ("Dense", 10)]
    assert model.layers[2].activation is keras.activations.relu
    assert model.layers[3].rate == 0.2
    assert model.layers[4].activation is keras.activations.softmax
    assert model.count_params() == 784 * 128 + 128 + 128 * 10 + 10


def test_cnn_shapes_and_probabilities(idx_source: tuple[Path, dict[str, str]]) -> None:
    overrides = ("train=cnn", "train.filters=[4,8]", "train.convs_per_block=[1,2]", "train.dense_units=16")
    model = build_model(parse_params(committed_params(*idx_source, *overrides)).train, (28, 28), 10)
    probs = model.predict(np.random.default_rng(0).random((3, 28, 28), dtype=np.float32), verbose=0)
    assert model.input_shape == (None, 28, 28)
    assert probs.shape == (3, 10)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    momenta = [layer.momentum for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert momenta == [0.99] * 4  # one per conv (3) and the dense layer, from the recipe's bn_momentum
    convs = [layer.filters for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    assert convs == [4, 8, 8]


def test_erasing_only_in_training(mlp) -> None:
    """Flips and shifts happen in the input pipeline (test_train); erasing is a layer."""
    model = build_model(dataclasses.replace(mlp, augment_flip=True, augment_shift=2, augment_erase=0.5), (28, 28), 10)
    assert any(isinstance(layer, keras.layers.RandomErasing) for layer in model.layers)
    in_pipeline = (keras.layers.RandomFlip, keras.layers.RandomTranslation)
    assert not any(isinstance(layer, in_pipeline) for layer in model.layers)
    x = np.random.default_rng(1).random((4, 28, 28), dtype=np.float32)
    # Inference ignores augmentation and dropout: two calls agree exactly.
    np.testing.assert_array_equal(model(x, training=False), model(x, training=False))
    assert not np.allclose(model(x, training=True), model(x, training=False))


def test_pool_first_blocks_and_global_max_head(idx_source: tuple[Path, dict[str, str]]) -> None:
    overrides = (
        "train=cnn",
        "train.filters=[4,8]",
        "train.convs_per_block=[2,2]",
        "train.pool_first=true",
        "train.head=global_max",
    )
    no_dropout = build_model(
        parse_params(committed_params(*idx_source, *overrides, "train.dropout=0")).train, (28, 28), 10
    )
    assert not any(isinstance(layer, keras.layers.Dropout) for layer in no_dropout.layers)
    model = build_model(
        parse_params(committed_params(*idx_source, *overrides, "train.dropout=0.2")).train, (28, 28), 10
    )
    kinds = [type(layer).__name__ for layer in model.layers[2:]]
    block = ["Conv2D", "MaxPooling2D", "FusedBatchNormalization", "ReLU", "Conv2D", "FusedBatchNormalization", "ReLU"]
    assert kinds == [*block, *block, "GlobalMaxPooling2D", "Dropout", "Dense"]
    # conv weights (no bias) and BN's four per channel, block by block; then the classes
    block1, block2 = 9 * 4 + 4 * 4 + 9 * 4 * 4 + 4 * 4, 9 * 4 * 8 + 4 * 8 + 9 * 8 * 8 + 4 * 8
    assert model.count_params() == block1 + block2 + 8 * 10 + 10


def test_fused_batch_norm_matches_keras_and_saves(tmp_path: Path) -> None:
    """Training outputs and moving statistics as Keras' own layer computes them (to float32
    rounding), and a saved model reloads in safe mode with the same predictions."""
    from wardrobe.model.layers import FusedBatchNormalization

    x = np.random.default_rng(2).normal(3.0, 2.0, (8, 5, 5, 3)).astype(np.float32)
    fused, plain = FusedBatchNormalization(momentum=0.5), keras.layers.BatchNormalization(momentum=0.5)
    np.testing.assert_allclose(fused(x, training=True), plain(x, training=True), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(fused.moving_mean, plain.moving_mean, rtol=1e-5)
    bessel = 200 / 199  # the fused kernel's moving variance is the unbiased one (n = 8·5·5)
    expected_variance = 0.5 + (np.asarray(plain.moving_variance) - 0.5) * bessel
    np.testing.assert_allclose(fused.moving_variance, expected_variance, rtol=1e-5)
    inputs = keras.Input((5, 5, 3))
    model = keras.Model(inputs, FusedBatchNormalization()(inputs))
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras", safe_mode=True)
    assert type(loaded.layers[1]) is FusedBatchNormalization
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), model.predict(x, verbose=0))


def test_whitening_filters_decorrelate_the_patches() -> None:
    images = synthetic_images(12, seed=1)[0].astype(np.float32) / 255
    filters = whitening_filters(images)
    assert filters.shape == (3, 3, 1, 18) and filters.dtype == np.float32
    np.testing.assert_array_equal(filters[..., 9:], -filters[..., :9])  # each filter's negative too
    patches = np.lib.stride_tricks.sliding_window_view(images, (3, 3), axis=(1, 2)).reshape(-1, 9)
    covariance = np.cov(patches @ filters.reshape(9, 18)[:, :9], rowvar=False)
    off_diagonal = covariance - np.diag(np.diag(covariance))
    assert np.abs(off_diagonal).max() < 0.01  # decorrelated
    # unit variance, less where epsilon damps the smallest eigenvalues (noise has many)
    assert np.diag(covariance).min() > 0.5 and np.diag(covariance).max() < 1.01


def test_identity_kernel_passes_each_channel_through() -> None:
    x = np.random.default_rng(3).random((2, 6, 6, 4), dtype=np.float32)
    conv = keras.layers.Conv2D(4, 3, padding="same", use_bias=False)
    conv.build(x.shape)
    conv.kernel.assign(identity_kernel(4, 3))
    np.testing.assert_array_equal(conv(x), x)


def test_initialize_convs_sets_what_the_recipe_asks(idx_source: tuple[Path, dict[str, str]]) -> None:
    overrides = ("train=cnn", "train.filters=[24,24]", "train.convs_per_block=[1,2]", "train.whiten_init=true")
    params = parse_params(committed_params(*idx_source, *overrides, "train.identity_init=true")).train
    images = synthetic_images(12, seed=1)[0].astype(np.float32) / 255
    model = build_model(params, (28, 28), 10)
    first, second, third = (layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D))
    untouched = first.kernel.numpy()[..., 18:]
    initialize_convs(model, params, images)
    np.testing.assert_array_equal(first.kernel.numpy()[..., :18], whitening_filters(images))
    np.testing.assert_array_equal(first.kernel.numpy()[..., 18:], untouched)  # the rest keep their init
    assert not np.array_equal(second.kernel.numpy(), identity_kernel(24, 3))  # a block's first: 24 → 24 too
    np.testing.assert_array_equal(third.kernel.numpy(), identity_kernel(24, 3))
