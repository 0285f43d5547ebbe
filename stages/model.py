"""The one model factory: every layer of every architecture is defined here."""

from __future__ import annotations

import keras

from stages.common import IMAGE_SHAPE, NUM_CLASSES
from stages.params import TrainParams


def build_model(params: TrainParams) -> keras.Model:
    """Return an uncompiled model mapping N×28×28 floats in [0, 1] to class probabilities.

    Augmentation layers sit at the front of the model: Keras runs them only in training, so the
    saved model predicts on clean images with no extra code.
    """
    inputs = keras.Input(shape=IMAGE_SHAPE, name="image")
    x = _augmentation(inputs, params)
    if params.arch == "mlp":
        # The original script, layer for layer.
        x = keras.layers.Flatten()(x)
        x = keras.layers.Dense(params.dense_units, activation="relu")(x)
        x = keras.layers.Dropout(params.dropout, seed=params.seed)(x)
    else:
        x = _conv_trunk(x, params)
    # float32 output whatever the compute precision: softmax in bfloat16 loses too much.
    outputs = keras.layers.Dense(NUM_CLASSES, activation="softmax", name="probabilities", dtype="float32")(x)
    return keras.Model(inputs, outputs, name=params.arch)


def _augmentation(x: keras.KerasTensor, params: TrainParams) -> keras.KerasTensor:
    if not (params.augment_flip or params.augment_shift or params.augment_erase):
        return x
    x = keras.layers.Reshape((*IMAGE_SHAPE, 1))(x)
    if params.augment_flip:
        # Garments are left-right symmetric in meaning; never flip vertically (shoes point one way).
        x = keras.layers.RandomFlip("horizontal", seed=params.seed)(x)
    if params.augment_shift:
        factor = params.augment_shift / IMAGE_SHAPE[0]
        x = keras.layers.RandomTranslation(factor, factor, fill_mode="constant", seed=params.seed)(x)
    if params.augment_erase:
        x = keras.layers.RandomErasing(factor=params.augment_erase, scale=(0.02, 0.25), seed=params.seed)(x)
    return keras.layers.Reshape(IMAGE_SHAPE)(x)


def _conv_trunk(x: keras.KerasTensor, params: TrainParams) -> keras.KerasTensor:
    """Conv-BN-ReLU blocks, each halving the resolution; BN lets a high learning rate converge fast."""
    assert params.filters and params.convs_per_block and params.bn_momentum, "the schema requires them for cnn"
    x = keras.layers.Reshape((*IMAGE_SHAPE, 1))(x)
    for filters, convs in zip(params.filters, params.convs_per_block, strict=True):
        for _ in range(convs):
            x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False)(x)
            x = keras.layers.BatchNormalization(momentum=params.bn_momentum)(x)
            x = keras.layers.ReLU()(x)
        x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dropout(params.dropout, seed=params.seed)(x)
    x = keras.layers.Dense(params.dense_units, use_bias=False)(x)
    x = keras.layers.BatchNormalization(momentum=params.bn_momentum)(x)
    x = keras.layers.ReLU()(x)
    return keras.layers.Dropout(params.dropout, seed=params.seed + 1)(x)
