"""How close the training step runs to the machine's limit: images/s and achieved FLOP/s.

Usage: python -m bench.steps [--steps N] [RECIPE]   (needs data/prepared from `dvc repro`)
       python -m bench.steps [--steps N] [RECIPE] --compare 'train.filters=[16,32,64]' ...

Times N training steps of a recipe (best of two epochs after a warm-up epoch, which also shows
the first epoch's tracing cost), in the pipeline's setting (op determinism on) and, each in its
own process because determinism is global, with determinism off, with XLA (`jit_compile`, also
with determinism off: Keras silently drops jit_compile when op determinism is on, and TensorFlow
refuses to force it, having no deterministic XLA MaxPool gradient) and with TensorFlow's Eigen
kernels instead of oneDNN (the default on CPUs without AVX512_VNNI/AMX before stages/__init__.py
decided it).
FLOPs are counted from the layers: 2·MACs of each Conv2D and Dense per image forward, ×3 for a
training step (forward, gradient w.r.t. inputs, gradient w.r.t. weights). The peak is stated two
ways: the theoretical one (cores × clock × FLOP per cycle from the CPU's vector flags) and a
measured single-precision matrix multiply (NumPy's BLAS on all cores), a practical ceiling.

`--compare` prices candidate trunks before anyone trains them: each argument is a set of `-S`
overrides (space-separated), timed in the pipeline's setting against the recipe itself. It prices
the training step only: a real epoch also pays the input pipeline and the validation pass.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
VARIANTS = {
    "pipeline (op determinism, oneDNN)": {"determinism": True, "jit": False},
    "Eigen kernels (TF_ENABLE_ONEDNN_OPTS=0)": {"determinism": True, "jit": False, "onednn": False},
    "op determinism off": {"determinism": False, "jit": False},
    "XLA jit_compile (op determinism off)": {"determinism": False, "jit": True},
}
PIPELINE = "pipeline (op determinism, oneDNN)"


def training_flops_per_image(model) -> float:
    """3 × the forward FLOPs of the convolutions and dense layers (the rest is negligible)."""
    import keras

    forward = 0
    for layer in model.layers:
        if isinstance(layer, keras.layers.Conv2D):
            kernel_h, kernel_w, channels_in, channels_out = layer.kernel.shape
            _, out_h, out_w, _ = layer.output.shape
            forward += 2 * out_h * out_w * kernel_h * kernel_w * channels_in * channels_out
        elif isinstance(layer, keras.layers.Dense):
            forward += 2 * int(np.prod(layer.kernel.shape))
    return 3.0 * forward


def time_steps(recipe: str, steps: int, determinism: bool, jit: bool, overrides: Sequence[str] = ()) -> dict:
    """In this process: build the recipe's model as train does, time `steps` steps per epoch."""
    import dataclasses

    import keras
    import yaml

    from wardrobe.common import enable_determinism, load_split, read_dataset
    from wardrobe.model.factory import build_model
    from wardrobe.outputs import PREPARED_DIR
    from wardrobe.params import compose, parse_params
    from wardrobe.training import compile_model, make_dataset

    if determinism:
        enable_determinism()
    params = parse_params(yaml.safe_load(compose(REPO / "conf", [f"train={recipe}", *overrides]))).train
    params = dataclasses.replace(params, epochs=3)
    x, y = load_split(PREPARED_DIR, "train")
    count = params.batch_size * steps
    classes = len(read_dataset(PREPARED_DIR).class_names)
    one_hot = classes if params.label_smoothing > 0 else None  # as train.fit: smoothing takes one-hot labels
    dataset = make_dataset(x[:count], y[:count], params.batch_size, shuffle_seed=params.seed, one_hot=one_hot)
    model = build_model(params, x.shape[1:], classes)
    compile_model(model, params, steps_per_epoch=steps)
    model.compile(optimizer=model.optimizer, loss=model.loss, metrics=["accuracy"], jit_compile=jit)
    seconds: list[float] = []

    class EpochTimer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
            self.start = time.perf_counter()

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            seconds.append(time.perf_counter() - self.start)

    model.fit(dataset, epochs=params.epochs, verbose=0, callbacks=[EpochTimer()], shuffle=False)
    step_s = min(seconds[1:]) / steps
    return {
        "images_per_s": params.batch_size / step_s,
        "ms_per_step": 1000 * step_s,
        "first_epoch_extra_s": seconds[0] - min(seconds[1:]),
        "flops_per_image": training_flops_per_image(model),
        "batch_size": params.batch_size,
    }


def theoretical_peak_gflops() -> tuple[float, str]:
    """cores × clock × single-precision FLOP per cycle per core, from /proc/cpuinfo's flags.

    Two FMA units per core on current x86 server cores: 2 × 2 × (16 lanes with AVX-512, 8 with
    AVX2). The clock is the TSC rate (BogoMIPS / 2), the base clock; boost can exceed it.
    """
    text = Path("/proc/cpuinfo").read_text()
    flags = next(line for line in text.splitlines() if line.startswith("flags")).split()
    bogomips = float(next(line for line in text.splitlines() if line.startswith("bogomips")).split(":")[1])
    lanes = 16 if "avx512f" in flags else 8 if "avx2" in flags else 4
    clock_ghz = bogomips / 2 / 1000
    cores = os.cpu_count() or 1
    peak = cores * clock_ghz * 2 * 2 * lanes
    return peak, f"{cores} cores × {clock_ghz:.2f} GHz × 2 FMA units × 2 FLOP × {lanes} fp32 lanes"


def sgemm_gflops(size: int = 2048, repeats: int = 10) -> float:
    a = np.random.default_rng(0).random((size, size), dtype=np.float32)
    a @ a
    start = time.perf_counter()
    for _ in range(repeats):
        a @ a
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e9


def run_child(recipe: str, steps: int, name: str, variant: dict) -> dict:
    """One variant in its own process: op determinism is process-wide, and the kernel library
    is chosen when TensorFlow loads (stages/__init__.py turns oneDNN on unless told otherwise)."""
    variant = dict(variant)
    env = {**os.environ, "TF_ENABLE_ONEDNN_OPTS": "1" if variant.pop("onednn", True) else "0"}
    out = subprocess.run(
        [sys.executable, "-m", "bench.steps", "--child", json.dumps(variant), "--steps", str(steps), recipe],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=env,
    )
    if out.returncode != 0:
        raise SystemExit(f"bench.steps: {name} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def compare(recipe: str, steps: int, candidates: list[str]) -> str:
    pipeline = VARIANTS[PIPELINE]
    results = {"(the recipe)": run_child(recipe, steps, recipe, pipeline)}
    for candidate in candidates:
        results[candidate] = run_child(recipe, steps, candidate, {**pipeline, "overrides": candidate.split()})
    base = results["(the recipe)"]
    lines = [
        f"Candidate trunks against `{recipe}` (op determinism on, {steps} steps per timed epoch):",
        "",
        "| overrides | batch | MFLOP per image | images/s | step cost per image vs the recipe |",
        "|---|---|---|---|---|",
    ]
    for name, result in results.items():
        lines.append(
            f"| {name} | {result['batch_size']} | {result['flops_per_image'] / 1e6:.1f} | "
            f"{result['images_per_s']:.0f} | {base['images_per_s'] / result['images_per_s']:.2f}× |"
        )
    return "\n".join(lines)


def report(recipe: str, steps: int) -> str:
    results = {name: run_child(recipe, steps, name, variant) for name, variant in VARIANTS.items()}
    peak, how = theoretical_peak_gflops()
    blas = sgemm_gflops()
    base = results[PIPELINE]
    lines = [
        f"Training step of `{recipe}` (batch {base['batch_size']}, {steps} steps per timed epoch): "
        f"{base['flops_per_image'] / 1e6:.1f} MFLOP per image (3 × forward conv + dense).",
        f"Peak: theoretical {peak:.0f} GFLOP/s ({how}); measured fp32 matrix multiply {blas:.0f} GFLOP/s.",
        "",
        "| variant | images/s | ms per step | achieved GFLOP/s | of theoretical | of matmul | vs pipeline "
        "| first epoch extra |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, result in results.items():
        gflops = result["images_per_s"] * result["flops_per_image"] / 1e9
        lines.append(
            f"| {name} | {result['images_per_s']:.0f} | {result['ms_per_step']:.0f} | {gflops:.1f} | "
            f"{gflops / peak:.0%} | {gflops / blas:.0%} | {result['images_per_s'] / base['images_per_s']:.2f}× | "
            f"{result['first_epoch_extra_s']:.1f} s |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", nargs="?", default="cnn")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--compare", nargs="+", metavar="OVERRIDES", help="candidate -S overrides to price")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(time_steps(args.recipe, args.steps, **json.loads(args.child))))
        return
    print(compare(args.recipe, args.steps, args.compare) if args.compare else report(args.recipe, args.steps))


if __name__ == "__main__":
    main()
