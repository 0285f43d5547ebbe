"""wardrobe/__init__.py: oneDNN on, TensorFlow's banners hidden; native warnings and errors are not."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

BANNER_LINE = "cpu_feature_guard.cc"


def _python(code: str, cwd: Path, **variables: str) -> subprocess.CompletedProcess:
    environment = {"PATH": "/usr/bin:/bin", "PYTHONPATH": f"{REPO}:{cwd}", **variables}  # no TF_CPP_MIN_LOG_LEVEL
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=environment, capture_output=True, text=True)


@pytest.mark.pipeline
def test_tensorflow_loads_without_its_banner_after_wardrobe(tmp_path: Path) -> None:
    result = _python("import wardrobe, tensorflow as tf; print(int(tf.constant(2) + 1))", tmp_path)
    assert (result.returncode, result.stdout, result.stderr) == (0, "3\n", "")


@pytest.mark.pipeline
def test_without_wardrobe_first_the_banner_is_printed(tmp_path: Path) -> None:
    """What the log level removes (so the test above can fail)."""
    result = _python("import tensorflow, wardrobe", tmp_path)
    assert result.returncode == 0 and BANNER_LINE in result.stderr


@pytest.mark.pipeline
def test_native_errors_during_import_still_reach_stderr(tmp_path: Path) -> None:
    """A library writing to file descriptor 2 at import, as a broken CUDA library or an ABI
    mismatch does from C++: every byte arrives (stderr was once sent to /dev/null here)."""
    error = "E0000 00:00:1.0 1 cuda_dnn.cc:1] Could not load library libcudnn.so.9: ABI mismatch\n"
    (tmp_path / "native_lib.py").write_text(f"import os\nos.write(2, {error.encode()!r})\n")
    result = _python("import wardrobe, tensorflow, native_lib", tmp_path)
    assert result.returncode == 0
    assert result.stderr == error


ONEDNN_CHECK = "from tensorflow.python.util import _pywrap_util_port as p; print(p.IsMklEnabled())"


@pytest.mark.pipeline
@pytest.mark.parametrize("setting", ["unset", "1", "0"])
def test_onednn_is_on_unless_turned_off_and_silent_either_way(tmp_path: Path, setting: str) -> None:
    """Both CPU kinds run oneDNN (TensorFlow's own default turns it on only on some Intel CPUs);
    where it is on, TensorFlow prints absl's and oneDNN's lines whatever the log level."""
    variables = {} if setting == "unset" else {"TF_ENABLE_ONEDNN_OPTS": setting}
    # predict first asks whether TensorFlow is installed (importlib.util.find_spec), then imports it
    code = (
        f"import importlib.util, wardrobe; assert importlib.util.find_spec('tensorflow'); import keras; {ONEDNN_CHECK}"
    )
    result = _python(code, tmp_path, **variables)
    assert (result.returncode, result.stdout, result.stderr) == (0, f"{setting != '0'}\n", "")
    unfiltered = _python(f"import tensorflow; {ONEDNN_CHECK}", tmp_path, TF_ENABLE_ONEDNN_OPTS="1")
    assert "oneDNN custom operations are on" in unfiltered.stderr  # what the filter removes


def test_the_filter_removes_exactly_the_two_banner_lines() -> None:
    from wardrobe import without_banner

    other = b"W0000 00:00:1.0 1 cuda_dnn.cc:1] something real\n"
    output = (
        b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"
        b"I0000 00:00:1796167329.893045    2690 port.cc:153] oneDNN custom operations are on. You may see ...\n"
        + other
        + b"I0000 00:00:1.0 1 port.cc:153] oneDNN custom operations are on. (no newline)"
    )
    assert without_banner(output) == other
