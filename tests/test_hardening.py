"""Bad input at every stage entry point: one line naming the file or key, exit 1, no partial
output, and the previous outputs untouched."""

from __future__ import annotations

import contextlib
import copy
import gzip
import hashlib
import http.server
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import REPO, idx_bytes, module_env, run_module, save_wrong_shape_model, write_params
from tests.test_distribute import TF_CONFIG_CASES
from wardrobe.cli import VERBS
from wardrobe.common import WardrobeError
from wardrobe.data.preparation import decompress, parse_idx
from wardrobe.outputs import LIVE_METRICS

OUTPUTS = {
    "prepare": ["data/prepared/x_train.npy", "data/prepared/y_test.npy"],
    "train": ["data/model/model.keras", "plots/train_history.csv"],
    "evaluate": ["metrics/metrics.json", "plots/confusion.csv", "plots/confusion_matrix.png"],
}


def run_stage(stage: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    """A DVC stage, or a verb of the wardrobe command (validate)."""
    if stage in VERBS:
        return run_module("wardrobe", stage, cwd=cwd, timeout=timeout)
    return run_module(f"stages.{stage}", cwd=cwd, timeout=timeout)


@pytest.fixture
def work(tiny_run: Path, tmp_path: Path) -> Path:
    """A private copy of the finished project, so each case can break it freely."""
    shutil.copytree(tiny_run, tmp_path / "w")
    return tmp_path / "w"


def snapshot(work: Path) -> dict[str, bytes]:
    return {str(p.relative_to(work)): p.read_bytes() for p in sorted(work.rglob("*")) if p.is_file()}


PARAMS_INPUTS = {"params.yaml", "conf/config.yaml"}  # what a case edits; everything else must stay


def assert_failed_cleanly(
    result: subprocess.CompletedProcess, message: str, before: dict, work: Path, live_log: bool = False
) -> None:
    """One `error:` line, and every file as it was but the params a case edited (and, with
    live_log, DVCLive's folder: a fit that started logs its epochs there as they end)."""
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert message in lines[0], lines[0]
    assert lines[0].startswith("error: ")

    def kept(files: dict) -> dict:
        live = "dvclive/" if live_log else "\0"
        return {k: v for k, v in files.items() if k not in PARAMS_INPUTS and not k.startswith(live)}

    assert kept(snapshot(work)) == kept(before)  # nothing added, changed, removed


def edit_params(work: Path, change: Callable[[dict], None]) -> None:
    params = yaml.safe_load((work / "params.yaml").read_text())
    change(params)
    write_params(work, params)


PARAM_CASES = [  # (the section a case breaks, the edit, the error)
    ("train", lambda p: p["train"].update(epochz=3), "params.yaml: train.epochz: unknown key"),
    ("train", lambda p: p["train"].update(epochs="five"), "params.yaml: train.epochs: expected int, got str 'five'"),
    ("train", lambda p: p["train"].update(epochs=0), "params.yaml: train.epochs: must be > 0, got 0"),
    (
        "prepare",
        lambda p: p["prepare"].update(val_fraction=1.5),
        "params.yaml: prepare.val_fraction: must be in (0, 1), got 1.5",
    ),
    ("train", lambda p: p["train"].update(arch="vit"), "params.yaml: train.arch: 'vit' is not one of ['mlp', 'cnn']"),
    ("train", lambda p: p["train"].update(optimizer="sgd"), "params.yaml: train.optimizer: 'sgd' is not one of"),
    (
        "evaluate",
        lambda p: p["evaluate"].update(example_grid=0),
        "params.yaml: evaluate.example_grid: must be in 1..10, got 0",
    ),
    ("extra", lambda p: p.update(extra={}), "params.yaml: extra: unknown key"),
]
# Each stage validates the sections DVC re-runs it for (validate, CI's gate, checks them all), and
# every stage rejects an unknown top-level section.
READS = {
    "prepare": {"prepare"},
    "train": {"train"},
    "evaluate": {"evaluate"},
    "card": {"prepare", "train"},
    "validate": {"prepare", "train", "evaluate"},
}
ENTRY_POINT_CASES = [
    pytest.param(stage, change, message, id=f"{stage}-{message.split(': ')[1]}")
    for section, change, message in PARAM_CASES
    for stage, sections in READS.items()
    if section in sections | {"extra"}
]


@pytest.mark.pipeline
@pytest.mark.parametrize(("stage", "change", "message"), ENTRY_POINT_CASES)
def test_bad_params_at_every_entry_point(work: Path, stage: str, change, message: str) -> None:
    before = snapshot(work)
    edit_params(work, change)
    assert_failed_cleanly(run_stage(stage, work), message, before, work)


@pytest.mark.pipeline
def test_a_typo_in_train_does_not_stop_prepare(work: Path) -> None:
    """prepare does not depend on `train` (DVC would not re-run it for a change there)."""
    edit_params(work, lambda p: p["train"].update(epochz=3))
    result = run_stage("prepare", work)
    assert result.returncode == 0, result.stderr


@pytest.mark.pipeline
@pytest.mark.parametrize("stage", ["prepare", "train", "evaluate"])
def test_malformed_and_missing_params_file(work: Path, stage: str) -> None:
    before = snapshot(work)
    (work / "params.yaml").write_text("train: {epochs: [1,\n")
    assert_failed_cleanly(run_stage(stage, work), "params.yaml: malformed YAML", before, work)
    (work / "params.yaml").unlink()
    assert_failed_cleanly(run_stage(stage, work), "params.yaml: cannot read params file", before, work)


# ---- data ------------------------------------------------------------------------------------

LABELS = "train-labels-idx1-ubyte"
IMAGES = "train-images-idx3-ubyte"


def _replace(source: Path, name: str, raw: bytes, gz: bool = True) -> str:
    """Put `raw` as the file `name` in `source`; return the SHA-256 to pin so it verifies."""
    (source / f"{name}.gz").unlink()
    (source / (f"{name}.gz" if gz else name)).write_bytes(gzip.compress(raw) if gz else raw)
    return hashlib.sha256(raw).hexdigest()


def _broken_gz(source: Path, name: str, data: bytes) -> None:
    (source / f"{name}.gz").write_bytes(data)


DATA_CASES = {
    "checksum-mismatch": (lambda s, p: p["data"]["sha256"].update({LABELS: "0" * 64}), "SHA-256 mismatch"),
    "truncated-gz": (
        lambda s, p: _broken_gz(s, LABELS, (s / f"{LABELS}.gz").read_bytes()[:-20]),
        "truncated gzip file",
    ),
    "not-gzip": (lambda s, p: _broken_gz(s, LABELS, b"hello, not gzip"), "not a gzip file"),
    "empty-file": (lambda s, p: _broken_gz(s, LABELS, b""), "not a gzip file"),
    "wrong-magic": (
        lambda s, p: p["data"]["sha256"].update({LABELS: _replace(s, LABELS, b"\x00\x00\x0d\x01" + bytes(4))}),
        f"{LABELS}: wrong IDX magic number 0x00000d01",
    ),
    "wrong-dims": (
        lambda s, p: p["data"]["sha256"].update({IMAGES: _replace(s, IMAGES, idx_bytes(np.zeros((120, 28, 27))))}),
        "test set: images are (28, 28), the train set's (28, 27)",
    ),
    "count-mismatch": (
        lambda s, p: p["data"]["sha256"].update({LABELS: _replace(s, LABELS, idx_bytes(np.zeros(7, np.uint8)))}),
        "train set: 120 images but 7 labels",
    ),
    "label-out-of-range": (
        lambda s, p: p["data"]["sha256"].update(
            {LABELS: _replace(s, LABELS, idx_bytes(np.full(120, 12, np.uint8)), gz=False)}
        ),
        "train set: label 12 outside 0..9",
    ),
    # Root reads any file whatever its mode, so an unreadable entry is a directory named like
    # the file (reading it fails with an OSError, as a permission error would).
    "unreadable-source": (
        lambda s, p: ((s / f"{LABELS}.gz").unlink(), (s / f"{LABELS}.gz").mkdir()),
        f"{LABELS}.gz: Is a directory",
    ),
    "missing-dir": (lambda s, p: p["data"].update(sources=[str(s / "nowhere")]), "nowhere: no such directory"),
}


@pytest.mark.pipeline
@pytest.mark.parametrize("case", list(DATA_CASES))
def test_bad_data_fails_prepare_cleanly(work: Path, idx_source: tuple[Path, dict[str, str]], case: str) -> None:
    source = work.parent / "source"
    shutil.copytree(idx_source[0], source)
    params = yaml.safe_load((work / "params.yaml").read_text())
    params["data"]["sources"] = [str(source)]
    breakage, message = DATA_CASES[case]
    breakage(source, params)
    write_params(work, params)
    before = snapshot(work)
    assert_failed_cleanly(run_stage("prepare", work), message, before, work)


class _Mirror(http.server.BaseHTTPRequestHandler):
    mode = "hang"

    def do_GET(self) -> None:
        self.send_response(200)
        if self.mode == "hang":
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self.wfile.write(b"\x1f\x8b")
            self.wfile.flush()
            time.sleep(5)
        elif self.mode == "announce-huge":
            self.send_header("Content-Length", str(50 * 2**20))
            self.end_headers()
        else:  # stream past the cap without announcing a length
            self.end_headers()
            for _ in range(40):
                self.wfile.write(b"\x00" * 2**16)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def mirror() -> Iterator[tuple[str, type[_Mirror]]]:
    handler = type("Mirror", (_Mirror,), {})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", handler
    server.shutdown()
    server.server_close()


@pytest.mark.pipeline
@pytest.mark.parametrize(
    ("mode", "message"),
    [
        ("hang", "download failed: timed out"),
        ("announce-huge", "server announces 52428800 bytes, over the 1048576-byte cap"),
        ("stream-huge", "download exceeds the 1048576-byte cap"),
    ],
)
def test_bad_mirror_fails_prepare_cleanly(work: Path, mirror, mode: str, message: str) -> None:
    url, handler = mirror
    handler.mode = mode
    edit_params(
        work,
        lambda p: (p["data"].update(sources=[url]), p["prepare"].update(download_timeout_s=0.5, max_download_mb=1)),
    )
    before = snapshot(work)
    started = time.monotonic()
    result = run_stage("prepare", work, timeout=60)
    assert_failed_cleanly(result, message, before, work)
    assert time.monotonic() - started < 30


# ---- training --------------------------------------------------------------------------------


@pytest.mark.pipeline
def test_diverging_training_writes_no_model(work: Path) -> None:
    before = snapshot(work)
    edit_params(work, lambda p: p["train"].update(learning_rate=1e30, epochs=3))
    assert_failed_cleanly(
        run_stage("train", work),
        "train: loss became nan at epoch 1; lower train.learning_rate",
        before,
        work,
        live_log=True,
    )
    # DVCLive's folder holds the failed fit's one epoch (the model, metrics/ and plots/ are as before):
    live = json.loads((work / LIVE_METRICS).read_text())
    assert live["step"] == 0 and math.isnan(float(live["train"]["loss"])), live  # DVCLive writes NaN as text


@pytest.mark.pipeline
@pytest.mark.parametrize(("tf_config", "message"), TF_CONFIG_CASES[:2], ids=["unset", "not JSON"])
def test_multi_worker_without_cluster_fails_train_cleanly(work: Path, tf_config: str | None, message: str) -> None:
    """Checked before TensorFlow would wait for a cluster that isn't there."""
    before = snapshot(work)
    edit_params(work, lambda p: p["train"].update(strategy="multi_worker"))
    env = module_env(TF_CONFIG=tf_config) if tf_config else module_env()
    if tf_config is None:
        env.pop("TF_CONFIG", None)
    assert_failed_cleanly(run_module("stages.train", cwd=work, env=env), message, before, work)


@pytest.mark.pipeline
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_killed_training_keeps_old_model_and_rerun_completes(work: Path, sig: signal.Signals) -> None:
    edit_params(work, lambda p: p["train"].update(epochs=60, batch_size=4))
    before = snapshot(work)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "stages.train"], cwd=work, env=env, stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # wait until a few epochs are logged to the temp history
        temps = list((work / "plots").glob(".train_history.csv.*"))
        if temps and temps[0].exists() and temps[0].read_text().count("\n") >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(sig)
    assert proc.wait(30) != 0
    after = snapshot(work)
    for path in OUTPUTS["train"]:
        assert after[path] == before[path], path  # the previous model and history survive
    assert run_stage("train", work).returncode == 0
    history = (work / "plots/train_history.csv").read_text().splitlines()
    assert len(history) == 61 and history[-1].startswith("60,")
    assert sorted(p.name for p in (work / "data/model").iterdir()) == ["model.keras"]  # temp files gone
    assert not list((work / "plots").glob(".*"))


# ---- evaluate --------------------------------------------------------------------------------


@pytest.mark.pipeline
@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        (lambda w: (w / "data/model/model.keras").unlink(), "data/model/model.keras: model file not found"),
        (
            lambda w: (w / "data/model/model.keras").write_bytes(b"garbage"),
            "data/model/model.keras: cannot read the model's metadata",
        ),
        (
            lambda w: save_wrong_shape_model(w / "data/model/model.keras"),
            "model maps (32, 32) to (10,), but its file records (28, 28) images of 10 classes",
        ),
        (lambda w: (w / "data/prepared/x_test.npy").write_bytes(b"\x93NUMPY"), "cannot load split 'test'"),
    ],
    ids=["missing-model", "corrupt-model", "wrong-input-shape", "corrupt-data"],
)
def test_evaluate_bad_inputs(work: Path, breakage, message: str) -> None:
    breakage(work)
    before = snapshot(work)
    assert_failed_cleanly(run_stage("evaluate", work), message, before, work)


# ---- property-based: the parsers raise our error, nothing else, and never hang ------------------


@settings(max_examples=300, deadline=1000)
@given(st.binary(max_size=4096))
def test_idx_parser_random_bytes(data: bytes) -> None:
    try:
        array = parse_idx(data, "f")
    except WardrobeError:
        return
    assert array.dtype == np.uint8


@settings(max_examples=200, deadline=1000)
@given(st.integers(0, 10**6), st.integers(0, 255), st.integers(0, 40))
def test_idx_parser_mutated_valid_file(position: int, value: int, cut: int) -> None:
    data = bytearray(idx_bytes(np.arange(3 * 28 * 28, dtype=np.uint32).astype(np.uint8).reshape(3, 28, 28)))
    data[position % len(data)] = value
    with contextlib.suppress(WardrobeError):  # any other exception fails the test
        parse_idx(bytes(data[: len(data) - cut]), "f")


@settings(max_examples=300, deadline=1000)
@given(st.binary(max_size=2048), st.integers(0, 10**6), st.integers(0, 255))
def test_gunzip_random_and_mutated(data: bytes, position: int, value: int) -> None:
    for blob in (data, b"\x1f\x8b" + data):
        mutated = bytearray(gzip.compress(copy.copy(blob), mtime=0))
        mutated[position % len(mutated)] = value
        for candidate in (blob, bytes(mutated)):
            with contextlib.suppress(WardrobeError):
                decompress(candidate)
