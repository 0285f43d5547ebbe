"""Training (stages/train.py runs it): the input pipeline, the optimizer and schedule, the fit, and
the calibration fitted after it (the temperature, the feature density and its threshold)."""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from wardrobe.calibration import DensityFit, FeatureDensity, calibrate, distance_threshold, ece, fit_temperature, nll
from wardrobe.common import (
    ImageFile,
    WardrobeError,
    seed_everything,
)
from wardrobe.distribute import (
    distribution_strategy,
    fix_keras_for_distribution,
    lost_worker_error,
    uses_distribution,
)
from wardrobe.environment import choose_precision, compute_device
from wardrobe.model.factory import build_model, initialize_convs
from wardrobe.model.file import (
    Views,
    feature_chunks,
    plain_features,
    predict_proba,
)
from wardrobe.model.layers import ScaledBiasAdam, ScaledBiasAdamW, ScaledBiasSGD, WarmupLinearDecay
from wardrobe.params import TrainParams


class EpochFromOneCSVLogger(keras.callbacks.CSVLogger):
    """Keras' CSVLogger, numbering epochs from 1 as people (and the plots' x axis) do."""

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        super().on_epoch_end(epoch + 1, logs)


def make_dataset(
    x: ImageFile | np.ndarray,
    y: np.ndarray,
    batch_size: int,
    shuffle_seed: int | None,
    one_hot: int | None,
    flip: bool | str = False,
    shift: int = 0,
    epoch: tf.Variable | None = None,
) -> tf.data.Dataset:
    """Batches of (images, labels); shuffles indices and reads each batch's images from `x` (a
    prepared split on disk, or an array) as it is needed, so no copy of the images is held.
    Labels are one-hot vectors of `one_hot` classes (label smoothing needs them), else integers.

    The shuffle buffer holds one int per image. `flip` and `shift` augment each batch
    (augment_batch) with random numbers drawn from the seeded `Dataset.random`, new in each epoch
    and the same in every run. `flip="alternate"` mirrors a fixed seeded half of the images when
    `epoch` (a variable fit sets at each epoch's start; the iterator is made after it) is even,
    the other half when it is odd. Reading is the only change from an in-memory gather: the same
    indices give the same images, so the same seed gives the same batches (and model bits).
    """
    labels = tf.constant(y)
    image_shape = tuple(x.shape[1:])

    def read_images(idx: tf.Tensor) -> tf.Tensor:
        # The prefetch below reads the next batches while the model trains on this one.
        batch = tf.numpy_function(lambda rows: x[rows], [idx], tf.float32, stateful=False)
        batch.set_shape((None, *image_shape))
        return batch

    indices = tf.data.Dataset.range(len(x))
    if shuffle_seed is not None:
        indices = indices.shuffle(len(x), seed=shuffle_seed, reshuffle_each_iteration=True)
    augment = flip or shift
    if flip == "alternate":
        if epoch is None:
            raise ValueError("flip='alternate' needs the epoch variable")
        first_half = tf.constant(np.random.default_rng(shuffle_seed).random(len(x)) < 0.5)
    if augment:
        seed = 0 if shuffle_seed is None else shuffle_seed
        randoms = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)
        batches = tf.data.Dataset.zip(indices.batch(batch_size), randoms)
    else:
        batches = indices.batch(batch_size).map(lambda idx: (idx, tf.zeros([2], tf.int64)))

    def gather(idx: tf.Tensor, random: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        batch_labels = tf.gather(labels, idx)
        if one_hot:
            batch_labels = tf.one_hot(batch_labels, one_hot)
        batch_images = read_images(idx)
        if augment:
            mirrored = None
            if flip == "alternate":
                odd = tf.equal(epoch % 2, 1)
                mirrored = tf.not_equal(tf.gather(first_half, idx), odd)
            batch_images = augment_batch(batch_images, random, bool(flip), shift, mirrored)
        return batch_images, batch_labels

    # Several workers each take their share of every batch (DATA); the default (AUTO) would
    # first look for input files, find none, and fall back to DATA with a warning.
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    # A plain map: op determinism makes a parallel map sequential anyway (and TF logs an error).
    return batches.map(gather).prefetch(tf.data.AUTOTUNE).with_options(options)


def augment_batch(
    images: tf.Tensor, seed: tf.Tensor, flip: bool, shift: int, mirrored: tf.Tensor | None = None
) -> tf.Tensor:
    """N×H×W(×C) images, a random half (or those `mirrored` says) mirrored left-right and each moved
    by whole pixels in -shift..shift per axis (zero fill: the background is 0), in a few
    whole-batch ops."""
    count, height, width = tf.shape(images)[0], images.shape[1], images.shape[2]
    flip_seed, row_seed, col_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
    if flip:
        if mirrored is None:
            mirrored = tf.random.stateless_uniform([count], flip_seed) < 0.5
        mirrored = tf.reshape(mirrored, [-1] + [1] * (images.shape.rank - 1))  # over H, W (and channels)
        images = tf.where(mirrored, images[:, :, ::-1], images)
    if shift:
        padded = tf.pad(images, [[0, 0], [shift, shift], [shift, shift]] + [[0, 0]] * (images.shape.rank - 3))
        rows = tf.random.stateless_uniform([count, 1], row_seed, 0, 2 * shift + 1, tf.int32) + tf.range(height)
        cols = tf.random.stateless_uniform([count, 1], col_seed, 0, 2 * shift + 1, tf.int32) + tf.range(width)
        images = tf.gather(tf.gather(padded, rows, axis=1, batch_dims=1), cols, axis=2, batch_dims=1)
    return images


@contextlib.contextmanager
def dtype_policy(policy: str) -> Iterator[None]:
    """Keras' precision policy is global: set it for one model build, then put it back."""
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(policy)
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous)


def learning_rate(params: TrainParams, steps_per_epoch: int) -> float | keras.optimizers.schedules.LearningRateSchedule:
    if params.lr_schedule == "constant":
        return params.learning_rate
    total = params.epochs * steps_per_epoch
    warmup = min(int(params.warmup_epochs * steps_per_epoch), total - 1)
    if params.lr_schedule == "linear":
        return WarmupLinearDecay(params.learning_rate, warmup, total)
    if warmup == 0:
        return keras.optimizers.schedules.CosineDecay(params.learning_rate, decay_steps=total)
    return keras.optimizers.schedules.CosineDecay(
        0.0, decay_steps=total - warmup, warmup_target=params.learning_rate, warmup_steps=warmup
    )


def compile_model(model: keras.Model, params: TrainParams, steps_per_epoch: int) -> None:
    lr = learning_rate(params, steps_per_epoch)
    options = {"use_ema": True, "ema_momentum": params.ema_momentum} if params.ema_momentum else {}
    # Keras' own classes unless the BatchNorm biases get their own rate (a model file's compile
    # config names the class, so the default's file does not depend on this project's).
    scaled = params.bn_bias_lr_scale not in (None, 1.0)
    if scaled:
        options["bn_bias_lr_scale"] = params.bn_bias_lr_scale
    if params.optimizer == "adamw":
        adamw = ScaledBiasAdamW if scaled else keras.optimizers.AdamW
        optimizer = adamw(lr, weight_decay=params.weight_decay, **options)
    elif params.optimizer == "sgd_nesterov":
        optimizer = (ScaledBiasSGD if scaled else keras.optimizers.SGD)(
            lr, momentum=0.9, nesterov=True, weight_decay=params.weight_decay, **options
        )
    else:
        optimizer = (ScaledBiasAdam if scaled else keras.optimizers.Adam)(lr, **options)
    # Keras' sparse loss has no label smoothing; the dense one needs one-hot labels (make_dataset).
    if params.label_smoothing:
        loss = keras.losses.CategoricalCrossentropy(label_smoothing=params.label_smoothing)
    else:
        loss = keras.losses.SparseCategoricalCrossentropy()
    model.compile(optimizer=optimizer, loss=loss, metrics=["accuracy"])


def live_callback(live_dir: Path) -> keras.callbacks.Callback:
    """DVCLive's Keras callback. After every epoch it rewrites live_dir/metrics.json (what `dvc exp
    show` shows of a running experiment) and one TSV per metric, writes DVC's VS Code signal file
    and, where DVC_STUDIO_TOKEN is set, posts the epoch to Studio. Creating it empties the previous
    run's log, so it is created only when fitting starts; a failed fit leaves its epochs so far.
    dvcyaml=None: dvc.yaml declares the folder itself (a train output, its metrics top-level)."""
    from dvclive.keras import DVCLiveCallback

    from dvclive import Live  # here, not at the top: it imports DVC, which only this needs

    return DVCLiveCallback(live=Live(dir=str(live_dir), dvcyaml=None, save_dvc_exp=False, report=None))


def training_callbacks(
    params: TrainParams, history_csv: Path, epoch: tf.Variable | None, live_dir: Path | None = None
) -> list:
    """The history CSV (epochs from 1), a stop on NaN, the alternate-flip epoch counter, early
    stopping, and the live log when live_dir is given."""
    callbacks = [EpochFromOneCSVLogger(str(history_csv)), keras.callbacks.TerminateOnNaN()]
    if epoch is not None:
        callbacks.append(keras.callbacks.LambdaCallback(on_epoch_begin=lambda number, logs=None: epoch.assign(number)))
    if params.early_stopping_patience:
        callbacks.append(
            keras.callbacks.EarlyStopping(
                monitor="val_accuracy", patience=params.early_stopping_patience, restore_best_weights=True
            )
        )
    if live_dir is not None:
        callbacks.append(live_callback(live_dir))
    return callbacks


def settled_bn_momentum(momentum: float, total_steps: int) -> float:
    """BatchNorm's inference statistics are moving averages that start at mean 0, variance 1; at
    momentum m they average over ~1/(1 - m) steps and keep m^steps of the start. The recipe's 0.99
    suits a full run (the default's 3,798 steps), but one epoch (211 steps) kept 12 % of the start:
    that model trained to 0.76 accuracy and tested at 0.12 (issue #27). So the momentum is capped
    to average over at most the last tenth of the run, 1 - 10/steps (the start keeps < e^-10): the
    default's full run is unchanged (its cap is 0.9974), one epoch of it gets 0.953."""
    return min(momentum, max(0.0, 1 - 10 / total_steps))


def check_converged(losses: list[float], learning_rate: float) -> None:
    """TerminateOnNaN stops a diverging fit but returns normally: make it an error (no model kept)."""
    if not losses or not np.all(np.isfinite(losses)):
        raise WardrobeError(
            f"train: loss became {losses[-1] if losses else 'undefined'} at epoch {len(losses)}; "
            f"lower train.learning_rate (now {learning_rate}); no model was written"
        )


def fit(
    params: TrainParams,
    train: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray],
    history_csv: Path,
    num_classes: int,
    verbose: int | str = "auto",
    strategy: tf.distribute.Strategy | None = None,
    precision: str | None = None,
    live_dir: Path | None = None,
) -> keras.Model:
    """Train and return the model; raises WardrobeError if the loss diverges (no model is kept).
    With live_dir, DVCLive logs each epoch there as it ends (the chief's fit only).

    `train.batch_size` is per replica: the global batch is batch_size × replicas and the
    learning rate is scaled by the replica count (linear scaling), so one replica is unchanged.
    `precision` is the Keras dtype policy main decided (and recorded); None decides it here.
    """
    strategy = strategy or distribution_strategy(params.strategy)
    seed_everything(params.seed)
    replicas = strategy.num_replicas_in_sync
    global_batch = params.batch_size * replicas
    one_hot = num_classes if params.label_smoothing > 0 else None
    epoch = tf.Variable(0, dtype=tf.int64, trainable=False) if params.augment_flip == "alternate" else None
    train_ds = make_dataset(
        *train, global_batch, params.seed, one_hot, flip=params.augment_flip, shift=params.augment_shift, epoch=epoch
    )
    val_ds = make_dataset(*val, global_batch, shuffle_seed=None, one_hot=one_hot)
    if replicas > 1:
        params = dataclasses.replace(params, learning_rate=params.learning_rate * replicas)
    steps_per_epoch = math.ceil(len(train[0]) / global_batch)
    if params.bn_momentum is not None:
        momentum = settled_bn_momentum(params.bn_momentum, params.epochs * steps_per_epoch)
        if momentum != params.bn_momentum:
            print(
                f"train: BatchNorm momentum {momentum:.4f} (train.bn_momentum {params.bn_momentum} capped "
                f"for a {params.epochs * steps_per_epoch}-step run, so its statistics settle)"
            )
            params = dataclasses.replace(params, bn_momentum=momentum)
    precision = precision or choose_precision(params.precision, compute_device())[0]
    with strategy.scope(), dtype_policy(precision):
        model = build_model(params, train[0].shape[1:], num_classes)
        if params.arch == "cnn":
            initialize_convs(model, params, train[0])
        compile_model(model, params, steps_per_epoch=steps_per_epoch)
    if uses_distribution(strategy):
        fix_keras_for_distribution(model, train_ds)
    callbacks = training_callbacks(params, history_csv, epoch, live_dir)
    # shuffle=False: the dataset shuffles itself (seeded); Keras can't shuffle a tf.data input.
    try:
        history = model.fit(
            train_ds, validation_data=val_ds, epochs=params.epochs, callbacks=callbacks, verbose=verbose, shuffle=False
        )
    except tf.errors.UnavailableError as error:  # only collective ops across workers raise it
        raise lost_worker_error(error) from None
    check_converged(history.history.get("loss", []), params.learning_rate)
    return model


def validation_temperature(
    model: keras.Model, val: tuple[ImageFile | np.ndarray, np.ndarray], views: Views, params: TrainParams
) -> tuple[float, np.ndarray]:
    """The temperature (1 when train.calibrate is off) fitted on the validation split, on the
    probabilities as the model's views average them; and those probabilities."""
    # At training's batch size: the memory training needed is enough (a larger batch of large
    # pictures would raise the stage's peak above the fit's).
    raw = predict_proba(model, val[0], params.batch_size, views)
    return (fit_temperature(raw, val[1]) if params.calibrate else 1.0), raw


def fit_calibration(
    model: keras.Model,
    train: tuple[ImageFile | np.ndarray, np.ndarray],
    val: tuple[ImageFile | np.ndarray, np.ndarray],
    views: Views,
    params: TrainParams,
) -> tuple[float, FeatureDensity, float]:
    """The validation temperature; the training images' feature density; and the feature distance
    `accept_fraction` of the validation images stay within."""
    temperature, raw = validation_temperature(model, val, views, params)
    calibrated = calibrate(raw, temperature)
    density = feature_density(model, train, raw.shape[1], params.batch_size)
    threshold = distance_threshold(
        density.distance(plain_features(model, val[0], params.batch_size)), params.accept_fraction
    )
    print(
        f"train: temperature {temperature:g} (validation NLL {nll(raw, val[1]):.4f} → {nll(calibrated, val[1]):.4f}, "
        f"ECE {ece(raw, val[1]):.4f} → {ece(calibrated, val[1]):.4f}); pictures whose features are farther than "
        f"{threshold:.4g} from the training images' are flagged as unlike the training data "
        f"({params.accept_fraction:.0%} of validation passes)"
    )
    return temperature, density, threshold


def feature_density(
    model: keras.Model, train: tuple[ImageFile | np.ndarray, np.ndarray], classes: int, batch_size: int
) -> FeatureDensity:
    """The training images' features (unmoved, as predict sees a picture) as class means and shared
    covariance, a chunk of images at a time."""
    images, labels = train
    fit_state, start = None, 0
    for features in feature_chunks(model, images, batch_size):
        fit_state = fit_state or DensityFit(classes, features.shape[1])
        fit_state.add(features, labels[start : start + len(features)])
        start += len(features)
    assert fit_state is not None, "a split has images (prepare refuses an empty one)"
    return fit_state.result()
