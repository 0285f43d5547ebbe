"""wardrobe/environment.py: the precision chosen for each kind of device, and the run's record."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from wardrobe.environment import Device, choose_precision, compute_device, environment_record, read_cpu

A100 = Device("GPU", "NVIDIA A100-SXM4-40GB", compute_capability=(8, 0))
T4 = Device("GPU", "Tesla T4", compute_capability=(7, 5))
K80 = Device("GPU", "Tesla K80", compute_capability=(3, 7))
ZEN4 = Device("CPU", "AMD EPYC 9R14", cpu_flags=frozenset({"avx2", "avx512f", "avx512_bf16"}))
SAPPHIRE_RAPIDS = Device("CPU", "Intel Xeon Platinum 8488C", cpu_flags=frozenset({"avx512f", "amx_bf16"}))
ZEN3 = Device("CPU", "AMD EPYC 7B13", cpu_flags=frozenset({"avx2", "fma"}))


@pytest.mark.parametrize(
    ("device", "policy", "reason"),
    [
        (A100, "mixed_bfloat16", "GPU NVIDIA A100-SXM4-40GB (compute capability 8.0) has bfloat16 tensor cores"),
        (T4, "mixed_float16", "GPU Tesla T4 (compute capability 7.5) has float16 tensor cores, not bfloat16"),
        (K80, "float32", "GPU Tesla K80 (compute capability 3.7) has no tensor cores"),
        (ZEN4, "mixed_bfloat16", "CPU AMD EPYC 9R14 multiplies bfloat16 natively (avx512_bf16)"),
        (SAPPHIRE_RAPIDS, "mixed_bfloat16", "CPU Intel Xeon Platinum 8488C multiplies bfloat16 natively (amx_bf16)"),
        (ZEN3, "float32", "CPU AMD EPYC 7B13 has no native bfloat16 (avx512_bf16 or amx_bf16)"),
    ],
)
def test_auto_precision_is_chosen_by_the_device_that_computes(device: Device, policy: str, reason: str) -> None:
    assert choose_precision("auto", device) == (policy, reason)


def test_an_explicit_precision_is_kept_on_every_device() -> None:
    for device in (A100, K80, ZEN3):
        assert choose_precision("float32", device) == ("float32", "train.precision is float32")
        assert choose_precision("mixed_float16", device)[0] == "mixed_float16"


def test_read_cpu_takes_the_model_name_and_flags(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu avx2 fma\n\nprocessor\t: 1\n")
    assert read_cpu(cpuinfo) == Device("CPU", "AMD EPYC", cpu_flags=frozenset({"fpu", "avx2", "fma"}))
    assert read_cpu(tmp_path / "missing").cpu_flags == frozenset()


def test_the_record_holds_versions_device_and_precision() -> None:
    import keras
    import numpy as np
    import tensorflow as tf

    device = compute_device()  # this machine: no GPU
    assert device.kind == "CPU" and device.name
    policy, reason = choose_precision("auto", device)
    record = environment_record(device, policy, reason, replicas=1)
    assert record["tensorflow"] == tf.__version__ and record["keras"] == keras.__version__
    assert record["numpy"] == np.__version__ and record["python"].count(".") == 2
    assert (record["device"], record["device_name"], record["replicas"]) == ("CPU", device.name, 1)
    assert (record["precision"], record["precision_reason"]) == (policy, reason)
    # stages/__init__.py turns oneDNN on unless the environment said otherwise
    assert record["kernels"] == ("Eigen" if os.environ.get("TF_ENABLE_ONEDNN_OPTS") == "0" else "oneDNN")
    assert all(isinstance(value, str | int) for value in record.values())  # flat: one dvc metrics diff line each
