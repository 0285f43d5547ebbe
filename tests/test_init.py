"""stages/__init__.py: TensorFlow's INFO banner is hidden; native warnings and errors are not."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO

BANNER_LINE = "cpu_feature_guard.cc"


def _python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    environment = {"PATH": "/usr/bin:/bin", "PYTHONPATH": f"{REPO}:{cwd}"}  # no TF_CPP_MIN_LOG_LEVEL
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=environment, capture_output=True, text=True)


def test_tensorflow_loads_without_its_banner_after_stages(tmp_path: Path) -> None:
    result = _python("import stages, tensorflow as tf; print(int(tf.constant(2) + 1))", tmp_path)
    assert (result.returncode, result.stdout, result.stderr) == (0, "3\n", "")


def test_without_stages_first_the_banner_is_printed(tmp_path: Path) -> None:
    """What the log level removes (so the test above can fail)."""
    result = _python("import tensorflow, stages", tmp_path)
    assert result.returncode == 0 and BANNER_LINE in result.stderr


def test_native_errors_during_import_still_reach_stderr(tmp_path: Path) -> None:
    """A library writing to file descriptor 2 at import, as a broken CUDA library or an ABI
    mismatch does from C++: every byte arrives (stderr was once sent to /dev/null here)."""
    error = "E0000 00:00:1.0 1 cuda_dnn.cc:1] Could not load library libcudnn.so.9: ABI mismatch\n"
    (tmp_path / "native_lib.py").write_text(f"import os\nos.write(2, {error.encode()!r})\n")
    result = _python("import stages, tensorflow, native_lib", tmp_path)
    assert result.returncode == 0
    assert result.stderr == error
