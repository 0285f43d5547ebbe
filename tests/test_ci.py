"""The CI loop with real dvc, git and make: validate, report, experiments, model artifacts."""

from __future__ import annotations

import json
import time
from pathlib import Path

import keras
import numpy as np
import pytest
import yaml

from tests.conftest import make_project, repro, sh, tiny_params, write_params


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory, idx_source: tuple[Path, dict[str, str]]) -> tuple[Path, dict]:
    """A reproduced, committed project with a local DVC remote holding its data and model."""
    params = tiny_params(*idx_source)
    repo = make_project(tmp_path_factory.mktemp("ci") / "repo", params)
    remote = repo.parent / "remote"
    sh(repo, "dvc", "remote", "add", "-d", "storage", str(remote))
    assert repro(repo) == ["prepare", "train", "evaluate"]
    sh(repo, "dvc", "push")
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "results")
    return repo, params


@pytest.fixture
def clean(project: tuple[Path, dict]):
    """Each case breaks the workspace; put it back (git for code/plots/metrics, dvc for data)."""
    repo, _ = project
    yield repo
    sh(repo, "git", "checkout", "--", ".")
    sh(repo, "dvc", "checkout", "-q")
    assert sh(repo, "git", "status", "--porcelain").stdout == ""


def validate(repo: Path, *args: str):
    return sh(repo, "python", "-m", "stages.validate", *args, check=False)


def test_make_ci_passes_on_a_fresh_result(clean: Path) -> None:
    result = sh(clean, "make", "ci-steps")
    assert "validate: all outputs present, well-formed, within quality gates and fresh" in result.stdout
    report = (clean / "report.md").read_text()
    assert "| metrics/metrics.json | accuracy" in report
    assert "![training_curves](plots/training_curves.png)" in report


def _tamper_metrics(repo: Path) -> None:
    path = repo / "metrics/metrics.json"
    metrics = json.loads(path.read_text())
    metrics["accuracy"] = 1.7
    del metrics["per_class"]["Bag"]
    path.write_text(json.dumps(metrics))


def _stale_code(repo: Path) -> None:
    with (repo / "stages/train.py").open("a") as handle:
        handle.write("\n# changed, not re-run\n")


def _high_gate(repo: Path) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["validate"]["min_accuracy"] = 0.999
    write_params(repo, params)


@pytest.mark.parametrize(
    ("breakage", "messages"),
    [
        (lambda r: (r / "plots/per_class.csv").unlink(), ["error: plots/per_class.csv: declared output is missing"]),
        (
            lambda r: (r / "plots/predictions.png").write_bytes(b"\x89PNG broken"),
            ["plots/predictions.png: not a valid image"],
        ),
        (
            _tamper_metrics,
            [
                "error: metrics/metrics.json: accuracy must be in [0, 1], got 1.7",
                "error: metrics/metrics.json: per_class lacks Bag",
                "error: dvc.lock is stale: stage evaluate: changed outs; run dvc repro",
            ],
        ),
        (_high_gate, ["is below validate.min_accuracy 0.999"]),
        (_stale_code, ["error: dvc.lock is stale: stage train: changed deps; run dvc repro"]),
    ],
    ids=["deleted-output", "broken-png", "tampered-metrics", "threshold-miss", "stale-lock"],
)
def test_validate_fails_with_one_line_per_problem(clean: Path, breakage, messages: list[str]) -> None:
    breakage(clean)
    result = validate(clean)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    for message in messages:
        assert any(message in line for line in lines), (message, lines)
    assert all(line.startswith("error: ") for line in lines)


def test_make_ci_fails_on_threshold_miss(clean: Path) -> None:
    _high_gate(clean)
    result = sh(clean, "make", "ci-steps", check=False)
    assert result.returncode != 0
    assert "is below validate.min_accuracy 0.999" in result.stderr


def test_validate_against_revision_catches_a_drop(clean: Path) -> None:
    path = clean / "metrics/metrics.json"
    metrics = json.loads(path.read_text())
    better = {**metrics, "accuracy": min(1.0, metrics["accuracy"] + 0.05)}
    sh(clean, "git", "checkout", "-qb", "better")
    path.write_text(json.dumps(better))
    sh(clean, "git", "commit", "-qam", "pretend better")
    sh(clean, "git", "checkout", "-q", "main")
    assert validate(clean, "--against", "main").returncode == 0
    result = validate(clean, "--against", "better")
    assert result.returncode == 1
    assert f"accuracy fell 0.0500 against better ({better['accuracy']:.4f} -> {metrics['accuracy']:.4f})" in (
        result.stderr
    )
    missing = validate(clean, "--against", "no-such-rev")
    assert missing.returncode == 1
    assert "error: --against no-such-rev: cannot read metrics/metrics.json there" in missing.stderr


def test_experiments_and_report_show_a_real_diff(clean: Path) -> None:
    sh(clean, "dvc", "exp", "run", "-n", "longer", "-S", "train.epochs=4")
    table = json.loads(sh(clean, "dvc", "exp", "show", "--json").stdout)
    text = json.dumps(table)
    assert '"longer"' in text and '"epochs": 4' in text and '"accuracy"' in text
    diff = json.loads(sh(clean, "dvc", "metrics", "diff", "main", "--json").stdout)["metrics/metrics.json"]
    assert diff["accuracy"]["old"] != diff["accuracy"]["new"]
    sh(clean, "python", "-m", "stages.report", "--base", "main")
    report = (clean / "report.md").read_text()
    row = next(line for line in report.splitlines() if "| accuracy" in line)
    assert str(diff["accuracy"]["old"]) in row and str(diff["accuracy"]["new"]) in row
    assert "train.epochs" in report
    sh(clean, "dvc", "exp", "remove", "longer")


def test_release_tag_and_artifact_download(project: tuple[Path, dict], tmp_path: Path) -> None:
    repo, _ = project
    bad = sh(repo, "make", "release", "VERSION=1.0", check=False)
    assert bad.returncode == 2 and "usage: make release VERSION=x.y.z" in bad.stderr
    sh(repo, "make", "release", "VERSION=0.1.0")
    assert sh(repo, "git", "tag", "-l").stdout.split() == ["fashion-classifier@v0.1.0"]
    sh(tmp_path, "dvc", "artifacts", "get", str(repo), "fashion-classifier", "-o", "model.keras")
    model = keras.models.load_model(tmp_path / "model.keras", safe_mode=True)
    probs = model.predict(np.zeros((2, 28, 28), np.float32), verbose=0)
    assert probs.shape == (2, 10)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)


def test_queued_experiments_run_in_parallel_and_come_back(clean: Path) -> None:
    for batch_size in (8, 32):
        sh(clean, "dvc", "exp", "run", "--queue", "-n", f"bs{batch_size}", "-S", f"train.batch_size={batch_size}")
    sh(clean, "dvc", "queue", "start", "-j", "2")
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        status = sh(clean, "dvc", "queue", "status").stdout
        if "Queued" not in status and "Running" not in status:
            break
        time.sleep(2)
    sh(clean, "dvc", "queue", "stop", "--kill", check=False)
    assert status.count("Success") == 2, status
    rows = json.loads(sh(clean, "dvc", "exp", "show", "--json").stdout)
    names = {exp["name"] for row in rows for exp in (row.get("experiments") or []) for exp in exp["revs"]}
    assert {"bs8", "bs32"} <= names
    sh(clean, "dvc", "exp", "branch", "bs8", "exp-bs8")
    branch_params = yaml.safe_load(sh(clean, "git", "show", "exp-bs8:params.yaml").stdout)
    assert branch_params["train"]["batch_size"] == 8
    sh(clean, "dvc", "exp", "apply", "bs32")
    assert yaml.safe_load((clean / "params.yaml").read_text())["train"]["batch_size"] == 32
    sh(clean, "dvc", "exp", "remove", "bs8", "bs32")
