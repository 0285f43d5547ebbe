"""prepare: read the dataset (params `data`, conf/data/), verify it, normalize, split, save `.npy`
and record what it made (dataset.json: class names, image shape, counts, a hash of the content).

IDX datasets: each file comes from the first source in `data.sources` whose decompressed bytes
match the pinned SHA-256, so a recompressed local copy (Debian's package) and the upstream mirrors
agree. Image folders: ROOT/CLASS/PICTURE, every picture decoded and resized to `data.image_size`.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
import zlib
from pathlib import Path

import numpy as np

from stages.common import DATASET_FILE, DatasetInfo, WardrobeError, atomic_dir, run_main, split_paths
from stages.images import IMAGE_SUFFIXES, decode_image, resize
from stages.outputs import PREPARED_DIR
from stages.params import DataParams, PrepareParams, load_section

IDX_DTYPE_UBYTE = 0x08
# Fashion-MNIST's largest file (train images) is 47 MB decompressed; a cap keeps a corrupt file
# from exhausting memory.
MAX_DECOMPRESSED_BYTES = 128 * 2**20
LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}
# A folder of this many pictures or more gets a progress line on stderr at every tenth read; a
# smaller one reads in a moment, and a bad picture's error stays the only line.
PROGRESS_FROM = 1000


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


Splits = dict[str, tuple[np.ndarray, np.ndarray]]
Labelled = tuple[np.ndarray, np.ndarray]  # uint8 images, uint8 labels


def load_idx(data: DataParams, params: PrepareParams) -> tuple[Labelled, Labelled]:
    """The train and test sets of an IDX dataset, fetched and verified."""
    assert data.files is not None and data.class_names is not None, "the schema requires them for idx"
    sets = {}
    for name, (images_name, labels_name) in data.files.items():
        images = parse_idx(fetch_verified(images_name, data, params), images_name)
        labels = parse_idx(fetch_verified(labels_name, data, params), labels_name)
        check_pair(images, labels, len(data.class_names), f"{name} set")
        sets[name] = images, labels
    return sets["train"], sets["test"]


Pictures = list[tuple[Path, int]]  # each picture file with its label


def list_pictures(root: Path, class_names: tuple[str, ...] | None = None) -> tuple[tuple[str, ...], Pictures]:
    """ROOT/CLASS/PICTURE: the classes (the sub-folders, sorted; `class_names` if given must match)
    and each picture with its label, ordered by file name, then class. Hidden entries (a leading
    dot) are skipped; any other file that is not a picture is refused, naming it."""
    if not root.is_dir():
        raise WardrobeError(f"{root}: no such folder")
    classes = tuple(sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")))
    if class_names is not None and classes != class_names:
        raise WardrobeError(f"{root}: class folders {list(classes)}, not the training folder's {list(class_names)}")
    if len(classes) < 2:
        raise WardrobeError(f"{root}: needs a sub-folder per class, at least two; found {list(classes)}")
    pictures = []
    for label, name in enumerate(classes):
        files = sorted(f for f in (root / name).iterdir() if not f.name.startswith("."))
        if not files:
            raise WardrobeError(f"{root / name}: empty class folder")
        for path in files:
            if path.is_dir() or path.suffix.lower() not in IMAGE_SUFFIXES:
                raise WardrobeError(
                    f"{path}: not a picture ({', '.join(sorted(IMAGE_SUFFIXES))}); move it out of the dataset folder"
                )
            pictures.append((path, label))
    pictures.sort(key=lambda picture: (picture[0].name, picture[1]))
    return classes, pictures


def snapshot(pictures: Pictures) -> list[tuple[str, int, int]]:
    """Name, size and modification time of every picture: equal before and after reading, or the
    folder changed while it was read."""
    return [(str(path), (st := path.stat()).st_size, st.st_mtime_ns) for path, _ in pictures]


def check_unchanged(root: Path, pictures: Pictures, before: list[tuple[str, int, int]]) -> None:
    try:
        changed = snapshot(pictures) != before
    except FileNotFoundError:
        changed = True
    if changed:
        raise WardrobeError(f"{root}: pictures changed while being read; run prepare again")


def read_pictures(root: Path, pictures: Pictures, data: DataParams) -> tuple[Labelled, str]:
    """The pictures as uint8 N×H×W (grayscale) or N×H×W×3 (RGB) at data.image_size, their labels,
    and the folder's content hash (content_sha256), with progress on stderr for a large folder."""
    assert data.image_size is not None and data.channels is not None, "the schema requires them for folder"
    size = (data.image_size[0], data.image_size[1])
    images = np.empty((len(pictures), *size, *([3] if data.channels == 3 else [])), dtype=np.uint8)
    before, shown = snapshot(pictures), -1
    for index, (path, _) in enumerate(pictures):
        images[index] = resize(decode_image(path, data.channels), size)
        if len(pictures) >= PROGRESS_FROM and (tenth := 10 * (index + 1) // len(pictures)) != shown:
            shown = tenth
            print(f"  {root}: {index + 1}/{len(pictures)} pictures", file=sys.stderr)
    content = content_sha256(root, pictures)
    check_unchanged(root, pictures, before)
    return (images, np.array([label for _, label in pictures], dtype=np.uint8)), content


def content_sha256(root: Path, pictures: Pictures) -> str:
    """SHA-256 over every picture's path below `root` and the SHA-256 of its bytes."""
    content = hashlib.sha256()
    for path, _ in pictures:
        content.update(f"{path.relative_to(root)}\0{hashlib.sha256(path.read_bytes()).hexdigest()}\n".encode())
    return content.hexdigest()


def combined(train: str, test: str) -> str:
    """The content hash of a train folder and a test folder together."""
    return hashlib.sha256(f"{train}\n{test}".encode()).hexdigest()


def folder_content(data: DataParams) -> str:
    """What content_sha256 prepare would record for the folders now, without decoding a picture:
    validate compares it with data/prepared/dataset.json, since DVC does not track the folders."""
    assert data.root is not None, "the schema requires it for folder"
    classes, pictures = list_pictures(Path(data.root))
    content = content_sha256(Path(data.root), pictures)
    if data.test_root:
        _, test_pictures = list_pictures(Path(data.test_root), classes)
        content = combined(content, content_sha256(Path(data.test_root), test_pictures))
    return content


def load_folders(data: DataParams, params: PrepareParams) -> tuple[Labelled, Labelled, tuple[str, ...], str]:
    """The train and test sets of an image-folder dataset, its class names and content hash."""
    assert data.root is not None and data.test_fraction is not None, "the schema requires them for folder"
    root = Path(data.root)
    classes, pictures = list_pictures(root)
    train, content = read_pictures(root, pictures, data)
    if data.test_root:
        test_root = Path(data.test_root)
        test, test_content = read_pictures(test_root, list_pictures(test_root, classes)[1], data)
        content = combined(content, test_content)
    else:
        train_idx, test_idx = stratified_split(train[1], data.test_fraction, params.seed)
        train, test = (train[0][train_idx], train[1][train_idx]), (train[0][test_idx], train[1][test_idx])
    return train, test, classes, content


def load_dataset(data: DataParams, params: PrepareParams) -> tuple[Splits, DatasetInfo]:
    """Fetch or read, verify, split: (images, labels) of train, val and test, and their record."""
    if data.format == "folder":
        (x_all, y_all), test, classes, content = load_folders(data, params)
    else:
        (x_all, y_all), test = load_idx(data, params)
        classes = data.class_names or ()
        content = hashlib.sha256("".join(f"{k} {v}\n" for k, v in sorted((data.sha256 or {}).items())).encode())
        content = content.hexdigest()
    if x_all.shape[1:] != test[0].shape[1:]:
        raise WardrobeError(f"test set: images are {test[0].shape[1:]}, the train set's {x_all.shape[1:]}")
    train_idx, val_idx = stratified_split(y_all, params.val_fraction, params.seed)
    raw = {"train": (x_all[train_idx], y_all[train_idx]), "val": (x_all[val_idx], y_all[val_idx]), "test": test}
    for split, (_, labels) in raw.items():
        if missing := sorted(set(range(len(classes))) - set(np.unique(labels).tolist())):
            raise WardrobeError(
                f"{split} split: no pictures of {', '.join(classes[i] for i in missing)}; "
                "each class needs enough pictures for the test and validation splits (or fewer held out)"
            )
    splits = {split: (normalize(images), labels.astype(np.uint8)) for split, (images, labels) in raw.items()}
    info = DatasetInfo(
        name=data.name,
        class_names=classes,
        image_shape=tuple(int(d) for d in x_all.shape[1:]),
        photo_fit=data.photo_fit,
        counts={split: len(labels) for split, (_, labels) in splits.items()},
        content_sha256=content,
    )
    return splits, info


def save_arrays(splits: Splits, info: DatasetInfo, out_dir: Path) -> None:
    """Write all arrays and the record into a temp folder beside `out_dir`, then swap it in: never
    half a dataset."""
    with atomic_dir(out_dir) as staging:
        (staging / DATASET_FILE).write_text(json.dumps(info.to_json(), indent=2) + "\n", encoding="utf-8")
        for split, arrays in splits.items():
            for path, array in zip(split_paths(staging, split), arrays, strict=True):
                with open(path, "wb") as handle:
                    np.save(handle, array, allow_pickle=False)
                    os.fsync(handle.fileno())


def main() -> None:
    data, params = load_section(DataParams), load_section(PrepareParams)
    splits, info = load_dataset(data, params)
    save_arrays(splits, info, PREPARED_DIR)
    sizes = ", ".join(f"{split} {count}" for split, count in info.counts.items())
    print(f"prepare: wrote {PREPARED_DIR}/ ({info.name}: {sizes}; {len(info.class_names)} classes)")


if __name__ == "__main__":
    run_main(main)
