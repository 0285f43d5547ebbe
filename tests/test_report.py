"""stages/report.py: the pull-request report."""

from __future__ import annotations

from pathlib import Path

import pytest

from stages.common import WardrobeError
from stages.outputs import CONFUSION_PNG, CURVES_PNG
from stages.report import build_report, dvc_markdown


def test_report_has_metrics_params_and_pictures_in_order() -> None:
    report = build_report("main", "| metric |", "| param |", [CURVES_PNG, CONFUSION_PNG])
    lines = report.splitlines()
    assert lines[0] == "# wardrobe report (against `main`)"
    assert lines.index("## Metrics") < lines.index("| metric |") < lines.index("## Params") < lines.index("| param |")
    assert lines[-2:] == [
        "![training_curves](plots/training_curves.png)",
        "![confusion_matrix](plots/confusion_matrix.png)",
    ]


def test_a_failing_dvc_command_is_one_line_naming_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # not a DVC repository
    with pytest.raises(WardrobeError, match=r"^dvc metrics diff main failed: ") as info:
        dvc_markdown("metrics", "diff", "main")
    assert "\n" not in str(info.value)
