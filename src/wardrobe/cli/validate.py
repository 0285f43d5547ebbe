"""validate: check what the pipeline produced; one line per problem, exit 1 if there is any.

CI runs it after `dvc repro`: outputs exist and are well-formed, quality gates from
`params.yaml` hold, `dvc.lock` is fresh, and (with --against REV) accuracy did not drop.
Usage: wardrobe validate [--against REV]
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml
from PIL import Image, UnidentifiedImageError

from wardrobe.cli import OneLineParser
from wardrobe.common import (
    WardrobeError,
    complete_text,
    read_dataset,
    read_json,
    run_main,
    split_paths,
    write_text_atomic,
)
from wardrobe.outputs import (
    CLASS_SCORES,
    CONFUSION_CSV,
    CSV_COLUMNS,
    ENVIRONMENT_JSON,
    ENVIRONMENT_KEYS,
    EXPORT_FORMATS,
    EXPORT_JSON,
    EXPORT_KEYS,
    FORMAT_KEYS,
    HEADLINE_METRICS,
    HISTORY_CSV,
    METRICS_PATH,
    PER_CLASS_CSV,
    PNGS,
    PREPARED_DIR,
    STAGE_OUTPUTS,
    parity_problem,
)
from wardrobe.params import CONF_DIR, PARAMS_FILE, ValidateParams, compose, disagreements, load_params
from wardrobe.plumbing import file_at, find_tool

MIN_PNG_SIDE = 200


def _unit(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value <= 1


def check_metrics_schema(metrics: Any, class_names: tuple[str, ...]) -> list[str]:
    """Keys, types and ranges of metrics.json; [] when it is well-formed."""
    where = str(METRICS_PATH)
    if not isinstance(metrics, dict):
        return [f"{where}: expected a JSON object"]
    problems = []
    for key, metric in HEADLINE_METRICS.items():
        value = metrics.get(key)
        if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
            problems.append(f"{where}: {key} must be a finite number, got {value!r}")
        elif not metric.low <= value <= metric.high:
            problems.append(f"{where}: {key} must be in [{metric.low:g}, {metric.high:g}], got {value!r}")
    per_class = metrics.get("per_class")
    if not isinstance(per_class, dict):
        return [*problems, f"{where}: per_class must be an object keyed by class name"]
    missing = [name for name in class_names if name not in per_class]
    if missing:
        problems.append(f"{where}: per_class lacks {', '.join(missing)}")
    extra = sorted(set(per_class) - set(class_names))
    if extra:
        problems.append(f"{where}: per_class has unknown classes {', '.join(extra)}")
    for name in class_names:
        scores = per_class.get(name)
        if isinstance(scores, dict):
            for key in CLASS_SCORES:
                if not _unit(scores.get(key)):
                    problems.append(f"{where}: per_class.{name}.{key} must be in [0, 1], got {scores.get(key)!r}")
        elif name not in missing:
            problems.append(f"{where}: per_class.{name} must be an object")
    return problems


def check_export(report: Any) -> list[str]:
    """metrics/export.json has the contract's keys and records parity within the contract's gate
    (export refuses to write otherwise: a hand-edited or stale file is caught here)."""
    if not isinstance(report, dict) or set(report) != set(EXPORT_KEYS):
        keys = sorted(report) if isinstance(report, dict) else type(report).__name__
        return [f"{EXPORT_JSON}: expected keys {list(EXPORT_KEYS)}, got {keys}"]
    problems = []
    for name in EXPORT_FORMATS:
        entry = report[name]
        missing = [key for key in FORMAT_KEYS if not isinstance(entry, dict) or key not in entry]
        if missing:
            problems.append(f"{EXPORT_JSON}: {name} lacks {', '.join(missing)}")
        elif problem := parity_problem(name, entry):
            problems.append(f"{EXPORT_JSON}: {problem}")
    return problems


def check_environment(record: Any) -> list[str]:
    if not isinstance(record, dict) or list(record) != list(ENVIRONMENT_KEYS):
        keys = list(record) if isinstance(record, dict) else type(record).__name__
        return [f"{ENVIRONMENT_JSON}: expected keys {list(ENVIRONMENT_KEYS)}, got {keys}"]
    return []


def check_quality(metrics: dict, gates: ValidateParams) -> list[str]:
    problems = []
    if metrics["accuracy"] < gates.min_accuracy:
        problems.append(
            f"{METRICS_PATH}: accuracy {metrics['accuracy']:.4f} is below validate.min_accuracy {gates.min_accuracy}"
        )
    if metrics["ece"] > gates.max_ece:
        problems.append(
            f"{METRICS_PATH}: ece {metrics['ece']:.4f} (calibration error) is above validate.max_ece {gates.max_ece}"
        )
    for name, scores in metrics["per_class"].items():
        if scores["f1"] < gates.min_class_f1:
            problems.append(
                f"{METRICS_PATH}: {name} F1 {scores['f1']:.4f} is below validate.min_class_f1 {gates.min_class_f1}"
            )
    return problems


def check_drop(metrics: dict, base: dict, rev: str, max_drop: float) -> tuple[str, list[str]]:
    """What --against compared (printed whether it passed or not), and the problem if accuracy fell
    by more than max_drop."""
    change = metrics["accuracy"] - base["accuracy"]
    compared = (
        f"validate: test accuracy {metrics['accuracy']:.4f} against {base['accuracy']:.4f} at {rev}: "
        f"{change:+.4f} (a drop of more than validate.max_drop {max_drop} fails)"
    )
    if -change > max_drop:
        return compared, [
            f"{METRICS_PATH}: accuracy fell {-change:.4f} against {rev} ({base['accuracy']:.4f} -> "
            f"{metrics['accuracy']:.4f}), more than validate.max_drop {max_drop}"
        ]
    return compared, []


def check_csvs(test_size: int | None, class_names: tuple[str, ...]) -> list[str]:
    problems = []
    frames = {}
    for path, columns in CSV_COLUMNS.items():
        try:
            frames[path] = frame = pd.read_csv(path)
        except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
            problems.append(f"{path}: unreadable CSV ({' '.join(str(exc).split())})")
            continue
        if tuple(frame.columns) != columns:
            problems.append(f"{path}: columns {list(frame.columns)}, expected {list(columns)}")
            frames.pop(path)
        elif frame.empty:
            problems.append(f"{path}: no rows")
            frames.pop(path)
    if HISTORY_CSV in frames and frames[HISTORY_CSV]["epoch"].tolist() != list(range(1, len(frames[HISTORY_CSV]) + 1)):
        problems.append(f"{HISTORY_CSV}: epochs must run 1, 2, 3, …")
    if PER_CLASS_CSV in frames and frames[PER_CLASS_CSV]["class"].tolist() != list(class_names):
        problems.append(f"{PER_CLASS_CSV}: expected one row per class in label order")
    if CONFUSION_CSV in frames:
        confusion = frames[CONFUSION_CSV]
        unknown = sorted((set(confusion["actual"]) | set(confusion["predicted"])) - set(class_names))
        if unknown:
            problems.append(f"{CONFUSION_CSV}: unknown class names {unknown}")
        if test_size is not None and len(confusion) != test_size:
            problems.append(f"{CONFUSION_CSV}: {len(confusion)} rows, expected one per test image ({test_size})")
    return problems


def check_png(path: Path) -> list[str]:
    try:
        with Image.open(path) as image:
            image.verify()
            kind, size = image.format, image.size
    except (OSError, UnidentifiedImageError) as exc:
        return [f"{path}: not a valid image ({exc})"]
    if kind != "PNG":
        return [f"{path}: expected a PNG, got {kind}"]
    if min(size) < MIN_PNG_SIDE:
        return [f"{path}: {size[0]}×{size[1]} pixels, smaller than {MIN_PNG_SIDE} on a side"]
    return []


def stale_stages() -> list[str]:
    """Stages whose code, params or dependencies changed since dvc.lock was written."""
    result = subprocess.run([find_tool("dvc"), "status", "--json"], capture_output=True, text=True)
    if result.returncode != 0:
        return [f"dvc status failed: {complete_text(result.stderr)}"]
    problems = []
    for stage, changes in json.loads(result.stdout or "{}").items():
        kinds = []
        for change in changes:
            if isinstance(change, dict):
                kinds += [k.removeprefix("changed ") for k in change if k.startswith("changed")]
            elif isinstance(change, str):
                kinds.append(change)
        problems.append(f"dvc.lock is stale: stage {stage}: changed {', '.join(sorted(set(kinds)))}; run dvc repro")
    return problems


def params_match_conf() -> list[str]:
    """params.yaml must be what conf/ composes to: `dvc exp run` recomposes it, so a value that lives
    only in params.yaml (a hand edit, or an experiment's -S brought in by `dvc exp branch`) would be
    silently lost by the next run."""
    differences = disagreements(yaml.safe_load(PARAMS_FILE.read_text(encoding="utf-8")), yaml.safe_load(compose()))
    return [
        f"{PARAMS_FILE}: {key} is {value!r} but {CONF_DIR}/ composes {composed!r}; "
        f"put the value into {CONF_DIR}/ (or `make params` to drop it)"
        for key, value, composed in differences
    ]


def metrics_at(rev: str) -> dict:
    text, error = file_at(rev, METRICS_PATH)
    if text is None:
        raise WardrobeError(f"--against {rev}: cannot read {METRICS_PATH} there ({error})")
    return json.loads(text)


def validate(against: str | None) -> tuple[list[str], list[str]]:
    """Every problem found, one line each ([] means the outputs can be trusted), and what --against
    compared (printed either way)."""
    params = load_params()
    outputs = [path for paths in STAGE_OUTPUTS.values() for path in paths]
    problems = params_match_conf()
    notes: list[str] = []
    problems += [f"{path}: declared output is missing" for path in outputs if not path.exists()]
    try:  # the classes every per-class output must name: prepare's record of the data
        dataset = read_dataset(PREPARED_DIR)
    except WardrobeError as error:
        problems.append(str(error))
        dataset = None
    class_names = dataset.class_names if dataset else None
    metrics = None
    if METRICS_PATH.exists():
        try:
            metrics = json.loads(METRICS_PATH.read_text(encoding="utf-8"))
        except ValueError as exc:
            problems.append(f"{METRICS_PATH}: not valid JSON ({exc})")
    if metrics is not None and class_names is not None:
        schema_problems = check_metrics_schema(metrics, class_names)
        problems += schema_problems
        if not schema_problems:
            problems += check_quality(metrics, params.validate)
            if against:
                compared, drop = check_drop(metrics, metrics_at(against), against, params.validate.max_drop)
                problems += drop
                notes.append(compared)
    for path, check in ((EXPORT_JSON, check_export), (ENVIRONMENT_JSON, check_environment)):
        if path.exists():
            try:
                problems += check(read_json(path))
            except WardrobeError as error:
                problems.append(str(error))
    y_test = split_paths(PREPARED_DIR, "test")[1]
    test_size = len(np.load(y_test, allow_pickle=False)) if y_test.exists() else None
    if all(path.exists() for path in CSV_COLUMNS) and class_names is not None:
        problems += check_csvs(test_size, class_names)
    for path in PNGS:
        if path.exists():
            problems += check_png(path)
    return problems + stale_stages(), notes


def run(args: argparse.Namespace) -> None:
    try:
        problems, notes = validate(args.against)
    except WardrobeError as error:
        problems, notes = [str(error)], []
    for note in notes:
        print(note)
    if args.verdict:
        write_text_atomic(args.verdict, "".join(f"{problem}\n" for problem in problems))
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    if problems:
        sys.exit(1)
    print("validate: all outputs present, well-formed, within quality gates and fresh")


def main(argv: list[str] | None = None) -> None:
    parser = OneLineParser(prog="wardrobe validate", description="Check the pipeline's outputs (CI gate).")
    parser.add_argument("--against", metavar="REV", help="fail if test accuracy dropped vs. REV's metrics")
    parser.add_argument(
        "--verdict", type=Path, metavar="FILE", help="also write the problems to FILE, one per line (for the report)"
    )
    args = parser.parse_args(argv)
    run_main(lambda: run(args))
