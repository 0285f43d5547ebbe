"""Things every stage shares, defined once: the prepared dataset's record, errors, atomic writes, loading, seeding,
the one-line-error entry point.

Output paths and their contents are in wardrobe/outputs.py; the model file and inference in
wardrobe/model/file.py; helpers only the command-line tools use (not the stages) in wardrobe/plumbing.py,
so editing them re-runs nothing."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

SPLITS = ("train", "val", "test")


class WardrobeError(Exception):
    """A user-facing problem (bad params, bad data, missing file): reported as one line."""


MESSAGE_LIMIT = 240  # characters of a library's message quoted in an error line


def complete_text(message: object, limit: int = MESSAGE_LIMIT) -> str:
    """A library's (often multi-line, sometimes huge) message on one line, never cut mid-sentence:
    whitespace collapsed; if longer than `limit`, its whole sentences up to it (at least the first,
    whatever its length), then "…" to say more was left out."""
    text = " ".join(str(message).split())
    if len(text) <= limit:
        return text
    sentences = re.split(r"(?<=[.!?:;])\s+(?=\S)", text)
    kept = sentences[0]
    for sentence in sentences[1:]:
        if len(kept) + 1 + len(sentence) > limit:
            break
        kept += " " + sentence
    return kept + (" …" if len(kept) < len(text) else "")


def split_paths(prepared_dir: Path, split: str) -> tuple[Path, Path]:
    """The images and labels files of one prepared split: prepare writes them, the rest read them."""
    return prepared_dir / f"x_{split}.npy", prepared_dir / f"y_{split}.npy"


def shape_text(shape: tuple[int, ...]) -> str:
    """(28, 28) → "28×28", (32, 32, 3) → "32×32×3": how messages and the card write a shape."""
    return "×".join(str(d) for d in shape)


DATASET_FILE = "dataset.json"  # beside the prepared arrays: prepare's record of what it made
# beside them: where each prepared image came from (a picture's path, or IDX file#index), by split and row
ORIGINS_FILE = "origins.csv"
ORIGINS_COLUMNS = ("split", "row", "origin")


@dataclass(frozen=True)
class DatasetInfo:
    """What prepare made. The class names and image shape come from here (train copies them into
    the model file for its readers): no stage names a dataset."""

    name: str
    class_names: tuple[str, ...]
    image_shape: tuple[int, ...]  # height, width; then 3 for RGB
    photo_fit: str  # how wardrobe predict fits a photo to these images (conf/data: photo_fit)
    counts: dict[str, int]
    # SHA-256 of what was read: the pinned file hashes (idx), every picture's name and bytes (folder).
    content_sha256: str

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "class_names": list(self.class_names), "image_shape": list(self.image_shape)}


def read_dataset(prepared_dir: Path) -> DatasetInfo:
    path = prepared_dir / DATASET_FILE
    raw = read_json(path)
    try:
        info = DatasetInfo(
            name=str(raw["name"]),
            class_names=tuple(str(name) for name in raw["class_names"]),
            image_shape=tuple(int(d) for d in raw["image_shape"]),
            photo_fit=str(raw["photo_fit"]),
            counts={str(k): int(v) for k, v in raw["counts"].items()},
            content_sha256=str(raw["content_sha256"]),
        )
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
        raise WardrobeError(f"{path}: not a dataset record ({exc!r}); run `dvc repro prepare`") from None
    if len(info.image_shape) not in (2, 3):
        raise WardrobeError(f"{path}: image_shape must be [height, width] or [height, width, 3]")
    return info


# Images read per call by the stages that stream a split (train's calibration, evaluate, export):
# about this many bytes. Each chunk is held ~4 times while predicted (the chunk, a shifted view,
# Keras' input copy, the mirrored view): at 64 MB, 2,400 64×64 RGB pictures made train's peak RSS
# 1.12× that of 600 (tests/test_datasets.py); at 8 MB, more model calls, the same numbers.
CHUNK_BYTES = 8 * 2**20


class ImageFile:
    """A prepared split's images (float32 N×H×W or N×H×W×3 in a `.npy` file), read from disk
    only as indexed: `x[i:j]` one read, `x[indices]` a read per run of consecutive rows, `x[i]`
    one image. Nothing stays in memory between reads, and nothing is memory-mapped: a mapped
    file's pages count in the process' resident set once touched, so an epoch over a mapped
    100,000-picture split would hold it all. `np.asarray(x)` reads it whole (tests, notebooks)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            with open(path, "rb") as handle:
                version = np.lib.format.read_magic(handle)
                read_header = (
                    np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                )
                shape, fortran_order, dtype = read_header(handle)
                self.offset = handle.tell()
            size = path.stat().st_size
        except (OSError, ValueError) as exc:
            raise WardrobeError(f"{path}: cannot read a .npy header: {complete_text(exc)}") from exc
        if fortran_order or dtype != np.float32 or len(shape) not in (3, 4):
            raise WardrobeError(f"{path}: expected C-ordered float32 N×height×width(×3), got {shape} {dtype}")
        self.shape: tuple[int, ...] = tuple(int(d) for d in shape)
        self.dtype = np.dtype(np.float32)
        self.row_bytes = int(np.prod(self.shape[1:])) * 4
        expected = self.offset + self.shape[0] * self.row_bytes
        if size != expected:
            raise WardrobeError(f"{path}: {size} bytes, but {self.shape} float32 needs {expected} (truncated?)")
        self._fd: int | None = None

    def __len__(self) -> int:
        return self.shape[0]

    def _read(self, start: int, count: int, out: np.ndarray) -> None:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        view, done = memoryview(out).cast("B"), 0
        while done < count * self.row_bytes:  # pread may return less than asked
            got = os.preadv(self._fd, [view[done:]], self.offset + start * self.row_bytes + done)
            if got == 0:
                raise WardrobeError(f"{self.path}: file ended early (changed while being read?)")
            done += got

    def __getitem__(self, key: int | slice | np.ndarray) -> np.ndarray:
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step != 1:
                return self[np.arange(start, stop, step)]
            out = np.empty((max(stop - start, 0), *self.shape[1:]), np.float32)
            if len(out):
                self._read(start, len(out), out)
            return out
        if isinstance(key, int | np.integer):
            index = int(key) + (len(self) if key < 0 else 0)
            if not 0 <= index < len(self):
                raise IndexError(f"index {key} out of range for {len(self)} images")
            return self[index : index + 1][0]
        indices = np.asarray(key, dtype=np.int64).reshape(-1)
        if len(indices) and (indices.min() < 0 or indices.max() >= len(self)):
            raise IndexError(f"an index is out of range for {len(self)} images")
        out = np.empty((len(indices), *self.shape[1:]), np.float32)
        # Runs of consecutive rows are one read each (a sorted or sequential batch is one read).
        breaks = np.flatnonzero(np.diff(indices) != 1) + 1
        for first, last in zip(np.r_[0, breaks], np.r_[breaks, len(indices)], strict=True):
            self._read(int(indices[first]), int(last - first), out[first:last])
        return out

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        whole = self[:]
        return whole if dtype is None else whole.astype(dtype)

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)


def image_chunks(x: ImageFile | np.ndarray, multiple: int) -> Iterator[np.ndarray]:
    """The images of `x` in order, about CHUNK_BYTES at a time, each chunk a whole number of
    `multiple` rows (an inference batch: the model then sees the same batches as on all of x)."""
    row_bytes = int(np.prod(x.shape[1:])) * 4
    rows = max(multiple, CHUNK_BYTES // row_bytes // multiple * multiple)
    for start in range(0, len(x), rows):
        yield np.asarray(x[start : start + rows])


def load_split(prepared_dir: Path, split: str) -> tuple[ImageFile, np.ndarray]:
    """One prepared split: its images on disk (ImageFile, read as indexed) and its labels (uint8,
    one byte per image, in memory)."""
    shape = read_dataset(prepared_dir).image_shape
    x_path, y_path = split_paths(prepared_dir, split)
    if not x_path.exists():
        raise WardrobeError(
            f"{x_path.parent}: cannot load split {split!r}: {x_path.name} not found; run `dvc repro prepare`"
        )
    try:
        x = ImageFile(x_path)
        y = np.load(y_path, allow_pickle=False)
    except (WardrobeError, OSError, ValueError) as exc:
        raise WardrobeError(f"{x_path.parent}: cannot load split {split!r}: {exc}") from exc
    if x.shape[1:] != shape or y.shape != (len(x),):
        raise WardrobeError(
            f"{x_path}: expected N×{shape_text(shape)} float32 with {len(x)} labels, got {x.shape} and labels {y.shape}"
        )
    return x, y


def read_json(path: Path) -> Any:
    """A pipeline output as JSON; missing or unreadable is a one-line error naming the file."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise WardrobeError(f"{path}: not found; run `dvc repro` to produce it") from None
    except (OSError, ValueError) as exc:
        raise WardrobeError(f"{path}: cannot read JSON: {complete_text(exc)}") from exc


def read_csv(path: Path) -> Any:
    """A pipeline output as a pandas DataFrame (pandas imported here: predict's install has none)."""
    import pandas as pd

    try:
        return pd.read_csv(path)
    except FileNotFoundError:
        raise WardrobeError(f"{path}: not found; run `dvc repro` to produce it") from None
    except (OSError, ValueError) as exc:  # pandas' ParserError and EmptyDataError are ValueErrors
        raise WardrobeError(f"{path}: cannot read CSV: {complete_text(exc)}") from exc


@contextlib.contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temp path beside `target`; on success fsync and rename it over `target`.

    A failure leaves `target` (and any earlier result in it) untouched and removes the temp file.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    prefix, suffix = f".{target.name}.", ".tmp" + target.suffix
    for stale in target.parent.glob(f"{prefix}*{suffix}"):  # left by a killed run
        stale.unlink(missing_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=prefix, suffix=suffix)
    os.close(fd)
    tmp = Path(tmp_name)
    tmp.chmod(0o644)  # mkstemp makes 0600; results are meant to be read by everyone
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield an empty temp folder beside `target`; on success it replaces `target` whole (the one
    folder swap: prepare's arrays, export's SavedModel).

    The swap is two renames (the old folder aside, the new one in), then the old one is removed;
    a failure before it leaves `target` as it was.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f".{target.name}.*.tmp"):  # left by a killed run
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    tmp.chmod(0o755)
    try:
        yield tmp
        old = target.with_name(f".{target.name}.old.tmp")
        if target.exists():
            os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_text_atomic(target: Path, text: str) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(target: Path, data: Any) -> None:
    write_text_atomic(target, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def markdown_table(header: list[str], rows: list[list[object]]) -> str:
    """A GitHub-flavoured markdown table (the card's, the report's): one line per row, cells as str()."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows])


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and TensorFlow (and so Keras' initializers, dropout and augmentation)."""
    import keras

    keras.utils.set_random_seed(seed)


def enable_determinism() -> None:
    """Make TensorFlow ops deterministic: same inputs, same bits (a little slower).

    Process-wide and one-way (TensorFlow has no public switch back), so only entry points call
    it: `python -m stages.train`, and the tests and benchmarks that compare bits, by name.
    """
    import tensorflow as tf

    tf.config.experimental.enable_op_determinism()


def run_main(body: Callable[[], None], debug: bool = False) -> None:
    """The one entry-point wrapper: a WardrobeError becomes one line on stderr and exit status 1.

    WARDROBE_DEBUG=1 (any command) or `debug` (predict's --debug) shows the full traceback instead.
    """
    try:
        body()
    except WardrobeError as exc:
        if debug or os.environ.get("WARDROBE_DEBUG"):
            raise
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
