"""Helpers of the command-line tools that are not stages (validate, report): finding dvc and git,
reading a file at a git revision. No stage imports this module, so editing it re-runs nothing
(tests/test_dependencies.py)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from wardrobe.common import WardrobeError


def find_tool(name: str) -> str:
    """The `name` command installed next to the running Python (the venv's dvc), else on PATH.

    So `.venv/bin/wardrobe validate` works without activating the venv.
    """
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise WardrobeError(
            f"{name}: command not found next to {sys.executable} or on PATH; install the project (make venv)"
        )
    return found


def file_at(rev: str, path: Path) -> tuple[str | None, str]:
    """A file's committed text at `rev` (None if that revision has no such file), and git's error."""
    result = subprocess.run([find_tool("git"), "show", f"{rev}:{path.as_posix()}"], capture_output=True, text=True)
    return (result.stdout if result.returncode == 0 else None), result.stderr.strip()
