"""`make bench`: time the original script against the pipeline's recipes, end to end, one run.

Each pipeline row is a full `dvc repro` in a fresh temp project (empty cache), stage by stage so
each stage's wall time and peak RSS are known. Peak RSS comes from wait4() on the process
(Linux reports the largest of it and the children it waited for, i.e. the stage).
Prints a markdown table; `--write FILE` also saves it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from wardrobe.params import compose

REPO = Path(__file__).resolve().parent.parent
DATA_DIR = Path("/usr/share/datasets/fashion-mnist")


@dataclass
class Row:
    name: str
    wall_s: float
    accuracy: float
    peak_rss_mb: float
    detail: str


GNU_TIME = Path("/usr/bin/time")


def timed(args: list[str], cwd: Path, env: dict[str, str]) -> tuple[float, float, str]:
    """Run a command; return wall seconds, peak RSS in MB, combined output. Fails loudly.

    The peak RSS is GNU time's (`%M`, Debian package `time`) for the command it starts: a child
    forked straight from this Python process would report at least this process' own RSS (Linux
    counts the memory a child had before exec in its ru_maxrss), which would hide a small stage's."""
    with tempfile.NamedTemporaryFile("r") as rss_file:
        wrapped = [str(GNU_TIME), "-f", "%M", "-o", rss_file.name, *args] if GNU_TIME.exists() else args
        start = time.perf_counter()
        proc = subprocess.Popen(wrapped, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        output = proc.stdout.read() if proc.stdout else ""
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(f"bench: {' '.join(args)} failed:\n{output[-3000:]}")
        kilobytes = int(rss_file.read().split()[-1]) if GNU_TIME.exists() else usage.ru_maxrss
    return wall, kilobytes / 1024, output


def run_original(env: dict[str, str], work: Path) -> Row:
    wall, rss, output = timed(
        [sys.executable, "-m", "bench.original", str(DATA_DIR), str(work / "original.png")], REPO, env
    )
    accuracy = float(output.rsplit("test_accuracy=", 1)[1].split()[0])
    return Row("original script (mlp, 5 epochs, batch 32)", wall, accuracy, rss, "one process")


PROJECT_FILES = ("stages", "src", "conf", "dvc.yaml", "params.yaml", ".dvc", "requirements.lock", "data/pictures")


def new_project(project: Path, overrides: list[str], extra_conf: dict[str, str] | None = None) -> str:
    """A fresh git repository holding a copy of the project (empty DVC cache), with params.yaml as
    `dvc exp run -S OVERRIDE...` composes it from conf/ (plus `extra_conf`: conf files by path,
    e.g. a dataset's). Returns the params text."""
    project.mkdir(parents=True)
    for item in PROJECT_FILES:
        source = REPO / item
        ignore = shutil.ignore_patterns("__pycache__", "tmp", "cache", "config.local", "*.egg-info")
        (shutil.copytree if source.is_dir() else shutil.copy)(
            source, project / item, **({"ignore": ignore} if source.is_dir() else {})
        )
    for name, text in (extra_conf or {}).items():
        (project / "conf" / name).write_text(text)
    params_text = compose(project / "conf", overrides)
    (project / "params.yaml").write_text(params_text)
    subprocess.run(["git", "init", "-q"], cwd=project, check=True)
    return params_text


def run_pipeline(recipe: str, env: dict[str, str], work: Path, seed: int | None = None) -> Row:
    project = work / (recipe if seed is None else f"{recipe}-seed{seed}")
    # params.yaml as `dvc exp run -S train=RECIPE [-S train.seed=N]` composes it from conf/
    params_text = new_project(project, [f"train={recipe}"] + ([] if seed is None else [f"train.seed={seed}"]))
    stage_times, stage_rss = {}, {}
    # Every stage of dvc.yaml, in its order: the whole `dvc repro` a user pays for (since #16 also
    # export and card, which round 2's first bench run did not have yet).
    for stage in yaml.safe_load((project / "dvc.yaml").read_text())["stages"]:
        wall, rss, _ = timed(["dvc", "repro", "--single-item", stage], project, env)
        stage_times[stage], stage_rss[stage] = wall, rss
    metrics_text = (project / "metrics/metrics.json").read_text()
    metrics = json.loads(metrics_text)
    accuracy = metrics["accuracy"]
    # Validation accuracy is what chooses a recipe (docs/benchmarks.md's rules); test is reported.
    detail = f"val {metrics['val_accuracy']:.4f}; " + ", ".join(f"{s} {t:.0f} s" for s, t in stage_times.items())
    committed = REPO / "metrics/metrics.json"
    if params_text == (REPO / "params.yaml").read_text() and committed.exists():
        # Same params, code and data as the committed run: determinism says same bytes.
        same = metrics_text == committed.read_text()
        detail += f"; metrics.json {'identical to' if same else 'DIFFERS from'} the committed one"
    detail += f"; predict {predict_speed(project, env):.0f} images/s"
    return Row(
        f"pipeline `{recipe}` (dvc repro)" + ("" if seed is None else f", seed {seed}"),
        sum(stage_times.values()),
        accuracy,
        stage_rss["train"],
        detail + "; RSS " + ", ".join(f"{s} {stage_rss[s]:.0f} MB" for s in stage_rss if s != "train"),
    )


PREDICT_SPEED = """
import sys, time
import numpy as np
from pathlib import Path
from wardrobe.model.file import load_keras_classifier
from wardrobe.cli.predict import Item, predict
model = load_keras_classifier(Path(sys.argv[1]))
x = np.load(sys.argv[2])
items = [Item(str(i), image) for i, image in enumerate(x)]
predict(model, items[:256], 256)  # warm-up (graph tracing)
start = time.perf_counter()
predict(model, items, 256)
print(f"{len(items) / (time.perf_counter() - start):.0f}")
"""


def predict_speed(project: Path, env: dict[str, str]) -> float:
    """Images per second of predict's batched inference on the 10,000 test images (model loaded once)."""
    out = subprocess.run(
        [sys.executable, "-c", PREDICT_SPEED, "data/model/model.keras", "data/prepared/x_test.npy"],
        cwd=project,
        env={**env, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        check=True,
    )
    return float(out.stdout.strip())


def seed_summary(rows: list[Row], recipe: str) -> str:
    """Mean and spread of the default recipe's seeds: one seed's accuracy is not a result."""
    seeded = [row for row in rows if row.name.startswith(f"pipeline `{recipe}` (dvc repro), seed ")]
    if len(seeded) < 2:
        return ""
    accuracies = [row.accuracy for row in seeded]
    ratios = [row.wall_s / rows[0].wall_s for row in seeded]
    mean = sum(accuracies) / len(accuracies)
    return (
        f"\n`{recipe}` over {len(seeded)} seeds: mean test accuracy {mean:.4f}, spread "
        f"{min(accuracies):.4f}-{max(accuracies):.4f}; time {min(ratios):.2f}-{max(ratios):.2f}× the original."
    )


def table(rows: list[Row]) -> str:
    base = rows[0].wall_s
    lines = [
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}; {time.strftime('%Y-%m-%d')}",
        "",
        "| run | wall time | test accuracy | peak RSS (train) | time vs original | stages |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row.name} | {row.wall_s:.1f} s | {row.accuracy:.4f} | {row.peak_rss_mb:.0f} MB | "
            f"{row.wall_s / base:.2f}× | {row.detail} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    defaults = yaml.safe_load((REPO / "conf/config.yaml").read_text())["defaults"]
    default_recipe = next(entry["train"] for entry in defaults if isinstance(entry, dict) and "train" in entry)
    parser.add_argument(
        "--recipes",
        nargs="+",
        default=["mlp", default_recipe],
        help=f"recipes in conf/train/ to run (default: mlp {default_recipe})",
    )
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=[42, 43, 44],
        help="training seeds for the default recipe (each a full dvc repro; the others run once)",
    )
    parser.add_argument("--steps", action="store_true", help="also time the default's training step (bench.steps)")
    parser.add_argument("--write", type=Path, help="also write the table to this markdown file")
    parser.add_argument(
        "--keep", type=Path, help="run the projects in this new folder and keep them (default: a temp folder)"
    )
    args = parser.parse_args()
    if not (DATA_DIR / "train-images-idx3-ubyte.gz").exists():
        raise SystemExit(f"bench: {DATA_DIR} is missing; install the Debian package dataset-fashion-mnist")
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "DVC_NO_ANALYTICS": "1",
        "PYTHONUNBUFFERED": "1",
    }
    with (
        contextlib.nullcontext(str(args.keep))
        if args.keep
        else tempfile.TemporaryDirectory(prefix="wardrobe-bench-") as tmp
    ):
        Path(tmp).mkdir(parents=True, exist_ok=True)
        rows = [run_original(env, Path(tmp))]
        print(table(rows), flush=True)
        for recipe in args.recipes:
            for seed in args.seeds if recipe == default_recipe else [None]:
                rows.append(run_pipeline(recipe, env, Path(tmp), seed))
                print(f"\n{table(rows)}{seed_summary(rows, default_recipe)}", flush=True)
    text = table(rows) + seed_summary(rows, default_recipe)
    if args.steps:
        from bench.steps import report

        text += "\n\n" + report(default_recipe, steps=30)
        print(text, flush=True)
    if args.write:
        args.write.write_text(text + "\n")


if __name__ == "__main__":
    main()
