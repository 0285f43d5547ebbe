"""The device train computes on, the precision chosen for it, and the record of both (with the
library versions) that train writes next to the metrics: the environment is an input too."""

from __future__ import annotations

import platform
from dataclasses import dataclass, field
from pathlib import Path

from wardrobe.outputs import ENVIRONMENT_KEYS

BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")  # native bfloat16 multiplies (Zen 4, Sapphire Rapids)


@dataclass(frozen=True)
class Device:
    """What decides the precision: the kind of device, and its compute capability or CPU flags."""

    kind: str  # "GPU" or "CPU"
    name: str
    compute_capability: tuple[int, int] | None = None  # GPUs only
    cpu_flags: frozenset[str] = field(default_factory=frozenset)  # CPUs only (Linux)


def choose_precision(setting: str, device: Device) -> tuple[str, str]:
    """Keras dtype policy for train.precision on this device, and why, in words.

    auto: on a GPU, bfloat16 from compute capability 8.0 (Ampere: bfloat16 tensor cores, the
    float32 exponent range, no loss scaling), float16 on 7.x (Volta/Turing tensor cores; Keras
    wraps the optimizer in a LossScaleOptimizer), else float32. On a CPU, bfloat16 only where it
    multiplies it natively (1.75× faster steps measured on AVX512_BF16; emulated, it is slower).
    """
    if setting != "auto":
        return setting, f"train.precision is {setting}"
    if device.kind == "GPU":
        capability = device.compute_capability or (0, 0)
        described = f"GPU {device.name} (compute capability {capability[0]}.{capability[1]})"
        if capability >= (8, 0):
            return "mixed_bfloat16", f"{described} has bfloat16 tensor cores"
        if capability >= (7, 0):
            return "mixed_float16", f"{described} has float16 tensor cores, not bfloat16"
        return "float32", f"{described} has no tensor cores"
    native = sorted(set(BF16_CPU_FLAGS) & device.cpu_flags)
    if native:
        return "mixed_bfloat16", f"CPU {device.name} multiplies bfloat16 natively ({', '.join(native)})"
    return "float32", f"CPU {device.name} has no native bfloat16 ({' or '.join(BF16_CPU_FLAGS)})"


def read_cpu(cpuinfo: Path = Path("/proc/cpuinfo")) -> Device:
    """The CPU's model name and flags from /proc/cpuinfo (Linux); elsewhere a name and no flags."""
    try:
        lines = cpuinfo.read_text().splitlines()
    except OSError:
        return Device("CPU", platform.processor() or platform.machine())
    values = {key.strip(): value.strip() for key, _, value in (line.partition(":") for line in lines) if value}
    return Device(
        "CPU", values.get("model name", platform.machine()), cpu_flags=frozenset(values.get("flags", "").split())
    )


def compute_device() -> Device:
    """The device Keras places the model on: the first visible GPU, else the CPU."""
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        return read_cpu()
    details = tf.config.experimental.get_device_details(gpus[0])
    return Device("GPU", details.get("device_name", gpus[0].name), compute_capability=details.get("compute_capability"))


def cpu_kernels() -> str:
    """Which library computes on the CPU: oneDNN (stages/__init__.py turns it on) or Eigen
    (TF_ENABLE_ONEDNN_OPTS=0). They round differently, so they train different models."""
    from tensorflow.python.util import _pywrap_util_port  # TensorFlow's own test of the setting

    return "oneDNN" if _pywrap_util_port.IsMklEnabled() else "Eigen"


def environment_record(device: Device, precision: str, reason: str, replicas: int) -> dict[str, str | int]:
    """Flat strings and numbers, so `dvc metrics diff` shows each change on its own line."""
    import keras
    import numpy as np
    import tensorflow as tf

    values = (
        platform.python_version(),
        tf.__version__,
        keras.__version__,
        np.__version__,
        device.kind,
        device.name,
        cpu_kernels(),
        replicas,
        precision,
        reason,
    )
    return dict(zip(ENVIRONMENT_KEYS, values, strict=True))
