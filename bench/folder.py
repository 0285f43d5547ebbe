"""Image-folder benchmark: prepare on a folder of Fashion-MNIST's 70,000 PNGs against prepare on its
IDX files, same machine, same run (issue #25).

    python -m bench.folder        (needs the Debian package's IDX files, `make dataset`)

Writes the 70,000 images as ROOT/CLASS/NNNNN.png (train and test folders, class folders that sort
in label order) into a temp folder, then runs `python -m stages.prepare` on each in its own temp
project: wall time and peak RSS of the process, and a check that both wrote the same arrays byte
for byte. The ratio is what counts: absolute times differ between machines and runs.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from bench.serve import run_with_rusage
from wardrobe.data.preparation import load_idx
from wardrobe.params import PARAMS_FILE, load_params

REPO = Path(__file__).resolve().parent.parent


def write_pngs(root: Path, images: np.ndarray, labels: np.ndarray, folders: list[str]) -> None:
    for folder in folders:
        (root / folder).mkdir(parents=True)
    for index, (image, label) in enumerate(zip(images, labels, strict=True)):
        Image.fromarray(image).save(root / folders[label] / f"{index:05d}.png")


def prepare_in(project: Path, params: dict) -> tuple[float, float]:
    project.mkdir(exist_ok=True)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "PYTHONPATH": str(REPO)}  # the checkout's stages, as DVC runs them there
    seconds, rss_mb, _ = run_with_rusage([sys.executable, "-m", "stages.prepare"], cwd=project, env=env)
    return seconds, rss_mb


def main() -> None:
    params = load_params(REPO / PARAMS_FILE)
    committed = yaml.safe_load((REPO / PARAMS_FILE).read_text())
    (x_train, y_train), (x_test, y_test) = load_idx(params.data, params.prepare)
    folders = [f"{label}-{name.replace('/', '_')}" for label, name in enumerate(params.data.class_names or ())]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        # below the folder project's data/pictures/, the one place prepare reads pictures from
        pngs = work / "folder/data/pictures/pngs"
        write_pngs(pngs / "train", x_train, y_train, folders)
        write_pngs(pngs / "test", x_test, y_test, folders)
        files = sum(1 for _ in pngs.rglob("*.png"))
        png_mb = sum(path.stat().st_size for path in pngs.rglob("*.png")) / 2**20
        folder_data = {
            "name": "Fashion-MNIST as PNGs",
            "description": "the same images, one PNG each",
            "format": "folder",
            "root": "data/pictures/pngs/train",
            "test_root": "data/pictures/pngs/test",
            "test_fraction": 0.2,
            "image_size": [28, 28],
            "channels": 1,
            "photo_fit": "object",
        }
        idx_s, idx_rss = prepare_in(work / "idx", committed)
        folder_s, folder_rss = prepare_in(work / "folder", {**committed, "data": folder_data})
        for name in sorted(path.name for path in (work / "idx/data/prepared").glob("*.npy")):
            same = (work / "idx/data/prepared" / name).read_bytes() == (
                work / "folder/data/prepared" / name
            ).read_bytes()
            if not same:
                raise SystemExit(f"bench.folder: {name} differs between the IDX and the folder run")
        arrays_mb = sum(path.stat().st_size for path in (work / "idx/data/prepared").glob("*.npy")) / 2**20
    print(
        f"{files:,} PNGs ({png_mb:.0f} MB); the arrays prepare writes: {arrays_mb:.0f} MB; identical from both sources"
    )
    print("| prepare from | wall time | × IDX | peak RSS |")
    print("|---|---|---|---|")
    print(f"| IDX files (`data=fashion_mnist`) | {idx_s:.1f} s | 1.00× | {idx_rss:.0f} MB |")
    print(f"| a folder of PNGs (`format: folder`) | {folder_s:.1f} s | {folder_s / idx_s:.2f}× | {folder_rss:.0f} MB |")


if __name__ == "__main__":
    main()
