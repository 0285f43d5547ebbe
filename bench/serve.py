"""Serving benchmark: the exported ONNX model against the Keras model, same machine, same run.

    python -m bench.serve [--repeats 5]     (part of `make bench`; needs `dvc repro` first)

- cold start: a new `wardrobe predict IMAGE` process, from exec to the answer printed, for the
  Keras runtime, the ONNX runtime in the same venv, and the ONNX runtime in the TensorFlow-free
  install (`make venv-serve`); the median of --repeats runs, with each process's peak RSS;
- throughput: images/s classifying the 10,000 test images in this process, after one warm-up
  batch, with the test-time augmentation the model records (10 views for the default).

Ratios are to the Keras runtime measured here: absolute times differ between machines and runs.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from wardrobe.common import load_split
from wardrobe.model.file import load_keras_classifier, load_onnx_classifier
from wardrobe.outputs import MODEL_PATH, ONNX_PATH, PREPARED_DIR

SERVE_VENV = Path(".venv-serve")
BATCH = 1000


def cold_start(command: list[str], repeats: int) -> tuple[float, float, str]:
    """Median wall time and peak RSS over `repeats` fresh processes, and the answer they printed."""
    runs = [run_with_rusage(command) for _ in range(repeats)]
    answers = {answer for _, _, answer in runs}
    if len(answers) != 1:
        raise SystemExit(f"bench.serve: {' '.join(command)} answered differently across runs: {answers}")
    return statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs), answers.pop()


def run_with_rusage(
    command: list[str], cwd: Path | None = None, env: dict[str, str] | None = None
) -> tuple[float, float, str]:
    """Like subprocess.run, plus the child's own peak RSS from wait4 (not the max over all children)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        process = subprocess.Popen(command, stdout=out, stderr=err, cwd=cwd, env=env)
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - start
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        if process.returncode != 0:
            raise SystemExit(f"bench.serve: {' '.join(command)} failed: {err.read().strip()[-300:]}")
        return seconds, usage.ru_maxrss / 1024, out.read().strip()


def throughput(predict: object, x: np.ndarray) -> float:
    predict(x[:BATCH])  # warm-up: graph tracing, session set-up
    start = time.perf_counter()
    predict(x)
    return len(x) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="cold starts per runtime (median)")
    args = parser.parse_args()
    if not ONNX_PATH.is_file():
        raise SystemExit(f"bench.serve: {ONNX_PATH} not found; run dvc repro first")
    subprocess.run(["make", "-s", "venv-serve", f"SERVE_VENV={SERVE_VENV}"], check=True)

    x_test, _ = load_split(PREPARED_DIR, "test")
    with tempfile.TemporaryDirectory() as scratch:
        image = Path(scratch) / "test0.png"
        Image.fromarray(np.round(x_test[0] * 255).astype(np.uint8)).save(image)
        here = str(Path(sys.executable).parent / "wardrobe")
        starts = {
            "keras (TensorFlow venv)": cold_start([here, "predict", str(image), "--runtime", "keras"], args.repeats),
            "onnx (same venv)": cold_start([here, "predict", str(image), "--runtime", "onnx"], args.repeats),
            "onnx (`make venv-serve`, no TensorFlow)": cold_start(
                [str(SERVE_VENV / "bin/wardrobe"), "predict", str(image)], args.repeats
            ),
        }
    classes = {answer.split(": ", 1)[1].split(" (")[0] for _, _, answer in starts.values()}
    keras_classifier = load_keras_classifier(MODEL_PATH)
    onnx_classifier = load_onnx_classifier(ONNX_PATH)
    rates = {
        "keras": throughput(lambda x: keras_classifier.predict_proba(x, BATCH), x_test),
        "onnx": throughput(lambda x: onnx_classifier.predict_proba(x, BATCH), x_test),
    }
    venv_mb = {name: du_mb(path) for name, path in (("TensorFlow venv", Path(sys.prefix)), ("serve venv", SERVE_VENV))}

    base_seconds = starts["keras (TensorFlow venv)"][0]
    print(f"Cold start to the first answer, one image, median of {args.repeats} (same answer everywhere: {classes}):\n")
    print("| runtime | seconds | vs keras | peak RSS MB |\n|---|---|---|---|")
    for name, (seconds, peak, _) in starts.items():
        print(f"| {name} | {seconds:.2f} | {seconds / base_seconds:.2f}× | {peak:.0f} |")
    print(f"\nThroughput on the {len(x_test):,} test images (batches of {BATCH}, test-time views included):\n")
    print("| runtime | images/s | vs keras |\n|---|---|---|")
    for name, rate in rates.items():
        print(f"| {name} | {rate:.0f} | {rate / rates['keras']:.2f}× |")
    print("\nInstalled size: " + ", ".join(f"{name} {mb:.0f} MB" for name, mb in venv_mb.items()))
    if len(classes) != 1:
        raise SystemExit(f"bench.serve: the runtimes disagree on the test image: {classes}")


def du_mb(path: Path) -> float:
    total = sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())
    return total / 1e6


if __name__ == "__main__":
    if shutil.which("make") is None:
        raise SystemExit("bench.serve: needs make (for make venv-serve)")
    main()
