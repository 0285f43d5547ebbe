"""The one model factory: every layer of every architecture is defined here."""

from __future__ import annotations

import keras
import numpy as np

from wardrobe.model.layers import FusedBatchNormalization
from wardrobe.params import TrainParams


def build_model(params: TrainParams, image_shape: tuple[int, ...], num_classes: int) -> keras.Model:
    """Return an uncompiled model mapping N×height×width(×3) floats in [0, 1] to the probabilities of
    num_classes classes (the prepared data's shape and class count: common.DatasetInfo).

    Flips and shifts are applied to whole batches by the input pipeline (train.augment_batch),
    not by per-image Keras layers (they cost ~40 % of an epoch on the Intel kind, issue #23). Random erasing
    stays a layer (it runs only in training), so the saved model predicts on clean images.
    """
    inputs = keras.Input(shape=image_shape, name="image")
    x = inputs
    if params.augment_erase:
        x = keras.layers.Reshape(with_channels(image_shape))(x)
        x = keras.layers.RandomErasing(factor=params.augment_erase, scale=(0.02, 0.25), seed=params.seed)(x)
        x = keras.layers.Reshape(image_shape)(x)
    if params.arch == "mlp":
        # The original script, layer for layer.
        x = keras.layers.Flatten()(x)
        x = keras.layers.Dense(params.dense_units, activation="relu")(x)
        x = keras.layers.Dropout(params.dropout, seed=params.seed)(x)
    else:
        x = _conv_trunk(x, params, image_shape)
    # float32 output whatever the compute precision: softmax in bfloat16 loses too much.
    outputs = keras.layers.Dense(num_classes, activation="softmax", name="probabilities", dtype="float32")(x)
    return keras.Model(inputs, outputs, name=params.arch)


def with_channels(image_shape: tuple[int, ...]) -> tuple[int, ...]:
    """H×W grayscale gets a channel axis for the convolutions; H×W×3 has one."""
    return image_shape if len(image_shape) == 3 else (*image_shape, 1)


def _conv_trunk(x: keras.KerasTensor, params: TrainParams, image_shape: tuple[int, ...]) -> keras.KerasTensor:
    """Blocks of 3×3 convs with BatchNorm and ReLU, each halving the resolution once.

    pool_first (the CIFAR-10 speed-run block): conv → pool → BN → ReLU, then the block's other
    convs at the pooled size, so normalisation and activation touch a quarter of the pixels.
    Otherwise (conv → BN → ReLU) × n, then pool.
    """
    assert params.filters and params.convs_per_block and params.bn_momentum is not None, (
        "the schema requires them for cnn"
    )
    x = keras.layers.Reshape(with_channels(image_shape))(x)
    for filters, convs in zip(params.filters, params.convs_per_block, strict=True):
        for index in range(convs):
            x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False)(x)
            if params.pool_first and index == 0:
                x = keras.layers.MaxPooling2D()(x)
            x = FusedBatchNormalization(momentum=params.bn_momentum)(x)
            x = keras.layers.ReLU()(x)
        if not params.pool_first:
            x = keras.layers.MaxPooling2D()(x)
    if params.head == "global_max":
        # No hidden dense layer: the last block's channels are the features.
        x = keras.layers.GlobalMaxPooling2D()(x)
        return keras.layers.Dropout(params.dropout, seed=params.seed)(x) if params.dropout else x
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dropout(params.dropout, seed=params.seed)(x)
    x = keras.layers.Dense(params.dense_units, use_bias=False)(x)
    x = keras.layers.BatchNormalization(momentum=params.bn_momentum)(x)
    x = keras.layers.ReLU()(x)
    return keras.layers.Dropout(params.dropout, seed=params.seed + 1)(x)


def initialize_convs(model: keras.Model, params: TrainParams, images: np.ndarray) -> None:
    """The speed-run initialisations the recipe asks for, set on a freshly built cnn.

    whiten_init: the first conv's first filters become the training images' 3×3 patch-whitening
    filters and their negatives (so ReLU keeps both signs); identity_init: every conv after a
    block's first starts as the identity (a block then begins as if it had one conv).
    """
    convs = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    if params.whiten_init and convs:
        kernel = convs[0].kernel.numpy()
        filters = whitening_filters(images)
        count = min(kernel.shape[-1], filters.shape[-1])
        kernel[..., :count] = filters[..., :count]
        convs[0].kernel.assign(kernel)
    if params.identity_init:
        later = [index > 0 for convs_in_block in params.convs_per_block or () for index in range(convs_in_block)]
        for layer, is_later in zip(convs, later, strict=True):
            if is_later:  # same channels in and out: the block's first conv set them
                layer.kernel.assign(identity_kernel(layer.kernel.shape[2], layer.kernel.shape[0]))


def whitening_filters(images: np.ndarray, size: int = 3, epsilon: float = 5e-4) -> np.ndarray:
    """size×size×C×(2·size²·C) conv filters that whiten the images' patches (eigenvectors of the
    patch covariance over sqrt(eigenvalue + epsilon), largest first), then their negatives.
    C is 1 for N×H×W (grayscale) images, 3 for N×H×W×3."""
    sample = images[: min(len(images), 5000)].astype(np.float64)
    sample = sample if sample.ndim == 4 else sample[..., None]
    channels = sample.shape[-1]
    patches = np.lib.stride_tricks.sliding_window_view(sample, (size, size), axis=(1, 2))  # N×h×w×C×size×size
    patches = np.moveaxis(patches, 3, -1).reshape(-1, size * size * channels)
    eigenvalues, eigenvectors = np.linalg.eigh(np.cov(patches, rowvar=False))
    order = np.argsort(eigenvalues)[::-1]
    scaled = eigenvectors[:, order] / np.sqrt(eigenvalues[order] + epsilon)
    filters = np.concatenate([scaled, -scaled], axis=1).reshape(size, size, channels, -1)
    return filters.astype(np.float32)


def identity_kernel(channels: int, size: int) -> np.ndarray:
    """A size×size conv kernel that maps each channel to itself (Dirac at the centre tap)."""
    kernel = np.zeros((size, size, channels, channels), dtype=np.float32)
    kernel[size // 2, size // 2] = np.eye(channels, dtype=np.float32)
    return kernel
