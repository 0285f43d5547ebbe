"""wardrobe: a reproducible Fashion-MNIST pipeline (prepare -> train -> evaluate) under DVC."""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.util
import os
import sys
from collections.abc import Iterator
from types import ModuleType

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@contextlib.contextmanager
def _native_stderr_silenced() -> Iterator[None]:
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


class _QuietTensorFlowImport(importlib.abc.MetaPathFinder):
    """TensorFlow 2.21 prints an INFO banner from C++ at import that ignores TF_CPP_MIN_LOG_LEVEL
    (absl logs before InitializeLog); it would bury our one-line errors. Silence native stderr
    while `tensorflow` itself is imported, and only then. Python exceptions still propagate.
    """

    def find_spec(self, name: str, path: object, target: ModuleType | None = None):
        if name != "tensorflow":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def quiet_exec(module: ModuleType) -> None:
            with _native_stderr_silenced():
                exec_module(module)

        spec.loader.exec_module = quiet_exec  # type: ignore[method-assign]
        return spec


if "tensorflow" not in sys.modules and not os.environ.get("WARDROBE_DEBUG"):
    sys.meta_path.insert(0, _QuietTensorFlowImport())
