"""The real `dvc` and `git` on a temp copy of the project with tiny synthetic data.

One module-scoped repo walks through the caching contract in order; each step asserts which
stages `dvc repro` ran, so a missing or spurious dependency in dvc.yaml fails here.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, make_project, repro, sh, tiny_params, write_params
from wardrobe.outputs import ENVIRONMENT_JSON

ALL_STAGES = ["prepare", "train", "evaluate", "export", "card"]

pytestmark = pytest.mark.pipeline  # every test here runs dvc, git or the stages in subprocesses


def module_files(module: str) -> list[str]:
    """The files importing `module` runs: each package's __init__.py on the way, then the module
    (stages/ at the top, the wardrobe package under src/)."""
    parts = module.split(".")
    root = "src/" if parts[0] == "wardrobe" else ""
    files = [f"{root}{'/'.join(parts[:depth])}/__init__.py" for depth in range(1, len(parts))]
    single = f"{root}{'/'.join(parts)}.py"
    return [*files, single if (REPO / single).exists() else f"{root}{'/'.join(parts)}/__init__.py"]


def imported_code_files(module: str) -> set[str]:
    """The project's code files (stages/ and src/wardrobe/) that `module` imports, directly or not,
    read from source."""
    files: set[str] = set()
    todo = [module]
    while todo:
        for path in module_files(todo.pop()):
            if path in files:
                continue
            files.add(path)
            for node in ast.walk(ast.parse((REPO / path).read_text())):
                names = [node.module] if isinstance(node, ast.ImportFrom) else []
                names += [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
                todo += [name for name in names if name and name.split(".")[0] in ("stages", "wardrobe")]
    return files


def code_dep(dep: str) -> bool:
    return dep.startswith(("stages/", "src/")) and dep.endswith(".py")


def test_each_stage_depends_on_exactly_the_code_it_imports() -> None:
    """A missing dep gives stale results, an extra one spurious re-runs."""
    for name, stage in yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"].items():
        module = stage["cmd"].removeprefix("python -m ")
        assert {dep for dep in stage["deps"] if code_dep(dep)} == imported_code_files(module), name
    # The one code file that is not Python: the card's text, read by wardrobe/card.py only.
    other = {
        dep for stage in yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"].values() for dep in stage["deps"]
    }
    assert {dep for dep in other if dep.startswith(("stages/", "src/")) and not code_dep(dep)} == {
        "src/wardrobe/card.md"
    }


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


# The command and what only it uses: no stage imports them, so editing them re-runs nothing.
NOT_STAGES = (
    "src/wardrobe/__main__.py",
    "src/wardrobe/cli/__init__.py",
    "src/wardrobe/cli/predict.py",
    "src/wardrobe/cli/serve.py",
    "src/wardrobe/cli/validate.py",
    "src/wardrobe/cli/report.py",
    "src/wardrobe/cli/audit.py",
    "src/wardrobe/cli/params.py",
    "src/wardrobe/plumbing.py",
)


def test_no_stage_imports_the_command_line_tools() -> None:
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"].values()
    used = set().union(*(imported_code_files(stage["cmd"].removeprefix("python -m ")) for stage in stages))
    assert used.isdisjoint(NOT_STAGES)
    code = {str(p.relative_to(REPO)) for folder in ("stages", "src/wardrobe") for p in (REPO / folder).rglob("*.py")}
    assert code == used | set(NOT_STAGES)  # none unaccounted


def test_stages_holds_the_five_stages_and_nothing_imports_them() -> None:
    """stages/ is the five modules dvc.yaml runs (and the package's __init__); no module of the
    wardrobe package imports a stage."""
    declared = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert {p.name for p in (REPO / "stages").iterdir() if p.name != "__pycache__"} == {
        "__init__.py",
        *(f"{name}.py" for name in declared),
    }
    for path in (REPO / "src/wardrobe").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            names += [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
            assert not any(name.split(".")[0] == "stages" for name in names), path
            if "cli" not in path.relative_to(REPO / "src/wardrobe").parts and path.name != "__main__.py":
                assert not any(name.startswith("wardrobe.cli") for name in names), path  # the library: no CLI


def test_editing_a_tool_re_runs_nothing_and_editing_the_card_only_the_card(project: tuple[Path, dict]) -> None:
    repo, _ = project
    for path in NOT_STAGES:
        with (repo / path).open("a") as handle:
            handle.write("\n# an edit that cannot change a result\n")
    assert sh(repo, "dvc", "status").stdout.strip() == "Data and pipelines are up to date."
    with (repo / "src/wardrobe/card.md").open("a") as handle:
        handle.write("\nThe card's wording, edited.\n")
    assert list(json.loads(sh(repo, "dvc", "status", "--json").stdout)) == ["card"]
    assert repro(repo) == ["card"]


@pytest.mark.parametrize(
    ("section", "key", "value", "expected"),
    [
        ("evaluate", "example_grid", 2, ["evaluate"]),  # same metrics: the card has nothing new to say
        ("train", "batch_size", 8, ["train", "evaluate", "export", "card"]),
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


def test_code_edit_reruns_only_its_stage(project: tuple[Path, dict]) -> None:
    repo, _ = project
    with (repo / "stages/evaluate.py").open("a") as handle:
        handle.write("\n# an edit\n")
    assert repro(repo) == ["evaluate"]


def test_a_changed_pin_in_the_lock_reruns_train_evaluate_and_export(project: tuple[Path, dict]) -> None:
    """The environment is an input: a new Keras in requirements.lock makes train, evaluate and export
    stale (prepare only decompresses, card only formats); the record train wrote names the versions."""
    import keras

    repo, _ = project
    lock = repo / "requirements.lock"
    pinned = lock.read_text()
    assert f"\nkeras=={keras.__version__} " in pinned
    lock.write_text(pinned.replace(f"\nkeras=={keras.__version__} ", "\nkeras==3.99.0 "))
    stale = json.loads(sh(repo, "dvc", "status", "--json").stdout)
    assert sorted(stale) == ["evaluate", "export", "train"]
    assert {"changed deps": {"requirements.lock": "modified"}} in stale["train"]
    lock.write_text(pinned)
    assert sh(repo, "dvc", "status", "--json").stdout.strip() == "{}"
    assert json.loads((repo / ENVIRONMENT_JSON).read_text())["keras"] == keras.__version__


def _results(repo: Path) -> dict[str, bytes]:
    """Every earlier result a failed run must leave alone: the model, plots/ and metrics/."""
    paths = [
        repo / "data/model/model.keras",
        *sorted((repo / "plots").iterdir()),
        *sorted((repo / "metrics").iterdir()),
    ]
    return {str(path.relative_to(repo)): path.read_bytes() for path in paths}


def test_mistyped_param_fails_naming_the_key_and_keeps_every_result(project: tuple[Path, dict]) -> None:
    """A hand-edited typo re-runs train, which fails by name; persist: true kept DVC from deleting
    the outputs first, so no `dvc checkout` is needed and nothing has to re-run afterwards."""
    repo, params = project
    before = _results(repo)
    write_params(repo, {**params, "train": {**params["train"], "epochz": 3}})
    result = sh(repo, "dvc", "repro", check=False)
    assert result.returncode != 0
    assert "error: params.yaml: train.epochz: unknown key" in result.stderr + result.stdout
    assert _results(repo) == before
    write_params(repo, params)
    assert sh(repo, "dvc", "status", "--json").stdout.strip() == "{}"
    assert repro(repo) == []


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.epochs=0", "error: params.yaml: train.epochs: must be > 0, got 0"),  # train runs, and fails
        ("train.epochz=3", "Could not override 'train.epochz'"),  # DVC refuses before running anything
    ],
)
def test_failed_experiment_keeps_every_result(project: tuple[Path, dict], override: str, message: str) -> None:
    repo, params = project
    before = _results(repo)
    result = sh(repo, "dvc", "exp", "run", "-S", override, check=False)
    assert result.returncode != 0
    assert message in result.stderr + result.stdout
    assert _results(repo) == before
    write_params(repo, params)  # -S left params.yaml as composed for the failed run
    assert repro(repo) == []


def test_metrics_diff_reports_accuracy_change(project: tuple[Path, dict]) -> None:
    repo, params = project
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "one epoch")
    before = json.loads((repo / "metrics/metrics.json").read_text())["accuracy"]
    params["train"]["epochs"] = 6
    write_params(repo, params)
    assert repro(repo) == ["train", "evaluate", "export", "card"]
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
