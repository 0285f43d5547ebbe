from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tests.conftest import CLASS_NAMES, run_module, write_params
from wardrobe.cli.validate import check_csvs, check_metrics_schema
from wardrobe.evaluation import confusion_rows, write_csv
from wardrobe.outputs import CSV_COLUMNS, HISTORY_CSV, METRICS_PATH, PER_CLASS_CSV


def test_confusion_rows_and_csv(tmp_path: Path) -> None:
    frame = confusion_rows(np.array([9, 0]), np.array([7, 0]), CLASS_NAMES)
    write_csv(frame, tmp_path / "c.csv")
    assert (tmp_path / "c.csv").read_text() == "actual,predicted\nAnkle boot,Sneaker\nT-shirt/top,T-shirt/top\n"
    assert list(tmp_path.iterdir()) == [tmp_path / "c.csv"]  # no temp file left behind


@pytest.mark.pipeline
def test_the_tiny_runs_outputs_are_written_and_sane(tiny_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every stage on tiny data (conftest's tiny_run): evaluate's outputs are complete and agree."""
    metrics = json.loads((tiny_run / METRICS_PATH).read_text())
    confusion = pd.read_csv(tiny_run / "plots/confusion.csv")
    assert len(confusion) == 40 and set(confusion["actual"]) == set(CLASS_NAMES)
    # The headline number is the confusion table's diagonal share, not just some value in [0, 1]:
    assert metrics["accuracy"] == round(float((confusion["actual"] == confusion["predicted"]).mean()), 6)
    per_class = pd.read_csv(tiny_run / PER_CLASS_CSV)
    assert per_class["support"].sum() == 40
    assert pd.read_csv(tiny_run / HISTORY_CSV)["epoch"].tolist() == [1]
    # What evaluate and train wrote passes validate's contract checks (writer and checker agree):
    assert check_metrics_schema(metrics, CLASS_NAMES) == []
    monkeypatch.chdir(tiny_run)
    assert all(tuple(pd.read_csv(path).columns) == columns for path, columns in CSV_COLUMNS.items())
    assert check_csvs(40, CLASS_NAMES) == []
    for png in ("training_curves", "confusion_matrix", "predictions"):
        with Image.open(tiny_run / f"plots/{png}.png") as image:
            assert image.format == "PNG" and image.width >= 300 and image.height >= 300
    assert (tiny_run / "data/model/model.keras").stat().st_size > 0


@pytest.mark.pipeline
def test_evaluate_without_model_fails_cleanly(tmp_path: Path, params_dict: dict) -> None:
    write_params(tmp_path, params_dict)
    result = run_module("stages.evaluate", cwd=tmp_path)
    assert result.returncode == 1
    # TensorFlow's import banner may precede it (absl logs before InitializeLog ignore levels).
    assert result.stderr.splitlines()[-1] == (
        "error: data/model/model.keras: model file not found; run the train stage first"
    )
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "metrics").exists()
