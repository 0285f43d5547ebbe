"""Preparing a dataset (stages/prepare.py runs it): read it (params `data`, conf/data/), verify
it, normalize, split, save `.npy` and record what it made (dataset.json: class names, image shape,
counts, a hash of the content).

IDX datasets: each file comes from the first source in `data.sources` whose decompressed bytes
match the pinned SHA-256, so a recompressed local copy (Debian's package) and the upstream mirrors
agree. Image folders: ROOT/CLASS/PICTURE, every picture decoded and resized to `data.image_size`.
"""

from __future__ import annotations

import csv
import hashlib
import json
import multiprocessing
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from wardrobe.common import (
    DATASET_FILE,
    ORIGINS_COLUMNS,
    ORIGINS_FILE,
    SPLITS,
    DatasetInfo,
    WardrobeError,
    atomic_dir,
    split_paths,
)
from wardrobe.data.images import IMAGE_SUFFIXES, decode_image, resize
from wardrobe.params import DataParams, PrepareParams

IDX_DTYPE_UBYTE = 0x08
# Fashion-MNIST's largest file (train images) is 47 MB decompressed; a cap keeps a corrupt file
# from exhausting memory.
MAX_DECOMPRESSED_BYTES = 128 * 2**20
LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}
# A folder of this many pictures or more gets a progress line on stderr at every tenth read; a
# smaller one reads in a moment, and a bad picture's error stays the only line.
PROGRESS_FROM = 1000
IDX_CHUNK = 4096  # IDX images normalized and written at a time


def parse_idx(data: bytes, name: str) -> np.ndarray:
    """Parse an IDX file of unsigned bytes (magic 0x0000 08 NDIM, big-endian int32 dims)."""
    if len(data) < 4:
        raise WardrobeError(f"{name}: too short for an IDX header ({len(data)} bytes)")
    zero, dtype, ndim = int.from_bytes(data[:2], "big"), data[2], data[3]
    if zero != 0 or dtype != IDX_DTYPE_UBYTE or ndim not in (1, 3):
        raise WardrobeError(f"{name}: wrong IDX magic number 0x{data[:4].hex()} (want 0x00000801 or 0x00000803)")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise WardrobeError(f"{name}: truncated IDX header")
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected = header + int(np.prod(dims))
    if len(data) != expected:
        raise WardrobeError(f"{name}: {len(data)} bytes but dimensions {dims} need {expected} (truncated or padded)")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def check_pair(images: np.ndarray, labels: np.ndarray, num_classes: int, name: str) -> None:
    """Images must be N×H×W, labels N values in 0..num_classes-1 (class_names' indices)."""
    if images.ndim != 3:
        raise WardrobeError(f"{name}: images must be N×height×width, got {images.shape}")
    if labels.ndim != 1:
        raise WardrobeError(f"{name}: labels must be one-dimensional, got {labels.shape}")
    if len(images) != len(labels):
        raise WardrobeError(f"{name}: {len(images)} images but {len(labels)} labels")
    if labels.size and labels.max() >= num_classes:
        raise WardrobeError(
            f"{name}: label {int(labels.max())} outside 0..{num_classes - 1} (data.class_names has {num_classes})"
        )


def normalize(images: np.ndarray) -> np.ndarray:
    """uint8 0..255 -> float32 0..1, the scaling the original script used (pixels / 255.0)."""
    return images.astype(np.float32) / np.float32(255.0)


def stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split indices so each class keeps its share in validation; sorted, deterministic in `seed`."""
    rng = np.random.default_rng(seed)
    val_parts = []
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        val_parts.append(members[: round(len(members) * val_fraction)])
    val_idx = np.sort(np.concatenate(val_parts)) if val_parts else np.array([], dtype=np.int64)
    train_mask = np.ones(len(labels), dtype=bool)
    train_mask[val_idx] = False
    return np.flatnonzero(train_mask), val_idx


def decompress(raw: bytes) -> bytes:
    """Gunzip with a cap on the output, so a corrupt or hostile file cannot exhaust memory."""
    if raw[:2] != b"\x1f\x8b":
        raise WardrobeError("not a gzip file")
    inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    try:
        out = inflater.decompress(raw, MAX_DECOMPRESSED_BYTES + 1)
    except zlib.error as exc:
        raise WardrobeError(f"corrupt gzip data ({exc})") from exc
    if len(out) > MAX_DECOMPRESSED_BYTES:
        raise WardrobeError(f"decompresses to more than {MAX_DECOMPRESSED_BYTES} bytes")
    if not inflater.eof:
        raise WardrobeError("truncated gzip file")
    return out


def download(url: str, timeout_s: float, max_bytes: int) -> bytes:
    """HTTPS GET with a timeout per read, a size cap and progress on stderr."""
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme != "https" and not (parsed.scheme == "http" and parsed.hostname in LOOPBACK_HOSTS):
        raise WardrobeError("only https:// URLs are allowed (http:// only on loopback)")
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            total = int(response.headers.get("Content-Length") or 0)
            if total > max_bytes:
                raise WardrobeError(f"server announces {total} bytes, over the {max_bytes}-byte cap")
            chunks, received, shown = [], 0, -1
            while chunk := response.read(1 << 16):
                received += len(chunk)
                if received > max_bytes:
                    raise WardrobeError(f"download exceeds the {max_bytes}-byte cap")
                chunks.append(chunk)
                if total and (pct := 100 * received // total) // 10 != shown:
                    shown = pct // 10
                    print(f"  {Path(parsed.path).name}: {pct}%", file=sys.stderr)
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise WardrobeError(f"download failed: {reason}") from exc
    return b"".join(chunks)


def read_from_source(source: str, name: str, timeout_s: float, max_bytes: int) -> bytes:
    """Return the decompressed IDX bytes of `name` from a local directory or a mirror URL."""
    if "://" in source:
        return decompress(download(f"{source.rstrip('/')}/{name}.gz", timeout_s, max_bytes))
    directory = Path(source)
    if not directory.is_dir():
        raise WardrobeError("no such directory")
    for candidate, unpack in ((directory / f"{name}.gz", decompress), (directory / name, bytes)):
        if candidate.exists():
            try:
                return unpack(candidate.read_bytes())
            except OSError as exc:
                raise WardrobeError(f"{candidate}: {exc.strerror}") from exc
    raise WardrobeError(f"neither {name}.gz nor {name} is there")


def fetch_verified(name: str, data: DataParams, params: PrepareParams) -> bytes:
    """Try each source in order; the first whose bytes hash to the pinned SHA-256 wins."""
    failures = []
    max_bytes = int(params.max_download_mb * 2**20)
    for source in data.sources:
        try:
            raw = read_from_source(source, name, params.download_timeout_s, max_bytes)
        except WardrobeError as exc:
            failures.append(f"{source}: {exc}")
            continue
        digest = hashlib.sha256(raw).hexdigest()
        if digest == data.sha256[name]:
            return raw
        failures.append(f"{source}: SHA-256 mismatch (got {digest[:12]}…)")
    raise WardrobeError(f"{name}: no source worked; tried " + "; ".join(failures))


Labelled = tuple[np.ndarray, np.ndarray]  # uint8 images, uint8 labels


def load_idx(data: DataParams, params: PrepareParams) -> tuple[Labelled, Labelled]:
    """The train and test sets of an IDX dataset, fetched and verified (the files are at most
    MAX_DECOMPRESSED_BYTES each: they are held as uint8, the float32 arrays are written in chunks)."""
    assert data.files is not None and data.class_names is not None, "the schema requires them for idx"
    sets = {}
    for name, (images_name, labels_name) in data.files.items():
        images = parse_idx(fetch_verified(images_name, data, params), images_name)
        labels = parse_idx(fetch_verified(labels_name, data, params), labels_name)
        check_pair(images, labels, len(data.class_names), f"{name} set")
        sets[name] = images, labels
    return sets["train"], sets["test"]


@dataclass(frozen=True)
class Pictures:
    """A class-per-folder picture tree: each picture's file name (bytes, in its class folder) and
    label, ordered by file name, then class. One NumPy byte string and one byte per picture, so
    the listing of 100,000 pictures takes a few megabytes, not the 20 MB of Python strings."""

    root: Path
    classes: tuple[str, ...]
    files: np.ndarray  # bytes (os.fsencode of the name)
    labels: np.ndarray  # uint8

    def __len__(self) -> int:
        return len(self.files)

    def names(self, start: int = 0, stop: int | None = None) -> list[str]:
        """The pictures' paths below the root (CLASS/FILE), from start to stop."""
        return [
            f"{self.classes[label]}/{os.fsdecode(file)}"
            for file, label in zip(self.files[start:stop].tolist(), self.labels[start:stop].tolist(), strict=True)
        ]


def list_pictures(root: Path, class_names: tuple[str, ...] | None = None) -> Pictures:
    """ROOT/CLASS/PICTURE: the classes (the sub-folders, sorted; `class_names` if given must match)
    and every picture with its label. Hidden entries (a leading dot) are skipped; any other file
    that is not a picture is refused, naming it."""
    if not root.is_dir():
        raise WardrobeError(f"{root}: no such folder")
    classes = tuple(sorted(d.name for d in os.scandir(root) if d.is_dir() and not d.name.startswith(".")))
    if class_names is not None and classes != class_names:
        raise WardrobeError(f"{root}: class folders {list(classes)}, not the training folder's {list(class_names)}")
    if len(classes) < 2:
        raise WardrobeError(f"{root}: needs a sub-folder per class, at least two; found {list(classes)}")
    files, labels = [], []
    for label, name in enumerate(classes):
        names = sorted(e.name for e in os.scandir(root / name) if not e.name.startswith("."))
        if not names:
            raise WardrobeError(f"{root / name}: empty class folder")
        for file in names:
            if os.path.splitext(file)[1].lower() not in IMAGE_SUFFIXES or (root / name / file).is_dir():
                raise WardrobeError(
                    f"{root / name / file}: not a picture ({', '.join(sorted(IMAGE_SUFFIXES))}); "
                    "move it out of the dataset folder"
                )
        files.append(np.array([os.fsencode(file) for file in names]))
        labels.append(np.full(len(names), label, dtype=np.uint8))
    all_files, all_labels = np.concatenate(files), np.concatenate(labels)
    order = np.lexsort((all_labels, all_files))  # by file name (UTF-8 bytes: code point order), then class
    return Pictures(root, classes, all_files[order], all_labels[order])


def snapshot(pictures: Pictures) -> str:
    """A digest of every picture's name, size and modification time: equal before and after
    reading, or the folder changed while it was read."""
    digest = hashlib.sha256()
    for start in range(0, len(pictures), CHUNK_PICTURES):
        for name in pictures.names(start, start + CHUNK_PICTURES):
            try:
                st = os.stat(pictures.root / name)
            except FileNotFoundError:
                return "changed"
            digest.update(f"{name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def content_line(name: str, raw_sha256: str) -> bytes:
    """One picture's line in the folder's content hash: its path below the root and its bytes' SHA-256."""
    return f"{name}\0{raw_sha256}\n".encode()


def combined(train: str, test: str) -> str:
    """The content hash of a train folder and a test folder together."""
    return hashlib.sha256(f"{train}\n{test}".encode()).hexdigest()


def plan_splits(
    labels: np.ndarray, test_from: int | None, test_fraction: float, params: PrepareParams
) -> dict[str, np.ndarray]:
    """Which source images go to train, val and test: indices into `labels`, ascending, so each
    split keeps the source order. Test is every image from `test_from` on (a separate test set),
    or, when it is None, a stratified `test_fraction` of all of them; validation is a stratified
    `val_fraction` of the rest. Only labels are needed: the places are fixed before any image is
    decoded, so each can be written where it belongs as soon as it is."""
    if test_from is None:
        train_idx, test_idx = stratified_split(labels, test_fraction, params.seed)
    else:
        train_idx, test_idx = np.arange(test_from), np.arange(test_from, len(labels))
    keep, val = stratified_split(labels[train_idx], params.val_fraction, params.seed)
    return {"train": train_idx[keep], "val": train_idx[val], "test": test_idx}


def check_classes(plan: dict[str, np.ndarray], labels: np.ndarray, classes: tuple[str, ...]) -> None:
    for split, indices in plan.items():
        if missing := sorted(set(range(len(classes))) - set(np.unique(labels[indices]).tolist())):
            raise WardrobeError(
                f"{split} split: no pictures of {', '.join(classes[i] for i in missing)}; "
                "each class needs enough pictures for the test and validation splits (or fewer held out)"
            )


@dataclass(frozen=True)
class SplitFiles:
    """The split files' images: each split's `.npy` file (in SPLITS order), the byte offset of its
    first image row, and the bytes of one row."""

    files: tuple[str, ...]
    offsets: tuple[int, ...]
    row_bytes: int

    def write(self, images: np.ndarray, splits: np.ndarray, rows: np.ndarray) -> None:
        """Normalize uint8 `images` and write image k at row rows[k] of split splits[k]."""
        normalized = normalize(images)
        descriptors: dict[int, int] = {}
        try:
            for k, (split, row) in enumerate(zip(splits.tolist(), rows.tolist(), strict=True)):
                if split not in descriptors:
                    descriptors[split] = os.open(self.files[split], os.O_WRONLY)
                os.pwrite(descriptors[split], normalized[k].tobytes(), self.offsets[split] + row * self.row_bytes)
        finally:
            for descriptor in descriptors.values():
                os.close(descriptor)


def create_splits(
    staging: Path, plan: dict[str, np.ndarray], labels: np.ndarray, image_shape: tuple[int, ...]
) -> tuple[SplitFiles, np.ndarray, np.ndarray]:
    """Each split's labels file, and its images file at full size (the header np.save writes, the
    rows not yet written); and, per source image, its split number (in SPLITS) and row there."""
    split_of = np.full(len(labels), -1, dtype=np.int8)
    row_of = np.zeros(len(labels), dtype=np.int64)
    files, offsets = [], []
    for number, split in enumerate(SPLITS):
        indices = plan[split]
        split_of[indices], row_of[indices] = number, np.arange(len(indices))
        x_path, y_path = split_paths(staging, split)
        with open(y_path, "wb") as handle:
            np.save(handle, labels[indices].astype(np.uint8), allow_pickle=False)
        header = np.lib.format.open_memmap(x_path, mode="w+", dtype=np.float32, shape=(len(indices), *image_shape))
        files.append(str(x_path))
        offsets.append(int(header.offset))
        del header  # no page was touched: the file stays sparse until its rows are written
    assert (split_of >= 0).all(), "every source image has a split"
    return SplitFiles(tuple(files), tuple(offsets), int(np.prod(image_shape)) * 4), split_of, row_of


def fsync_files(split_files: SplitFiles) -> None:
    for name in split_files.files:
        with open(name, "rb+") as handle:
            os.fsync(handle.fileno())


# --- a picture folder: decoded by a pool of processes, each writing its own pictures' rows -----
# A chunk is a run of consecutive pictures of one folder. Its process decodes and normalizes them
# and writes each row at its place in the split files (pwrite: whatever order chunks finish in),
# and returns the SHA-256 of each picture's bytes, which the parent adds to the folder's content
# hash in order. So the files are the same bytes with any number of processes.
CHUNK_PICTURES = 256


@dataclass(frozen=True)
class Chunk:
    paths: list[str]
    splits: np.ndarray  # each picture's split number and row there
    rows: np.ndarray
    channels: int
    size: tuple[int, int]
    split_files: SplitFiles


def decode_chunk(chunk: Chunk) -> list[str]:
    """Decode, resize, normalize and write one chunk; return each picture's bytes' SHA-256."""
    images = np.empty((len(chunk.paths), *chunk.size, *([3] if chunk.channels == 3 else [])), dtype=np.uint8)
    digests = []
    for k, name in enumerate(chunk.paths):
        path = Path(name)
        raw = read_picture(path)
        digests.append(hashlib.sha256(raw).hexdigest())
        images[k] = resize(decode_image(path, chunk.channels, raw), chunk.size)
    chunk.split_files.write(images, chunk.splits, chunk.rows)
    return digests


def read_picture(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise WardrobeError(f"{path}: picture removed while the folder was read; run prepare again") from None
    except OSError as exc:
        raise WardrobeError(f"{path}: cannot read: {exc.strerror}") from exc


def worker_count(setting: int) -> int:
    """prepare.workers, 0 meaning one per core this process may run on."""
    return setting or len(os.sched_getaffinity(0))


def decode_folder(
    pictures: Pictures, first: int, targets: tuple[SplitFiles, np.ndarray, np.ndarray], data: DataParams, pool: Any
) -> str:
    """Decode every picture of one folder (source indices first, first+1, ...) into the split
    files, in `pool` (None: in this process); return the folder's content hash. Chunks are made
    as the pool takes them, so memory does not grow with the folder."""
    assert data.image_size is not None and data.channels is not None, "the schema requires them for folder"
    split_files, split_of, row_of = targets
    size, channels, total = (data.image_size[0], data.image_size[1]), data.channels, len(pictures)
    starts = range(0, total, CHUNK_PICTURES)
    chunks = (
        Chunk(
            [str(pictures.root / name) for name in pictures.names(start, start + CHUNK_PICTURES)],
            split_of[first + start : first + min(start + CHUNK_PICTURES, total)],
            row_of[first + start : first + min(start + CHUNK_PICTURES, total)],
            channels,
            size,
            split_files,
        )
        for start in starts
    )
    before, content, shown = snapshot(pictures), hashlib.sha256(), -1
    for start, digests in zip(
        starts, pool.imap(decode_chunk, chunks) if pool else map(decode_chunk, chunks), strict=True
    ):
        for name, digest in zip(pictures.names(start, start + CHUNK_PICTURES), digests, strict=True):
            content.update(content_line(name, digest))
        done = min(start + CHUNK_PICTURES, total)
        if total >= PROGRESS_FROM and (tenth := 10 * done // total) != shown:
            shown = tenth
            print(f"  {pictures.root}: {done}/{total} pictures", file=sys.stderr)
    if snapshot(pictures) != before:
        raise WardrobeError(f"{pictures.root}: pictures changed while being read; run prepare again")
    return content.hexdigest()


def prepare_folders(data: DataParams, params: PrepareParams, staging: Path) -> DatasetInfo:
    """An image-folder dataset, decoded straight into the split files in `staging`."""
    assert data.root is not None and data.test_fraction is not None, "the schema requires them for folder"
    assert data.image_size is not None and data.channels is not None, "the schema requires them for folder"
    sources = [list_pictures(Path(data.root))]
    if data.test_root:
        sources.append(list_pictures(Path(data.test_root), sources[0].classes))
    classes = sources[0].classes
    labels = np.concatenate([pictures.labels for pictures in sources])
    plan = plan_splits(labels, len(sources[0]) if data.test_root else None, data.test_fraction, params)
    check_classes(plan, labels, classes)
    image_shape = (*data.image_size, *([3] if data.channels == 3 else []))
    targets = create_splits(staging, plan, labels, image_shape)
    workers = worker_count(params.workers)
    # spawn, not fork: a worker starts from a clean interpreter (no copy of the parent's listing).
    pool = multiprocessing.get_context("spawn").Pool(workers) if workers > 1 else None
    try:
        hashes = [decode_folder(sources[0], 0, targets, data, pool)]
        if data.test_root:
            hashes.append(decode_folder(sources[1], len(sources[0]), targets, data, pool))
    finally:
        if pool:
            pool.terminate()
    fsync_files(targets[0])
    origins = (
        str(pictures.root / name)
        for pictures in sources
        for start in range(0, len(pictures), CHUNK_PICTURES)
        for name in pictures.names(start, start + CHUNK_PICTURES)
    )
    write_origins(staging, targets[1], targets[2], origins)
    content = combined(*hashes) if data.test_root else hashes[0]
    return dataset_info(data, classes, image_shape, plan, content)


def prepare_idx(data: DataParams, params: PrepareParams, staging: Path) -> DatasetInfo:
    """An IDX dataset: fetched, verified, and written to the split files in chunks."""
    (x_train, y_train), (x_test, y_test) = load_idx(data, params)
    if x_train.shape[1:] != x_test.shape[1:]:
        raise WardrobeError(f"test set: images are {x_test.shape[1:]}, the train set's {x_train.shape[1:]}")
    classes = data.class_names or ()
    labels = np.concatenate([y_train, y_test])
    plan = plan_splits(labels, len(y_train), 0.0, params)
    check_classes(plan, labels, classes)
    image_shape = tuple(int(d) for d in x_train.shape[1:])
    split_files, split_of, row_of = create_splits(staging, plan, labels, image_shape)
    for first, images in ((0, x_train), (len(x_train), x_test)):
        for start in range(0, len(images), IDX_CHUNK):
            chunk = images[start : start + IDX_CHUNK]
            rows = slice(first + start, first + start + len(chunk))
            split_files.write(chunk, split_of[rows], row_of[rows])
    fsync_files(split_files)
    assert data.files is not None, "the schema requires them for idx"
    images_files = (data.files["train"][0], data.files["test"][0])
    origins = (
        f"{name}#{k}" for name, images in zip(images_files, (x_train, x_test), strict=True) for k in range(len(images))
    )
    write_origins(staging, split_of, row_of, origins)
    content = hashlib.sha256("".join(f"{k} {v}\n" for k, v in sorted((data.sha256 or {}).items())).encode())
    return dataset_info(data, classes, image_shape, plan, content.hexdigest())


def write_origins(staging: Path, split_of: np.ndarray, row_of: np.ndarray, origins: Iterator[str]) -> None:
    """ORIGINS_FILE: where each prepared image came from (split, row, origin: a picture's path, or
    an IDX file and index), in source order, written as it goes; the label audit names the
    pictures whose labels it disputes from it."""
    with open(staging / ORIGINS_FILE, "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(ORIGINS_COLUMNS)
        for index, origin in enumerate(origins):
            writer.writerow((SPLITS[split_of[index]], int(row_of[index]), origin))


def dataset_info(
    data: DataParams, classes: tuple[str, ...], image_shape: tuple[int, ...], plan: dict[str, np.ndarray], content: str
) -> DatasetInfo:
    return DatasetInfo(
        name=data.name,
        class_names=classes,
        image_shape=image_shape,
        photo_fit=data.photo_fit,
        counts={split: len(plan[split]) for split in SPLITS},
        content_sha256=content,
    )


def prepare(data: DataParams, params: PrepareParams, out_dir: Path) -> DatasetInfo:
    """Read, verify, split and write the dataset into a temp folder beside `out_dir`, then swap it
    in whole: a failed or killed run never leaves half a dataset, and the previous one stays."""
    with atomic_dir(out_dir) as staging:
        info = (prepare_folders if data.format == "folder" else prepare_idx)(data, params, staging)
        (staging / DATASET_FILE).write_text(json.dumps(info.to_json(), indent=2) + "\n", encoding="utf-8")
    return info
