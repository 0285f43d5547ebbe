"""wardrobe/distribute.py: the strategies, TF_CONFIG checks, and two MultiWorkerMirroredStrategy
workers for real on 127.0.0.1."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from tests.conftest import REPO, free_port, module_env, run_module, set_params, tiny_params, write_params
from wardrobe.common import WardrobeError
from wardrobe.distribute import check_tf_config
from wardrobe.model.file import load_model
from wardrobe.outputs import ENVIRONMENT_JSON, HISTORY_CSV, LIVE_METRICS, MODEL_PATH

TF_CONFIG_CASES = [
    (None, "train.strategy: multi_worker needs TF_CONFIG set on every worker"),
    ("{worker", "TF_CONFIG: not valid JSON"),
    ('{"cluster": {"worker": ["127.0.0.1:1"]}}', 'TF_CONFIG: needs "cluster" (addresses per task type) and "task"'),
    ('{"cluster": {"worker": ["127.0.0.1:1"]}, "task": {"type": "worker", "index": 1}}', "is not in cluster"),
    ('{"cluster": {"worker": ["127.0.0.1:1"]}, "task": {"type": "ps", "index": 0}}', "is not in cluster"),
]


@pytest.mark.parametrize(("tf_config", "message"), TF_CONFIG_CASES)
def test_bad_tf_config_is_one_clear_line(tf_config: str | None, message: str) -> None:
    with pytest.raises(WardrobeError, match=re.escape(message)):
        check_tf_config(tf_config)


def test_mirrored_strategy_trains(tmp_path: Path, idx_source: tuple[Path, dict[str, str]]) -> None:
    """The distribution code path (strategy scope, per-replica batch) on the replicas visible here."""
    import dataclasses

    import tensorflow as tf

    from tests.conftest import synthetic_images
    from wardrobe.data.preparation import normalize
    from wardrobe.distribute import distribution_strategy
    from wardrobe.params import parse_params
    from wardrobe.training import fit

    params = dataclasses.replace(parse_params(tiny_params(*idx_source)).train, strategy="mirrored", epochs=2)
    assert isinstance(distribution_strategy("mirrored"), tf.distribute.MirroredStrategy)
    if len(tf.config.list_logical_devices("GPU")) < 2:  # auto mirrors only across several GPUs
        assert not isinstance(distribution_strategy("auto"), tf.distribute.MirroredStrategy)
    x, y = synthetic_images(8, seed=3)
    model = fit(params, (normalize(x), y), (normalize(x), y), tmp_path / "h.csv", 10, verbose=0)
    assert (tmp_path / "h.csv").read_text().count("\n") == 3
    assert float(np.mean(model.predict(normalize(x), verbose=0).argmax(1) == y)) > 0.3


# train's main() in a process whose one CPU is split into two logical devices first (it must be
# done before TensorFlow initialises), so `strategy: mirrored` has two replicas without GPUs.
TWO_LOGICAL_CPUS = """
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from wardrobe.common import run_main
from stages.train import main
run_main(main)
"""


@pytest.mark.pipeline
def test_two_mirrored_cpu_replicas_train_what_one_process_trains(
    tmp_path: Path, idx_source: tuple[Path, dict[str, str]]
) -> None:
    """MirroredStrategy's path (as on several GPUs) over two logical CPUs: the model and history
    are the ones one replica trains on the same global batch (2 × 15, learning rate × 2), and the
    environment record says two replicas."""
    mirrored, _, single = distributed_and_single(tmp_path, idx_source, "mirrored")
    run = subprocess.run(
        [sys.executable, "-c", TWO_LOGICAL_CPUS], cwd=mirrored, env=module_env(), capture_output=True, text=True
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert run_module("stages.train", cwd=single).returncode == 0
    assert json.loads((mirrored / ENVIRONMENT_JSON).read_text())["replicas"] == 2
    assert json.loads((single / ENVIRONMENT_JSON).read_text())["replicas"] == 1
    assert_trained_alike(mirrored, single)


def test_strategies_refuse_a_keras_their_patches_were_not_tested_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """The patches below touch private Keras code: outside the tested releases, one line, before
    any cluster is set up."""
    import keras

    from wardrobe.distribute import PATCHED_KERAS, check_patched_keras, distribution_strategy

    check_patched_keras(keras.__version__, "mirrored")  # the locked release is inside the range
    check_patched_keras(f"{PATCHED_KERAS[0][0]}.{PATCHED_KERAS[0][1]}.9", "mirrored")
    for outside in ("3.14.2", f"{PATCHED_KERAS[1][0]}.{PATCHED_KERAS[1][1]}.0", "4.0.0rc1", "nightly"):
        with pytest.raises(WardrobeError, match=r"^train\.strategy: multi_worker patches private Keras code tested on"):
            check_patched_keras(outside, "multi_worker")
    monkeypatch.setattr(keras, "__version__", "3.99.0")
    monkeypatch.setenv(
        "TF_CONFIG", json.dumps({"cluster": {"worker": ["127.0.0.1:1"]}, "task": {"type": "worker", "index": 0}})
    )
    for strategy in ("multi_worker", "mirrored"):
        with pytest.raises(
            WardrobeError, match=rf"^train\.strategy: {strategy} .* this is Keras 3\.99\.0; install the"
        ):
            distribution_strategy(strategy)


def distributed_and_single(tmp_path: Path, idx_source: tuple[Path, dict[str, str]], strategy: str) -> tuple[Path, ...]:
    """Two prepared copies of a tiny project training 2 epochs at 15 images per replica under
    `strategy`, and a third that trains the same global batch (30) on one device, with the
    learning rate scaled as train scales it for two replicas."""
    params = tiny_params(*idx_source)
    set_params(params, train__epochs=2, train__batch_size=15, train__dropout=0.0, train__strategy=strategy)
    first, second = two_host_projects(tmp_path, params)
    single = tmp_path / "single"
    shutil.copytree(first, single)
    mlp_learning_rate = yaml.safe_load((REPO / "conf/train/mlp.yaml").read_text())["learning_rate"]
    single_train = {**params["train"], "strategy": "auto", "batch_size": 30, "learning_rate": 2 * mlp_learning_rate}
    write_params(single, {**params, "train": single_train})
    return first, second, single


def assert_trained_alike(project: Path, single: Path) -> None:
    """Same history and weights, to float rounding (replicas sum gradients in another order)."""
    np.testing.assert_allclose(
        pd.read_csv(project / HISTORY_CSV).to_numpy(), pd.read_csv(single / HISTORY_CSV).to_numpy(), rtol=1e-4
    )
    for distributed, one in zip(
        load_model(project / MODEL_PATH).get_weights(), load_model(single / MODEL_PATH).get_weights(), strict=True
    ):
        np.testing.assert_allclose(distributed, one, rtol=1e-4, atol=1e-6)


def two_host_projects(tmp_path: Path, params: dict) -> tuple[Path, Path]:
    """Two copies of a prepared tiny project, as on two hosts (same commit, same data/prepared)."""
    chief = tmp_path / "host0"
    chief.mkdir()
    write_params(chief, params)
    assert run_module("stages.prepare", cwd=chief).returncode == 0
    shutil.copytree(chief, tmp_path / "host1")
    return chief, tmp_path / "host1"


def written_files(project: Path) -> list[Path]:
    """Files train added to a project made by two_host_projects (temp files included)."""
    return [
        path
        for path in project.rglob("*")
        if path.is_file() and path.name != "params.yaml" and not {"prepared", "conf"} & set(path.parts)
    ]


def start_workers(*directories: Path) -> list[subprocess.Popen]:
    """`python -m stages.train` in each directory, as the workers of one cluster on 127.0.0.1."""
    cluster = {"worker": [f"127.0.0.1:{free_port()}" for _ in directories]}
    return [
        subprocess.Popen(
            [sys.executable, "-m", "stages.train"],
            cwd=directory,
            env=module_env(
                TF_CONFIG=json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}}),
                PYTHONUNBUFFERED="1",
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for index, directory in enumerate(directories)
    ]


@contextlib.contextmanager
def killed_at_exit(processes: list[subprocess.Popen]) -> Iterator[list[subprocess.Popen]]:
    try:
        yield processes
    finally:
        for process in processes:
            process.kill()
            process.communicate()


@pytest.mark.pipeline
def test_two_workers_train_what_one_process_trains(tmp_path: Path, idx_source: tuple[Path, dict[str, str]]) -> None:
    """Two MultiWorkerMirroredStrategy workers on 127.0.0.1, each in its own copy of the project:
    both finish, only the chief writes, and the model is the one a single process trains on the
    same global batch (2 × 15) with the same scaled learning rate."""
    chief, worker, single = distributed_and_single(tmp_path, idx_source, "multi_worker")

    with killed_at_exit(start_workers(chief, worker)) as workers:
        outputs = [process.communicate(timeout=240) for process in workers]
    for process, (stdout, stderr) in zip(workers, outputs, strict=True):
        assert process.returncode == 0, stdout + stderr
    assert f"wrote {MODEL_PATH}" in outputs[0][0]
    assert "worker 1 done; the chief writes" in outputs[1][0]
    assert written_files(worker) == []  # no model, history or DVCLive log from the other worker
    assert json.loads((chief / LIVE_METRICS).read_text())["step"] == 1  # the chief's live log: 2 epochs

    assert run_module("stages.train", cwd=single).returncode == 0
    assert list(pd.read_csv(chief / HISTORY_CSV)["epoch"]) == [1, 2]
    assert_trained_alike(chief, single)


@pytest.mark.pipeline
def test_a_stopped_worker_fails_the_chief_cleanly(tmp_path: Path, idx_source: tuple[Path, dict[str, str]]) -> None:
    """SIGTERM stops a worker (TF would take it as a preemption notice and train on); the chief
    notices within seconds and exits with one line, writing no model (its live log keeps the
    epochs it finished, as any failed run's does)."""
    params = tiny_params(*idx_source)
    set_params(params, train__epochs=100_000, train__batch_size=15, train__strategy="multi_worker")
    chief, worker = two_host_projects(tmp_path, params)
    with killed_at_exit(start_workers(chief, worker)) as (chief_process, worker_process):
        for line in worker_process.stdout:  # wait until they train together
            if line.startswith("Epoch 3/"):
                break
        worker_process.send_signal(signal.SIGTERM)
        assert worker_process.wait(timeout=30) == -signal.SIGTERM
        _, stderr = chief_process.communicate(timeout=120)
    assert chief_process.returncode == 1
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1] == (
        "error: train: lost contact with /job:worker/replica:0/task:1 (stopped or unreachable); "
        "no model was written; restart every worker"
    )
    # No model, history or environment record; only DVCLive's log of the epochs the chief finished:
    assert {path.relative_to(chief).parts[0] for path in written_files(chief)} == {"dvclive"}
    assert json.loads((chief / LIVE_METRICS).read_text())["step"] >= 1
    assert written_files(worker) == []
