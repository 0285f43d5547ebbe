"""wardrobe/cli/report.py: the pull-request report."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from tests.conftest import CLASS_NAMES, REPO, module_env, sh
from wardrobe.cli.report import confusion_moves, dvc_markdown, headline, per_class_changes
from wardrobe.common import WardrobeError
from wardrobe.outputs import CONFUSION_CSV, ENVIRONMENT_JSON, METRICS_PATH, PER_CLASS_CSV


def scores(f1: dict[str, float]) -> pd.DataFrame:
    return pd.DataFrame({"class": list(f1), "precision": 0.9, "recall": 0.9, "f1": list(f1.values())})


def test_headline_states_accuracy_gate_and_the_class_that_moved_most() -> None:
    classes = per_class_changes(scores({"Shirt": 0.81, "Coat": 0.90}), scores({"Shirt": 0.78, "Coat": 0.91}))
    assert list(classes["class"]) == ["Shirt", "Coat"]  # largest move first
    text = headline({"accuracy": 0.9398}, {"accuracy": 0.9371}, [], classes)
    assert text == (
        "**Test accuracy 0.9398 → 0.9371 (-0.27 points)**; validation gate: passed; "
        "biggest class change: Shirt F1 0.810 → 0.780 (-0.030)."
    )
    failed = headline({"accuracy": 0.95}, {"accuracy": 0.90}, ["accuracy dropped", "x"], classes)
    assert "validation gate: **failed**: accuracy dropped (+1 more)" in failed
    assert headline(None, {"accuracy": 0.9}, [], per_class_changes(None, scores({"Bag": 0.99}))) == (
        "**Test accuracy 0.9000 (the base has no metrics)**; validation gate: passed."
    )


def test_confusion_moves_are_the_off_diagonal_cells_that_changed_most() -> None:
    def rows(*pairs: tuple[str, str, int]) -> pd.DataFrame:
        return pd.DataFrame(
            [(actual, predicted) for actual, predicted, n in pairs for _ in range(n)], columns=["actual", "predicted"]
        )

    base = rows(("Shirt", "Shirt", 80), ("Shirt", "T-shirt/top", 12), ("Coat", "Pullover", 5), ("Bag", "Bag", 9))
    head = rows(("Shirt", "Shirt", 84), ("Shirt", "T-shirt/top", 8), ("Coat", "Pullover", 6), ("Bag", "Sandal", 1))
    moves = confusion_moves(base, head)
    assert moves.to_dict("records") == [
        {"actual": "Shirt", "predicted": "T-shirt/top", "base": 12, "head": 8, "change": -4},
        {"actual": "Bag", "predicted": "Sandal", "base": 0, "head": 1, "change": 1},
        {"actual": "Coat", "predicted": "Pullover", "base": 5, "head": 6, "change": 1},
    ]


def test_a_failing_dvc_command_is_one_line_naming_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # not a DVC repository
    with pytest.raises(WardrobeError, match=r"^dvc metrics diff main --md failed: ") as info:
        dvc_markdown("metrics", "diff", "main")
    assert "\n" not in str(info.value)


@pytest.mark.pipeline
def test_the_report_shows_both_revisions_and_the_environment_change(tmp_path: Path) -> None:
    """A repo with the project's dvc.yaml and committed plots at base; at head, accuracy and one
    class moved and Keras changed. The report leads with that, draws both revisions, every image
    reference resolves to a valid PNG, and the metrics diff lists the new Keras."""
    shutil.copy(REPO / "dvc.yaml", tmp_path / "dvc.yaml")
    shutil.copytree(REPO / "plots", tmp_path / "plots")
    sh(tmp_path, "git", "init", "-q", "-b", "main")
    sh(tmp_path, "dvc", "init", "-q")
    (tmp_path / "metrics").mkdir()
    committed = pd.read_csv(REPO / PER_CLASS_CSV)

    def write(accuracy: float, keras: str, shirt_f1: float) -> None:
        (tmp_path / METRICS_PATH).write_text(json.dumps({"accuracy": accuracy}))
        environment = {"tensorflow": "2.21.0", "keras": keras, "device": "CPU", "precision": "float32"}
        (tmp_path / ENVIRONMENT_JSON).write_text(json.dumps(environment))
        per_class = committed.copy()
        per_class.loc[per_class["class"] == "Shirt", "f1"] = shirt_f1
        per_class.to_csv(tmp_path / PER_CLASS_CSV, index=False)

    write(0.9398, "3.15.1", 0.8149)
    sh(tmp_path, "git", "add", "-A")
    sh(tmp_path, "git", "commit", "-qm", "base")
    write(0.9371, "3.16.0", 0.7901)
    confusion = pd.read_csv(tmp_path / CONFUSION_CSV)
    confusion.loc[confusion.index[:3], "predicted"] = CLASS_NAMES[0]  # three more mistakes at head
    confusion.to_csv(tmp_path / CONFUSION_CSV, index=False)
    # The gate's verdict as `validate --verdict` writes it (one problem per line; tests/test_validate.py):
    drop = (
        "metrics/metrics.json: accuracy fell 0.0027 against main (0.9398 -> 0.9371), more than validate.max_drop 0.001"
    )
    (tmp_path / "validation.txt").write_text(f"{drop}\nplots/predictions.png: declared output is missing\n")

    def report(*gate: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "wardrobe", "report", "--base", "main", *gate],
            cwd=tmp_path,
            env=module_env(),
            capture_output=True,
            text=True,
        )

    missing = report("--gate", "nothing.txt")
    assert (missing.returncode, missing.stderr) == (
        1,
        "error: nothing.txt: no verdict; run `wardrobe validate --verdict nothing.txt` first\n",
    )
    assert report().returncode == 0
    assert "; validation gate: not run; " in (tmp_path / "report.md").read_text().splitlines()[2]
    run = report("--gate", "validation.txt")
    assert run.returncode == 0, run.stderr
    report_md = (tmp_path / "report.md").read_text()
    lines = report_md.splitlines()
    assert lines[0] == "# wardrobe report (against `main`)"
    assert lines[2] == (
        f"**Test accuracy 0.9398 → 0.9371 (-0.27 points)**; validation gate: **failed**: {drop} (+1 more); "
        "biggest class change: Shirt F1 0.815 → 0.790 (-0.025)."
    )
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report_md)
    assert images == [
        "report_images/accuracy.png",
        "report_images/loss.png",
        "report_images/confusion_matrix.png",
        "report_images/per_class_f1.png",
        "report_images/reliability.png",
        "plots/confusion_matrix.png",
    ]
    for image in images:
        with Image.open(tmp_path / image) as picture:
            picture.verify()
            assert picture.format == "PNG" and picture.size[0] > 300
    rows = [line.replace(" ", "") for line in lines]
    assert "|Shirt|0.8149|0.7901|-0.0248|" in rows
    assert "|metrics/environment.json|keras|3.15.1|3.16.0|-|" in rows
    assert "|metrics/metrics.json|accuracy|0.9398|0.9371|-0.0027|" in rows
    assert any(row.startswith("|metrics/environment.json|tensorflow|") for row in rows)  # --all: unchanged too
