"""The project's own Keras objects, registered for loading: every reader of a model file imports
this module (modelfile.load_model), so a model that uses them (a layer, or in its compile config a
schedule or an optimizer) loads in safe mode anywhere."""

from __future__ import annotations

import keras
import numpy as np


@keras.saving.register_keras_serializable(package="wardrobe")
class FusedBatchNormalization(keras.layers.BatchNormalization):
    """Keras' BatchNormalization, computed in training by TensorFlow's fused kernel.

    Keras 3 on TensorFlow normalises with separate moments / batch_normalization ops; on a CPU
    the step of a small convnet is bound by that elementwise traffic, not by the convolutions.
    FusedBatchNormV3 does it in one pass (oneDNN has its own kernel for it): with oneDNN on an
    AVX-512 EPYC, round 2's cnn step ran 1.15× as fast with it, a two-conv block 1.7× (probes
    of docs/benchmarks.md, round 3); with Eigen it changes nothing.
    Same weights, same config and the same inference path as the parent (moving statistics), so
    the file loads in safe mode (this module registers it) and exports like any BatchNorm. Only
    4-D float32 inputs over the last axis take the fused path; anything else is the parent's.
    """

    def call(self, inputs, training=None, mask=None):
        import tensorflow as tf

        fusable = (
            training
            and len(inputs.shape) == 4
            and self.axis in (-1, 3)
            and inputs.dtype == "float32"
            and self.center
            and self.scale
        )
        if not fusable:
            return super().call(inputs, training=training, mask=mask)
        outputs, mean, variance = tf.compat.v1.nn.fused_batch_norm(
            inputs, self.gamma, self.beta, epsilon=self.epsilon, is_training=True
        )
        # The kernel returns the Bessel-corrected variance for the moving average (as Keras 2's
        # fused path used it); Keras 3's own layer averages the biased one: n/(n-1) ≈ 1 here.
        self.moving_mean.assign(self.moving_mean * self.momentum + mean * (1 - self.momentum))
        self.moving_variance.assign(self.moving_variance * self.momentum + variance * (1 - self.momentum))
        return outputs


@keras.saving.register_keras_serializable(package="wardrobe")
class WarmupLinearDecay(keras.optimizers.schedules.LearningRateSchedule):
    """A straight line from 0 up to `peak` over `warmup_steps`, then straight down to 0 at
    `total_steps` (the speed runs' one-cycle triangle; Keras has warm-up only on CosineDecay)."""

    def __init__(self, peak: float, warmup_steps: int, total_steps: int) -> None:
        self.peak, self.warmup_steps, self.total_steps = peak, warmup_steps, total_steps

    def __call__(self, step):
        step = keras.ops.cast(step, "float32")
        rising = step / self.warmup_steps if self.warmup_steps else keras.ops.ones_like(step)
        falling = (self.total_steps - step) / max(self.total_steps - self.warmup_steps, 1)
        return self.peak * keras.ops.clip(keras.ops.minimum(rising, falling), 0.0, 1.0)

    def get_config(self) -> dict:
        return {"peak": self.peak, "warmup_steps": self.warmup_steps, "total_steps": self.total_steps}


class _ScaledBatchNormBiasRate:
    """Mixin for a Keras optimizer: BatchNorm biases (`beta`) step `bn_bias_lr_scale` times as far.

    Keras' optimizers have one learning rate for all weights; the CIFAR-10 speed runs give the
    BatchNorm biases 64× theirs. Only the optimizer's own step is scaled (AdamW's decoupled
    weight decay keeps the common rate)."""

    def __init__(self, *args, bn_bias_lr_scale: float = 1.0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.bn_bias_lr_scale = bn_bias_lr_scale

    def build(self, variables) -> None:
        super().build(variables)
        self._scaled_indices = {self._get_variable_index(v) for v in variables if v.name == "beta"}

    def update_step(self, gradient, variable, learning_rate):
        if self._get_variable_index(variable) in self._scaled_indices:
            learning_rate = learning_rate * self.bn_bias_lr_scale
        return super().update_step(gradient, variable, learning_rate)

    def get_config(self) -> dict:
        return {**super().get_config(), "bn_bias_lr_scale": self.bn_bias_lr_scale}


@keras.saving.register_keras_serializable(package="wardrobe")
class ScaledBiasAdam(_ScaledBatchNormBiasRate, keras.optimizers.Adam):
    pass


@keras.saving.register_keras_serializable(package="wardrobe")
class ScaledBiasAdamW(_ScaledBatchNormBiasRate, keras.optimizers.AdamW):
    pass


@keras.saving.register_keras_serializable(package="wardrobe")
class ScaledBiasSGD(_ScaledBatchNormBiasRate, keras.optimizers.SGD):
    pass


class TestTimeViews(keras.layers.Layer):
    """N×H×W(×C) images → V×N×H×W(×C): the test-time views (modelfile.Views.offsets) as graph ops, for
    export's serving graph; no trained model holds it.

    A shifted view is the zero-padded image cropped back to size, exactly modelfile.shifted.
    """

    def __init__(self, views: list[tuple[int, int, bool]], **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.views = views

    def call(self, images: keras.KerasTensor) -> keras.KerasTensor:
        height, width = images.shape[1:3]
        pad = max([abs(d) for dy, dx, _ in self.views for d in (dy, dx)] + [0])
        channels = [[0, 0]] * (len(images.shape) - 3)  # RGB images: the channel axis is not padded
        padded = keras.ops.pad(images, [[0, 0], [pad, pad], [pad, pad], *channels]) if pad else images
        stacked = []
        for dy, dx, mirror in self.views:
            view = padded[:, pad - dy : pad - dy + height, pad - dx : pad - dx + width]
            stacked.append(keras.ops.flip(view, axis=2) if mirror else view)
        return keras.ops.stack(stacked, axis=0)


class FeatureDistance(keras.layers.Layer):
    """N×D features → N: calibration.FeatureDensity.distance as graph ops (the Mahalanobis distance
    from the nearest class mean), for export's serving graph; the density is held as constants."""

    def __init__(self, means: np.ndarray, whitening: np.ndarray, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.whitening = whitening.astype(np.float32)
        self.centres = (means.astype(np.float64) @ whitening.astype(np.float64)).astype(np.float32)

    def call(self, features: keras.KerasTensor) -> keras.KerasTensor:
        white = keras.ops.matmul(features, self.whitening)  # N×D
        gaps = keras.ops.expand_dims(white, 1) - self.centres[None]  # N×C×D
        return keras.ops.sqrt(keras.ops.min(keras.ops.sum(keras.ops.square(gaps), axis=-1), axis=-1))
