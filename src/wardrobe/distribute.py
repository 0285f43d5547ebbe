"""Which tf.distribute strategy train uses, and two fixes Keras 3 needs to fit() on several workers.

Multi-worker training is TensorFlow's own MultiWorkerMirroredStrategy, configured from the
`TF_CONFIG` environment variable (docs/scaling.md "Scaling out"). Every worker runs the same training in
lockstep (gradients are all-reduced each step); only the chief writes the model and history.
"""

from __future__ import annotations

import json
import os
import re
import signal
from typing import Any

import keras
import tensorflow as tf

from wardrobe.common import WardrobeError


def check_tf_config(raw: str | None) -> None:
    """Parse and check TF_CONFIG enough to fail with a clear line instead of a gRPC hang or trace."""
    if not raw:
        raise WardrobeError(
            "train.strategy: multi_worker needs TF_CONFIG set on every worker "
            '(e.g. {"cluster": {"worker": ["host1:2222", "host2:2222"]}, "task": {"type": "worker", "index": 0}})'
        )
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as error:
        raise WardrobeError(f"TF_CONFIG: not valid JSON ({error})") from None
    if not isinstance(config, dict) or not all(isinstance(config.get(key), dict) for key in ("cluster", "task")):
        raise WardrobeError(
            'TF_CONFIG: needs "cluster" (addresses per task type) and "task" ({"type": ..., "index": N})'
        )
    cluster, task = config["cluster"], config["task"]
    addresses, index = cluster.get(task.get("type")), task.get("index")
    if not isinstance(addresses, list) or not isinstance(index, int) or not 0 <= index < len(addresses):
        raise WardrobeError(f"TF_CONFIG: task {task} is not in cluster {cluster}")


def distribution_strategy(name: str) -> tf.distribute.Strategy:
    """auto: MirroredStrategy over several visible GPUs, else TensorFlow's default (one device);
    mirrored: always MirroredStrategy (over the GPUs, else the logical CPUs); multi_worker:
    MultiWorkerMirroredStrategy from TF_CONFIG.

    Call it before any other TensorFlow op: the multi-worker strategy must configure the runtime.
    """
    if name == "multi_worker":
        check_tf_config(os.environ.get("TF_CONFIG"))
        check_patched_keras(keras.__version__, name)
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
        # TensorFlow's coordination service catches SIGTERM as a preemption notice and trains on;
        # we keep no preemption checkpoints, so let SIGTERM stop a worker as it stops one machine
        # (the others then fail within seconds, see lost_worker_error).
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        return strategy
    if os.environ.get("TF_CONFIG"):
        print(f"train: TF_CONFIG is set but train.strategy is {name}; training on this machine alone")
    gpus = [device.name for device in tf.config.list_logical_devices("GPU")]
    if name == "mirrored" or (name == "auto" and len(gpus) > 1):
        check_patched_keras(keras.__version__, name)
        # Over the GPUs or, with none, the logical CPUs: one on a normal machine (the same as no
        # strategy), two where the CPU is split (tf.config.set_logical_device_configuration), as
        # the test of this path does without GPUs.
        return tf.distribute.MirroredStrategy(gpus or [device.name for device in tf.config.list_logical_devices("CPU")])
    return tf.distribute.get_strategy()


def lost_worker_error(error: tf.errors.UnavailableError) -> WardrobeError:
    """One line for a cluster that lost a worker mid-training (TF's own message is a page)."""
    tasks = sorted(set(re.findall(r"/job:\w+/replica:\d+/task:\d+", error.message))) or ["another worker"]
    return WardrobeError(
        f"train: lost contact with {', '.join(tasks)} (stopped or unreachable); "
        "no model was written; restart every worker"
    )


def is_multi_worker(strategy: tf.distribute.Strategy) -> bool:
    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)


def writes_outputs(strategy: tf.distribute.Strategy) -> bool:
    """Only the chief (task "chief", or worker 0 when there is none) writes; always true on one machine."""
    return strategy.extended.should_checkpoint


def worker_name(strategy: tf.distribute.Strategy) -> str:
    resolver = strategy.cluster_resolver
    return f"{resolver.task_type} {resolver.task_id}"


# --- Keras 3 under MirroredStrategy and MultiWorkerMirroredStrategy ----------------------------
# Keras 3.15's TensorFlow trainer needs two fixes to fit() under a strategy (both private code),
# reproduced here with TF 2.21 (two workers on 127.0.0.1; two logical CPUs):
#  1. Model._maybe_symbolic_build reads the first batch from a fresh pass over the data only to
#     learn its shapes. That advances a reshuffling dataset by one epoch under any strategy (so
#     `strategy: mirrored` trained on other batches than one device did), and with several
#     workers it fails: "Attempt to convert a value (PerReplica...) to a Tensor"
#     (keras-team/keras#20585). We build from the dataset's element spec instead (shapes and
#     dtypes are all the build needs) and skip Keras' build.
#  2. reduce_per_replica averages each step's scalar logs (loss, metrics) with
#     strategy.reduce("MEAN", v, axis=0): with several workers, "Invalid reduction dimension 0
#     for input with 0 dimensions" (tensorflow/tensorflow#72388). The mean over replicas needs
#     axis=None. Applied under the multi-worker strategy only.
# tests/test_distribute.py checks that two workers, and two mirrored replicas, train what one
# process trains on the same global batch (to float rounding). Delete this block when Keras
# fixes them. Private code moves between releases, so training under a strategy refuses to start
# on a Keras outside the releases these were tested on.
PATCHED_KERAS = ((3, 15), (3, 16))  # [from, to): tested on 3.15.x, the release requirements.lock pins


def check_patched_keras(version: str, strategy: str) -> None:
    match = re.match(r"(\d+)\.(\d+)", version)
    release = (int(match[1]), int(match[2])) if match else (0, 0)
    low, high = PATCHED_KERAS
    if not low <= release < high:
        raise WardrobeError(
            f"train.strategy: {strategy} patches private Keras code tested on Keras {low[0]}.{low[1]}.x "
            f"only, and this is Keras {version}; install the locked versions (make venv) or train on one machine"
        )


def _mean_of_scalar_logs(reduce_per_replica: Any) -> Any:
    def reduce(values: Any, strategy: tf.distribute.Strategy, reduction: str = "auto") -> Any:
        if is_multi_worker(strategy) and reduction in ("auto", "mean"):
            return tf.nest.map_structure(lambda v: strategy.reduce("MEAN", v, axis=None), values)
        return reduce_per_replica(values, strategy, reduction)

    reduce.wardrobe_fix = True
    return reduce


def uses_distribution(strategy: tf.distribute.Strategy) -> bool:
    return isinstance(strategy, tf.distribute.MirroredStrategy | tf.distribute.MultiWorkerMirroredStrategy)


def fix_keras_for_distribution(model: keras.Model, dataset: tf.data.Dataset) -> None:
    """Let model.fit(dataset) run under a (multi-worker) mirrored strategy (see the comment above)."""
    from keras.src.backend.tensorflow import trainer

    with model.distribute_strategy.scope():
        model._symbolic_build(data_batch=dataset.element_spec)
    model._maybe_symbolic_build = lambda iterator=None, data_batch=None: None
    if not getattr(trainer.reduce_per_replica, "wardrobe_fix", False):
        trainer.reduce_per_replica = _mean_of_scalar_logs(trainer.reduce_per_replica)
