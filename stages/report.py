"""report: write report.md for a pull request: metrics and params diff against a base revision,
plus the training curves and confusion matrix.

Usage: python -m stages.report [--base REV] [--out report.md]
"""

from __future__ import annotations

import argparse
import subprocess
from pathlib import Path

from stages.common import WardrobeError, find_tool, run_main, write_text_atomic
from stages.outputs import CONFUSION_PNG, CURVES_PNG


def dvc_markdown(*args: str) -> str:
    """Output of a `dvc ... --md` command; an error names the command."""
    result = subprocess.run([find_tool("dvc"), *args, "--md"], capture_output=True, text=True)
    if result.returncode != 0:
        raise WardrobeError(f"dvc {' '.join(args)} failed: {' '.join(result.stderr.split())[:300]}")
    return result.stdout.strip() or "_no changes_"


def build_report(base: str, metrics_md: str, params_md: str, images: list[Path]) -> str:
    parts = [
        f"# wardrobe report (against `{base}`)",
        "",
        "## Metrics",
        "",
        metrics_md,
        "",
        "## Params",
        "",
        params_md,
        "",
        "## Plots",
        "",
    ]
    parts += [f"![{image.stem}]({image.as_posix()})" for image in images]
    return "\n".join(parts) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description="Write a markdown report of this workspace against a revision.")
    parser.add_argument("--base", default="HEAD", help="revision to compare with (default: HEAD)")
    parser.add_argument("--out", type=Path, default=Path("report.md"))
    args = parser.parse_args()
    metrics_md = dvc_markdown("metrics", "diff", args.base, "--all")
    params_md = dvc_markdown("params", "diff", args.base)
    write_text_atomic(args.out, build_report(args.base, metrics_md, params_md, [CURVES_PNG, CONFUSION_PNG]))
    print(f"report: wrote {args.out}")


if __name__ == "__main__":
    run_main(main)
