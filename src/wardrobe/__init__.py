"""wardrobe: a reproducible image-classification pipeline (prepare → train → evaluate → export → card) under DVC.

Two settings that must be in place before TensorFlow loads (importing keras imports TensorFlow),
so they live here, imported first by every stage (stages/__init__.py) and by the `wardrobe` command:

- **oneDNN on, on every CPU.** TensorFlow enables its oneDNN kernels by default only on CPUs with
  AVX512_VNNI, AVX512_BF16, AVX_VNNI or AMX (most Intel servers, AMD Zen 4 and later), so the
  CPU kinds ran two kernel libraries and trained two different models. Measured on a 2-core
  AMD EPYC with AVX-512, round 2's training step at batch 256 (docs/benchmarks.md, round 3): 1680
  images/s with Eigen, 3664 with oneDNN and the fused BatchNorm of wardrobe/model/layers.py; with
  oneDNN capped at AVX2 (as on the AVX2 EPYCs) 1506, about Eigen's. A value the user set
  (TF_ENABLE_ONEDNN_OPTS=0) wins, and metrics/environment.json records which library ran.
- **No banner.** TF_CPP_MIN_LOG_LEVEL=1 hides TensorFlow's INFO logs (cpu_feature_guard's "not
  compiled to use AVX2" lines) and nothing else. oneDNN's "custom operations are on" line and
  absl's "All log messages before absl::InitializeLog()" come from absl before TensorFlow reads
  that variable, twice per process, so a one-line error would arrive after four lines of noise:
  while TensorFlow loads, file descriptor 2 goes to a temp file and every line but those two is
  written back to stderr afterwards (a native library's real warning or error still arrives).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import re
import sys
import tempfile
from collections.abc import Sequence
from types import ModuleType
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")

BANNER = re.compile(
    rb"^(WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"
    rb"|I\d{4} [\d:.]+ +\d+ port\.cc:\d+\] oneDNN custom operations are on\..*)\n?$"
)


def without_banner(output: bytes) -> bytes:
    """`output` minus the lines TensorFlow's loading prints whatever the log level (above)."""
    return b"".join(line for line in output.splitlines(keepends=True) if not BANNER.match(line))


class _BannerFilteringLoader(importlib.abc.Loader):
    """TensorFlow's own loader, run with file descriptor 2 captured and filtered."""

    def __init__(self, loader: Any) -> None:
        self.loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        sys.stderr.flush()
        saved = os.dup(2)
        with tempfile.TemporaryFile() as captured:
            os.dup2(captured.fileno(), 2)
            try:
                self.loader.exec_module(module)
            finally:
                sys.stderr.flush()
                os.dup2(saved, 2)
                os.close(saved)
                captured.seek(0)
                os.write(2, without_banner(captured.read()))

    def __getattr__(self, name: str) -> Any:  # resource readers and the like: TensorFlow's loader's
        return getattr(self.loader, name)


class _QuietTensorFlowFinder(importlib.abc.MetaPathFinder):
    """Finds `tensorflow` as Python would and wraps its loader (above). Python asks finders only
    for modules not yet in sys.modules, so once TensorFlow is loaded this is never called again;
    a mere `importlib.util.find_spec("tensorflow")` (predict's "is it installed?") loads nothing."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != "tensorflow":
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _BannerFilteringLoader(spec.loader)
        return spec


if "tensorflow" not in sys.modules and not any(isinstance(f, _QuietTensorFlowFinder) for f in sys.meta_path):
    sys.meta_path.insert(0, _QuietTensorFlowFinder())
