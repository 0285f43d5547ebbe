"""Scale benchmark: the whole pipeline on a user's picture folder of 10,000 and of 100,000 pictures,
same machine, same run (issue #35).

    python -m bench.scale [--sizes 10000 100000] [--keep DIR]    (part of `make bench`)

For each size: a class-per-folder tree of 64×64 RGB PNGs under a fresh project's
data/pictures/scale/ (Fashion-MNIST's images, in turn, upscaled and tinted a random colour:
ten classes a model can learn), a conf/data file for it, and params as `dvc exp run -S data=scale
-S train.epochs=1` composes them. Each stage runs as its own process (`python -m stages.NAME`, as
DVC runs it): wall seconds, peak RSS (wait4's ru_maxrss) and images/s. Then `dvc commit` records
the run, and `dvc status` is timed twice on the folder: the first call with DVC's state database
empty (as in a fresh clone: it hashes every picture), the second with it warm. prepare also runs
with one process (`prepare.workers=1`) beside the default, one per core.

Targets (docs/benchmarks.md): every stage's peak RSS at the largest size ≤ 1.25× at the smallest;
train images/s ≥ 0.8× (its training steps, from Keras' ms/step); prepare with a process per core
≥ 1.7× one process on 2 cores. Ratios are what count: absolute figures differ between machines.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from bench.run import DATA_DIR, new_project, timed
from wardrobe.params import load_params

REPO = Path(__file__).resolve().parent.parent
SIZE = 64  # pixels, each side
STAGES = ("prepare", "train", "evaluate", "export", "card")
CONF = {
    "name": "Scale",
    "description": "Fashion-MNIST's images upscaled to 64×64 and tinted, for bench.scale",
    "format": "folder",
    "root": "data/pictures/scale",
    "test_root": "",
    "test_fraction": 0.2,
    "image_size": [SIZE, SIZE],
    "channels": 3,
    "photo_fit": "resize",
}


def fashion_images() -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """All 70,000 Fashion-MNIST images (uint8 28×28), labels and class names, from the IDX files."""
    from wardrobe.data.preparation import load_idx

    params = load_params(REPO / "params.yaml")
    (x_train, y_train), (x_test, y_test) = load_idx(params.data, params.prepare)
    names = tuple(name.replace("/", "_") for name in params.data.class_names or ())
    return np.concatenate([x_train, x_test]), np.concatenate([y_train, y_test]), names


def write_pictures(args: tuple[Path, int, int, np.ndarray, np.ndarray, tuple[str, ...]]) -> None:
    """Pictures first..first+count-1: image i % 70,000, upscaled, tinted by a colour seeded by i."""
    root, first, count, images, labels, names = args
    for i in range(first, first + count):
        source = images[i % len(images)]
        tint = np.random.default_rng(i).uniform(0.35, 1.0, 3)
        big = np.asarray(Image.fromarray(source).resize((SIZE, SIZE), Image.Resampling.LANCZOS), np.float32)
        rgb = np.clip(big[..., None] * tint, 0, 255).astype(np.uint8)
        Image.fromarray(rgb).save(root / names[labels[i % len(labels)]] / f"{i:06d}.png")


def make_folder(root: Path, count: int, fashion: tuple[np.ndarray, np.ndarray, tuple[str, ...]]) -> float:
    """Write `count` pictures under root/CLASS/ with a process per core; return their size in MB."""
    images, labels, names = fashion
    for name in names:
        (root / name).mkdir(parents=True)
    step = 2000
    jobs = [(root, first, min(step, count - first), images, labels, names) for first in range(0, count, step)]
    with multiprocessing.get_context("spawn").Pool(len(os.sched_getaffinity(0))) as pool:
        pool.map(write_pictures, jobs)
    return sum(path.stat().st_size for path in root.rglob("*.png")) / 2**20


@dataclass
class StageRun:
    seconds: float
    rss_mb: float
    images_per_s: float


def train_images_per_s(output: str, batch_size: int) -> float:
    """Training images/s of the fit's steps: Keras' `N/N - Ts - Mms/step` line of the last epoch
    (the first epoch's includes graph tracing; with one epoch, it is all there is)."""
    steps = re.findall(r"(\d+)/\1 - \d+s - (\d+)ms/step", output)
    if not steps:
        raise SystemExit(f"bench.scale: no Keras progress line in train's output:\n{output[-2000:]}")
    return batch_size / (int(steps[-1][1]) / 1000)


def run_size(count: int, work: Path, env: dict[str, str], fashion: tuple) -> dict:
    project = work / f"pictures-{count}"
    params_text = new_project(
        project, ["data=scale", "train.epochs=1"], {"data/scale.yaml": yaml.safe_dump(CONF, sort_keys=False)}
    )
    params = yaml.safe_load(params_text)
    # A first commit (DVCLive, in train, reads the git revision); the pictures stay untracked.
    identity = {"GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "bench@localhost"}
    identity |= {"GIT_COMMITTER_NAME": "bench", "GIT_COMMITTER_EMAIL": "bench@localhost"}
    for args in (["git", "add", "-A"], ["git", "commit", "-qm", "project"]):
        timed(args, project, {**env, **identity})
    started = time.perf_counter()
    megabytes = make_folder(project / CONF["root"], count, fashion)
    print(f"  {count:,} pictures written ({megabytes:.0f} MB) in {time.perf_counter() - started:.0f} s", flush=True)
    runs: dict[str, StageRun] = {}
    for stage in STAGES:
        seconds, rss, output = timed([sys.executable, "-m", f"stages.{stage}"], project, env)
        record = json.loads((project / "data/prepared/dataset.json").read_text())
        counts = record["counts"]
        images = {
            "prepare": count / seconds,
            "train": train_images_per_s(output, params["train"]["batch_size"]) if stage == "train" else 0.0,
            "evaluate": (counts["test"] + counts["val"]) / seconds,
            "export": counts["test"] / seconds,
            "card": 0.0,
        }[stage]
        runs[stage] = StageRun(seconds, rss, images)
        print(f"  {stage}: {seconds:.1f} s, peak RSS {rss:.0f} MB, {images:.0f} images/s", flush=True)
    prepared_mb = sum(path.stat().st_size for path in (project / "data/prepared").iterdir()) / 2**20
    accuracy = json.loads((project / "metrics/metrics.json").read_text())["accuracy"]
    # One decoding process, in another project's copy of the same params and folder (hard links).
    single = work / f"pictures-{count}-one-process"
    single.mkdir()
    shutil.copytree(project / "data/pictures", single / "data/pictures", copy_function=os.link)
    (single / "params.yaml").write_text(yaml.safe_dump({**params, "prepare": {**params["prepare"], "workers": 1}}))
    one_s, one_rss, _ = timed([sys.executable, "-m", "stages.prepare"], single, env)
    for name in sorted(p.name for p in (project / "data/prepared").iterdir()):
        if (project / "data/prepared" / name).read_bytes() != (single / "data/prepared" / name).read_bytes():
            raise SystemExit(f"bench.scale: {name} differs between 1 and {os.cpu_count()} decoding processes")
    shutil.rmtree(single)
    status = dvc_status_times(project, env)
    return {
        "count": count,
        "megabytes": megabytes,
        "prepared_mb": prepared_mb,
        "accuracy": accuracy,
        "runs": runs,
        "one_process": StageRun(one_s, one_rss, count / one_s),
        "status": status,
    }


def dvc_status_times(project: Path, env: dict[str, str]) -> dict[str, float]:
    """`dvc commit` the run (hard links into the cache: no copy of the arrays), then time `dvc
    status` with an empty state database (a fresh DVC site cache: every file is hashed) and again."""
    for args in (["dvc", "init", "-q", "--force"], ["dvc", "config", "cache.type", "hardlink"]):
        timed(args, project, env)
    with tempfile.TemporaryDirectory(prefix="dvc-site-") as commit_site, tempfile.TemporaryDirectory() as fresh_site:
        timed(["dvc", "commit", "-f", "-q"], project, {**env, "DVC_SITE_CACHE_DIR": commit_site})
        first, first_rss, out = timed(["dvc", "status", "--json"], project, {**env, "DVC_SITE_CACHE_DIR": fresh_site})
        second, second_rss, out2 = timed(
            ["dvc", "status", "--json"], project, {**env, "DVC_SITE_CACHE_DIR": fresh_site}
        )
    if json.loads(out or "{}") or json.loads(out2 or "{}"):
        raise SystemExit(f"bench.scale: dvc status is not clean after dvc commit: {out}")
    return {"first_s": first, "first_rss": first_rss, "second_s": second, "second_rss": second_rss}


def report(results: list[dict]) -> str:
    small, large = results[0], results[-1]
    lines = [
        f"Machine: {os.cpu_count()} cores; {time.strftime('%Y-%m-%d')}; 64×64 RGB PNGs, 1 epoch of the default recipe",
        "",
        "| pictures | PNGs | data/prepared/ | test accuracy (1 epoch) |",
        "|---|---|---|---|",
    ]
    for r in results:
        lines.append(f"| {r['count']:,} | {r['megabytes']:.0f} MB | {r['prepared_mb']:.0f} MB | {r['accuracy']:.4f} |")
    head = " | ".join(f"{r['count']:,}: s / images/s / peak RSS" for r in results)
    lines += [
        "",
        f"| stage | {head} | RSS {large['count']:,} ÷ {small['count']:,} | images/s {large['count']:,} ÷ "
        f"{small['count']:,} |",
        "|---|" + "---|" * (len(results) + 2),
    ]
    for stage in STAGES:
        cells = " | ".join(
            f"{r['runs'][stage].seconds:.1f} / {r['runs'][stage].images_per_s:.0f} / {r['runs'][stage].rss_mb:.0f} MB"
            for r in results
        )
        rss_ratio = large["runs"][stage].rss_mb / small["runs"][stage].rss_mb
        speed = small["runs"][stage].images_per_s
        speed_ratio = f"{large['runs'][stage].images_per_s / speed:.2f}×" if speed else "—"
        lines.append(f"| {stage} | {cells} | {rss_ratio:.2f}× | {speed_ratio} |")
    lines += [
        "",
        "| pictures | prepare, 1 process | a process per core | speed-up | dvc status: first (empty state) | second |",
    ]
    lines.append("|---|---|---|---|---|---|")
    for r in results:
        one, many, status = r["one_process"], r["runs"]["prepare"], r["status"]
        lines.append(
            f"| {r['count']:,} | {one.seconds:.1f} s ({one.images_per_s:.0f}/s, {one.rss_mb:.0f} MB) | "
            f"{many.seconds:.1f} s ({many.images_per_s:.0f}/s) | {many.images_per_s / one.images_per_s:.2f}× | "
            f"{status['first_s']:.1f} s ({status['first_rss']:.0f} MB) | {status['second_s']:.1f} s "
            f"({status['second_rss']:.0f} MB) |"
        )
    lines.append("\nimages/s: prepare pictures decoded; train the fit's steps (Keras ms/step); evaluate test + val")
    lines.append(
        "images with every view; export test images (Keras, SavedModel and ONNX each). RSS: the stage process."
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000], help="pictures per run")
    parser.add_argument("--keep", type=Path, help="run in this new folder and keep it (default: a temp folder)")
    parser.add_argument("--write", type=Path, help="also write the tables to this markdown file")
    args = parser.parse_args()
    if not (DATA_DIR / "train-images-idx3-ubyte.gz").exists():
        raise SystemExit(f"bench.scale: {DATA_DIR} is missing; install the Debian package dataset-fashion-mnist")
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": str(REPO),
        "DVC_NO_ANALYTICS": "1",
        "PYTHONUNBUFFERED": "1",
    }
    fashion = fashion_images()
    with (
        contextlib.nullcontext(str(args.keep)) if args.keep else tempfile.TemporaryDirectory(prefix="wardrobe-scale-")
    ) as tmp:
        Path(tmp).mkdir(parents=True, exist_ok=True)
        results = []
        for count in args.sizes:
            print(f"{count:,} pictures:", flush=True)
            results.append(run_size(count, Path(tmp), env, fashion))
        text = report(results)
    print(text)
    if args.write:
        args.write.write_text(text + "\n")


if __name__ == "__main__":
    main()
