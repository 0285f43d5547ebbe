"""report: report.md for a pull request, in the order a reviewer reads it.

1. One sentence: test accuracy base → head, the validation gate's verdict, the class that moved most.
2. The accuracy and loss curves of both revisions and their confusion matrices side by side:
   DVC's own `dvc plots diff` specs rendered to PNG offline (vl-convert), so the pictures are what
   `dvc plots diff` shows, in files next to report.md.
3. Per-class F1 with its change, and the confusion-matrix cells that moved most.
4. `dvc metrics diff` (the environment record included) and `dvc params diff`.

Usage: wardrobe report [--base REV] [--out report.md]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import subprocess
from pathlib import Path

import pandas as pd

from wardrobe.cli import OneLineParser
from wardrobe.common import (
    WardrobeError,
    complete_text,
    markdown_table,
    read_csv,
    read_json,
    run_main,
    write_text_atomic,
)
from wardrobe.outputs import CONFUSION_CSV, CONFUSION_PNG, METRICS_PATH, PER_CLASS_CSV, mistake_counts
from wardrobe.plumbing import file_at, find_tool

IMAGES_DIR = "report_images"  # next to report.md
TOP_MOVES = 5


def dvc_markdown(*args: str) -> str:
    """Output of a `dvc ... --md` command; an error names the command."""
    return _dvc(*args, "--md").strip() or "_no changes_"


def _dvc(*args: str) -> str:
    result = subprocess.run([find_tool("dvc"), *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise WardrobeError(f"dvc {' '.join(args)} failed: {complete_text(result.stderr)}")
    return result.stdout


def plot_specs(base: str) -> dict[str, dict]:
    """DVC's Vega-Lite spec of every declared chart, filled with the workspace's and base's data."""
    rendered = json.loads(_dvc("plots", "diff", base, "--json"))["data"]
    # A chart whose file neither revision has (a plot added since base, not yet run) has no entry.
    return {
        name: entries[0]["content"] for name, entries in rendered.items() if entries and entries[0]["type"] == "vega"
    }


def render_png(spec: dict) -> bytes:
    try:
        import vl_convert
    except ImportError:
        raise WardrobeError("report: needs vl-convert-python to draw plots: pip install 'wardrobe[report]'") from None
    return vl_convert.vegalite_to_png(spec, scale=1.5)


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def per_class_changes(base: pd.DataFrame | None, head: pd.DataFrame) -> pd.DataFrame:
    """class, base F1, head F1, change; largest move first (no base: head only)."""
    table = head[["class", "f1"]].rename(columns={"f1": "head"})
    table.insert(1, "base", table["class"].map(base.set_index("class")["f1"]) if base is not None else float("nan"))
    table["change"] = table["head"] - table["base"]
    return table.sort_values("change", key=lambda change: -change.abs(), na_position="last", kind="stable")


def confusion_moves(base: pd.DataFrame, head: pd.DataFrame, top: int = TOP_MOVES) -> pd.DataFrame:
    """The off-diagonal (actual, predicted) cells whose count changed most, from confusion.csv rows."""

    table = pd.concat({"base": mistake_counts(base), "head": mistake_counts(head)}, axis=1).fillna(0).astype(int)
    table["change"] = table["head"] - table["base"]
    table = table[table["change"] != 0].reset_index()
    order = table.assign(size=-table["change"].abs()).sort_values(["size", "actual", "predicted"]).index
    return table.loc[order].head(top).reset_index(drop=True)


def headline(base_metrics: dict | None, head_metrics: dict, problems: list[str] | None, classes: pd.DataFrame) -> str:
    """The sentence a reviewer reads in five seconds; `problems` None: the gate was not run."""
    head = head_metrics["accuracy"]
    if base_metrics is None:
        accuracy = f"Test accuracy {head:.4f} (the base has no metrics)"
    else:
        base = base_metrics["accuracy"]
        accuracy = f"Test accuracy {base:.4f} → {head:.4f} ({(head - base) * 100:+.2f} points)"
    if problems is None:
        gate = "validation gate: not run"
    elif problems:
        more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
        gate = f"validation gate: **failed**: {problems[0]}{more}"
    else:
        gate = "validation gate: passed"
    moved = classes.dropna(subset=["change"])
    if len(moved) and moved.iloc[0]["change"] != 0:
        top = moved.iloc[0]
        change = f"{top['base']:.3f} → {top['head']:.3f} ({top['change']:+.3f})"
        biggest = f"; biggest class change: {top['class']} F1 {change}"
    else:
        biggest = ""
    return f"**{accuracy}**; {gate}{biggest}."


def frame_table(frame: pd.DataFrame, floats: str = "{:.4f}") -> str:
    """A frame as a markdown table; a float is signed when it is a change, — when missing."""

    def cell(value: object) -> str:
        if isinstance(value, float):
            return "—" if pd.isna(value) else (f"{value:+.4f}" if value < 0 or value > 0 else floats.format(value))
        return str(value)

    return markdown_table(
        list(frame.columns), [[cell(value) for value in row] for row in frame.itertuples(index=False)]
    )


def build_report(
    base: str,
    headline_text: str,
    images: list[Path],
    classes: pd.DataFrame,
    moves: pd.DataFrame | None,
    metrics_md: str,
    params_md: str,
) -> str:
    classes = classes.assign(base=classes["base"].map("{:.4f}".format), head=classes["head"].map("{:.4f}".format))
    parts = [f"# wardrobe report (against `{base}`)", "", headline_text, "", "## Plots (head and base)", ""]
    parts += [f"![{image.stem}]({image.as_posix()})" for image in images]
    parts += ["", "## Per-class F1", "", frame_table(classes), ""]
    parts += ["## Confusion-matrix cells that moved most", ""]
    parts += [frame_table(moves) if moves is not None and len(moves) else "_no changes_", ""]
    parts += ["## Metrics", "", metrics_md, "", "## Params", "", params_md]
    return "\n".join(parts) + "\n"


def csv_text(text: str | None) -> pd.DataFrame | None:
    return pd.read_csv(io.StringIO(text)) if text is not None else None


def read_verdict(path: Path) -> list[str]:
    """The gate's problems as `wardrobe validate --verdict PATH` wrote them, one per line."""
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise WardrobeError(f"{path}: no verdict; run `wardrobe validate --verdict {path}` first") from None
    except OSError as exc:
        raise WardrobeError(f"{path}: cannot read the gate's verdict: {exc.strerror}") from exc


def run(args: argparse.Namespace) -> None:
    problems = read_verdict(args.gate) if args.gate else None
    base_metrics_text = file_at(args.base, METRICS_PATH)[0]
    base_metrics = json.loads(base_metrics_text) if base_metrics_text else None
    head_metrics = read_json(METRICS_PATH)
    classes = per_class_changes(csv_text(file_at(args.base, PER_CLASS_CSV)[0]), read_csv(PER_CLASS_CSV))
    base_confusion = csv_text(file_at(args.base, CONFUSION_CSV)[0])
    moves = confusion_moves(base_confusion, read_csv(CONFUSION_CSV)) if base_confusion is not None else None

    images_dir = args.out.parent / IMAGES_DIR
    images_dir.mkdir(parents=True, exist_ok=True)
    images = []
    for name, spec in plot_specs(args.base).items():
        path = images_dir / f"{slug(name)}.png"
        path.write_bytes(render_png(spec))
        images.append(path.relative_to(args.out.parent))
    # The head's matrix as evaluate drew it (shares of each class), referenced from report.md.
    images.append(Path(os.path.relpath(CONFUSION_PNG.resolve(), args.out.parent.resolve())))
    report = build_report(
        args.base,
        headline(base_metrics, head_metrics, problems, classes),
        images,
        classes,
        moves,
        dvc_markdown("metrics", "diff", args.base, "--all"),
        dvc_markdown("params", "diff", args.base),
    )
    write_text_atomic(args.out, report)
    print(f"report: wrote {args.out} and {len(images) - 1} pictures in {images_dir}")


def main(argv: list[str] | None = None) -> None:
    parser = OneLineParser(
        prog="wardrobe report", description="Write a markdown report of this workspace against a revision."
    )
    parser.add_argument("--base", default="HEAD", help="revision to compare with (default: HEAD)")
    parser.add_argument("--out", type=Path, default=Path("report.md"))
    parser.add_argument(
        "--gate",
        type=Path,
        metavar="VERDICT",
        help="the validation gate's verdict file (wardrobe validate --verdict)",
    )
    args = parser.parse_args(argv)
    run_main(lambda: run(args))
