"""The real `dvc` and `git` on a temp copy of the project with tiny synthetic data.

One module-scoped repo walks through the caching contract in order; each step asserts which
stages `dvc repro` ran, so a missing or spurious dependency in dvc.yaml fails here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.conftest import make_project, repro, sh, tiny_params, write_params

ALL_STAGES = ["prepare", "train", "evaluate"]


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory, idx_source: tuple[Path, dict[str, str]]) -> tuple[Path, dict]:
    params = tiny_params(*idx_source)
    return make_project(tmp_path_factory.mktemp("project"), params), params


def test_first_repro_runs_all_and_writes_every_output(project: tuple[Path, dict]) -> None:
    repo, _ = project
    assert repro(repo) == ALL_STAGES
    declared = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]
    for stage in declared.values():
        for entry in stage.get("outs", []) + stage.get("metrics", []):
            path = entry if isinstance(entry, str) else next(iter(entry))
            assert (repo / path).exists(), path
    assert (repo / "dvc.lock").exists()


def test_second_repro_runs_nothing(project: tuple[Path, dict]) -> None:
    repo, _ = project
    assert repro(repo) == []
    assert sh(repo, "dvc", "status", "--json").stdout.strip() == "{}"


@pytest.mark.parametrize(
    ("section", "key", "value", "expected"),
    [
        ("evaluate", "example_grid", 2, ["evaluate"]),
        ("train", "batch_size", 8, ["train", "evaluate"]),
        ("prepare", "seed", 7, ALL_STAGES),
    ],
)
def test_param_change_reruns_its_stage_and_downstream(
    project: tuple[Path, dict], section: str, key: str, value: int, expected: list[str]
) -> None:
    repo, params = project
    params[section][key] = value
    write_params(repo, params)
    assert repro(repo) == expected


def test_only_the_selected_preset_is_a_dependency(project: tuple[Path, dict]) -> None:
    repo, params = project
    params["presets"]["long"]["epochs"] = 99  # not the selected preset (mlp)
    write_params(repo, params)
    assert repro(repo) == []
    params["presets"]["mlp"]["dense_units"] = 64  # the selected one
    write_params(repo, params)
    assert repro(repo) == ["train", "evaluate"]


def test_code_edit_reruns_only_its_stage(project: tuple[Path, dict]) -> None:
    repo, _ = project
    with (repo / "stages/evaluate.py").open("a") as handle:
        handle.write("\n# an edit\n")
    assert repro(repo) == ["evaluate"]


def test_mistyped_param_reruns_and_fails_naming_the_key(project: tuple[Path, dict]) -> None:
    repo, params = project
    bad = {**params, "train": {**params["train"], "epochz": 3}}
    write_params(repo, bad)
    result = sh(repo, "dvc", "repro", check=False)
    assert result.returncode != 0
    assert "train.epochz: unknown key" in result.stderr + result.stdout
    write_params(repo, params)


def test_metrics_diff_reports_accuracy_change(project: tuple[Path, dict]) -> None:
    repo, params = project
    # DVC removed train's outputs before the failed run; the lock still describes the good ones.
    # Train re-runs and writes the very same model bytes, so evaluate stays up to date.
    assert repro(repo) == ["train"]
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "one epoch")
    before = json.loads((repo / "metrics/metrics.json").read_text())["accuracy"]
    params["train"]["epochs"] = 6
    write_params(repo, params)
    assert repro(repo) == ["train", "evaluate"]
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "six epochs")
    after = json.loads((repo / "metrics/metrics.json").read_text())["accuracy"]
    assert after != before
    diff = json.loads(sh(repo, "dvc", "metrics", "diff", "HEAD~1", "--json").stdout)
    change = diff["metrics/metrics.json"]["accuracy"]
    assert change["old"] == before and change["new"] == after
    assert change["diff"] == pytest.approx(after - before, abs=1e-6)
    params_diff = sh(repo, "dvc", "params", "diff", "HEAD~1").stdout
    assert "train.epochs" in params_diff and "6" in params_diff
