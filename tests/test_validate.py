"""wardrobe/cli/validate.py, and the CI loop around it, with real dvc, git and make in a temp repo."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import make_project, repro, sh, tiny_params, write_params

pytestmark = pytest.mark.pipeline  # every test here runs dvc, git or the stages in subprocesses


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory, idx_source: tuple[Path, dict[str, str]]) -> tuple[Path, dict]:
    """A reproduced, committed project with a local DVC remote holding its data and model."""
    params = tiny_params(*idx_source)
    repo = make_project(tmp_path_factory.mktemp("ci") / "repo", params)
    remote = repo.parent / "remote"
    sh(repo, "dvc", "remote", "add", "-d", "storage", str(remote))
    assert repro(repo) == ["prepare", "train", "evaluate", "export", "card"]
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
    return sh(repo, "python", "-m", "wardrobe", "validate", *args, check=False)


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
    result = validate(clean, "--verdict", "verdict.txt")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    for message in messages:
        assert any(message in line for line in lines), (message, lines)
    assert all(line.startswith("error: ") for line in lines)
    # The verdict the report states: the same problems, one per line.
    assert (clean / "verdict.txt").read_text().splitlines() == [line.removeprefix("error: ") for line in lines]
    (clean / "verdict.txt").unlink()


def test_make_ci_runs_the_gate_once_and_reports_its_failure(clean: Path) -> None:
    _high_gate(clean)
    result = sh(clean, "make", "ci-steps", check=False)
    assert result.returncode != 0
    assert result.stderr.count("is below validate.min_accuracy 0.999") == 1  # validate ran once
    headline = (clean / "report.md").read_text().splitlines()[2]
    assert "; validation gate: **failed**: metrics/metrics.json: accuracy " in headline
    assert "is below validate.min_accuracy 0.999" in headline
    assert "is below validate.min_accuracy 0.999" in (clean / "validation.txt").read_text()


def test_validate_against_revision_catches_a_drop(clean: Path) -> None:
    path = clean / "metrics/metrics.json"
    metrics = json.loads(path.read_text())
    better = {**metrics, "accuracy": min(1.0, metrics["accuracy"] + 0.05)}
    sh(clean, "git", "checkout", "-qb", "better")
    path.write_text(json.dumps(better))
    sh(clean, "git", "commit", "-qam", "pretend better")
    sh(clean, "git", "checkout", "-q", "main")
    same = validate(clean, "--against", "main")
    assert same.returncode == 0
    accuracy = f"{metrics['accuracy']:.4f}"  # what it compared, printed (issue #27)
    assert same.stdout.splitlines()[0] == (
        f"validate: test accuracy {accuracy} against {accuracy} at main: +0.0000 "
        "(a drop of more than validate.max_drop 0.01 fails)"
    )
    result = validate(clean, "--against", "better")
    assert result.returncode == 1
    assert f"validate: test accuracy {accuracy} against {better['accuracy']:.4f} at better: -0.0500" in result.stdout
    assert f"accuracy fell 0.0500 against better ({better['accuracy']:.4f} -> {metrics['accuracy']:.4f})" in (
        result.stderr
    )
    missing = validate(clean, "--against", "no-such-rev")
    assert missing.returncode == 1
    assert "error: --against no-such-rev: cannot read metrics/metrics.json there" in missing.stderr


def test_release_refuses_a_bad_version(project: tuple[Path, dict]) -> None:
    """The README's release and `dvc artifacts get` commands run in tests/test_readme.py."""
    repo, _ = project
    bad = sh(repo, "make", "release", "VERSION=1.0", check=False)
    assert bad.returncode == 2 and "usage: make release VERSION=x.y.z" in bad.stderr
    assert sh(repo, "git", "tag", "-l").stdout == ""


BARE_PATH = "/usr/bin:/bin"  # git, but no venv: as in a shell where the venv is not activated


def _python_without_dvc(folder: Path) -> Path:
    """This venv's Python, run from a folder with no `dvc` beside it (a venv sharing our lib/)."""
    (folder / "bin").mkdir(parents=True)
    shutil.copy(Path(sys.prefix) / "pyvenv.cfg", folder / "pyvenv.cfg")
    (folder / "lib").symlink_to(Path(sys.prefix) / "lib")
    (folder / "bin/python").symlink_to(Path(sys.executable).resolve())
    return folder / "bin/python"


def _validate_with(python: Path | str, repo: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": BARE_PATH}
    return subprocess.run(
        [str(python), "-m", "wardrobe", "validate"], cwd=repo, env=env, capture_output=True, text=True
    )


def test_validate_from_the_venv_python_needs_no_activated_venv(clean: Path) -> None:
    """`.venv/bin/wardrobe validate` takes the dvc installed beside that Python."""
    assert shutil.which("dvc", path=BARE_PATH) is None, "dvc on the bare PATH would hide the lookup"
    result = _validate_with(sys.executable, clean)
    assert result.returncode == 0, result.stderr
    assert "validate: all outputs present, well-formed, within quality gates and fresh" in result.stdout


def test_validate_without_dvc_anywhere_fails_in_one_line(clean: Path, tmp_path: Path) -> None:
    python = _python_without_dvc(tmp_path / "venv")
    result = _validate_with(python, clean)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"error: dvc: command not found next to {python} or on PATH; install the project (make venv)"
    ]
