"""The project's own Keras layers, registered for loading: every reader of a model file imports
this module (common.load_model), so a model that uses them loads in safe mode anywhere."""

from __future__ import annotations

import keras


@keras.saving.register_keras_serializable(package="wardrobe")
class FusedBatchNormalization(keras.layers.BatchNormalization):
    """Keras' BatchNormalization, computed in training by TensorFlow's fused kernel.

    Keras 3 on TensorFlow normalises with separate moments / batch_normalization ops; on a CPU
    the step of a small convnet is bound by that elementwise traffic, not by the convolutions.
    FusedBatchNormV3 does it in one pass (oneDNN has its own kernel for it): with oneDNN on an
    AVX-512 EPYC, round 2's cnn step ran 1.15× as fast with it, a two-conv block 1.7× (probes
    of BENCHMARKS.md, round 3); with Eigen it changes nothing.
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
