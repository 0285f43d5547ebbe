"""stages/report.py: the pull-request report."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from stages.common import WardrobeError
from stages.outputs import CONFUSION_PNG, CURVES_PNG, ENVIRONMENT_JSON, METRICS_PATH
from stages.report import build_report, dvc_markdown
from tests.conftest import REPO, module_env, sh


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


def test_the_report_shows_an_environment_change_beside_the_accuracy_change(tmp_path: Path) -> None:
    """The project's dvc.yaml declares metrics/environment.json as train's metrics, so the report's
    `dvc metrics diff --all` lists a changed library version next to the accuracy it moved."""
    shutil.copy(REPO / "dvc.yaml", tmp_path / "dvc.yaml")
    sh(tmp_path, "git", "init", "-q", "-b", "main")
    sh(tmp_path, "dvc", "init", "-q")
    (tmp_path / "metrics").mkdir()

    def write(accuracy: float, keras: str) -> None:
        (tmp_path / METRICS_PATH).write_text(json.dumps({"accuracy": accuracy}))
        environment = {"tensorflow": "2.21.0", "keras": keras, "device": "CPU", "precision": "float32"}
        (tmp_path / ENVIRONMENT_JSON).write_text(json.dumps(environment))

    write(0.9398, "3.15.1")
    sh(tmp_path, "git", "add", "-A")
    sh(tmp_path, "git", "commit", "-qm", "base")
    write(0.9371, "3.16.0")
    run = subprocess.run(
        [sys.executable, "-m", "stages.report", "--base", "main"],
        cwd=tmp_path,
        env=module_env(),
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    rows = [line.replace(" ", "") for line in (tmp_path / "report.md").read_text().splitlines()]
    assert "|metrics/environment.json|keras|3.15.1|3.16.0|-|" in rows
    assert "|metrics/metrics.json|accuracy|0.9398|0.9371|-0.0027|" in rows
    assert any(row.startswith("|metrics/environment.json|tensorflow|") for row in rows)  # --all: unchanged too
