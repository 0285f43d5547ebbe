from __future__ import annotations

import dataclasses
import gzip
import hashlib
import http.server
import json
import threading
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import CLASS_NAMES, IDX_FILES, TEST_PER_CLASS, TRAIN_PER_CLASS, idx_bytes, run_module, write_params
from wardrobe.common import ImageFile, WardrobeError, load_split
from wardrobe.data.preparation import (
    check_pair,
    decompress,
    download,
    fetch_verified,
    load_idx,
    normalize,
    parse_idx,
    stratified_split,
)
from wardrobe.params import DataParams, PrepareParams, parse_params


def test_parse_idx_images_and_labels() -> None:
    images = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
    parsed = parse_idx(idx_bytes(images), "imgs")
    assert parsed.shape == (2, 28, 28) and parsed.dtype == np.uint8
    np.testing.assert_array_equal(parsed, images)
    labels = parse_idx(idx_bytes(np.array([3, 9], dtype=np.uint8)), "labels")
    assert labels.tolist() == [3, 9]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", r"too short for an IDX header"),
        (b"\x00\x00\x09\x03" + bytes(12), r"wrong IDX magic number 0x00000903"),
        (b"\x00\x00\x08\x02" + bytes(8), r"wrong IDX magic number 0x00000802"),
        (b"\x00\x00\x08\x03\x00\x00", r"truncated IDX header"),
        (idx_bytes(np.zeros((2, 28, 28), np.uint8))[:-5], r"1579 bytes but dimensions \(2, 28, 28\) need 1584"),
        (idx_bytes(np.zeros(4, np.uint8)) + b"\x00", r"13 bytes but dimensions \(4,\) need 12"),
    ],
)
def test_parse_idx_rejects(data: bytes, message: str) -> None:
    with pytest.raises(WardrobeError, match=rf"^f\.idx: {message}"):
        parse_idx(data, "f.idx")


@pytest.mark.parametrize(
    ("images", "labels", "message"),
    [
        (np.zeros((3, 28, 28)), np.zeros(2), r"3 images but 2 labels"),
        (np.zeros((2, 28)), np.zeros(2), r"images must be N×height×width"),
        (np.zeros((2, 28, 28)), np.array([1, 10]), r"label 10 outside 0\.\.9 \(data\.class_names has 10\)"),
    ],
)
def test_check_pair(images: np.ndarray, labels: np.ndarray, message: str) -> None:
    with pytest.raises(WardrobeError, match=message):
        check_pair(images, labels, 10, "train set")


def test_normalize() -> None:
    out = normalize(np.array([[0, 51, 255]], dtype=np.uint8))
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [[0.0, 0.2, 1.0]])


def test_stratified_split_keeps_class_shares_and_is_deterministic() -> None:
    labels = np.repeat(np.arange(10), [100, 50, 20, 10, 100, 100, 100, 100, 100, 200])
    train_idx, val_idx = stratified_split(labels, 0.1, seed=7)
    assert len(np.intersect1d(train_idx, val_idx)) == 0
    assert len(train_idx) + len(val_idx) == len(labels)
    assert np.bincount(labels[val_idx]).tolist() == [10, 5, 2, 1, 10, 10, 10, 10, 10, 20]
    again_train, again_val = stratified_split(labels, 0.1, seed=7)
    np.testing.assert_array_equal(val_idx, again_val)
    np.testing.assert_array_equal(train_idx, again_train)
    _, other_val = stratified_split(labels, 0.1, seed=8)
    assert not np.array_equal(val_idx, other_val)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"plain text", r"not a gzip file"),
        (gzip.compress(b"x" * 1000, mtime=0)[:-12], r"truncated gzip file"),
        (b"\x1f\x8b" + b"\xff" * 20, r"corrupt gzip data"),
    ],
    # Ids from the message, not the bytes: pytest-xdist workers must collect the same names.
    ids=["plain-text", "truncated", "corrupt"],
)
def test_decompress_rejects(raw: bytes, message: str) -> None:
    with pytest.raises(WardrobeError, match=message):
        decompress(raw)


@pytest.mark.parametrize("url", ["http://example.com/x.gz", "ftp://example.com/x.gz", "file:///etc/passwd"])
def test_download_https_only(url: str) -> None:
    with pytest.raises(WardrobeError, match=r"only https:// URLs are allowed"):
        download(url, timeout_s=1, max_bytes=10)


def _params(params_dict: dict, sources: list[str]) -> tuple[DataParams, PrepareParams]:
    """The data and prepare sections of the params, with other sources."""
    params = parse_params(params_dict)
    return dataclasses.replace(params.data, sources=tuple(sources)), params.prepare


def test_fetch_falls_back_to_next_matching_source(
    tmp_path: Path, params_dict: dict, idx_source: tuple[Path, dict[str, str]]
) -> None:
    good_dir, _ = idx_source
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    (wrong / "train-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(5, np.uint8)))  # uncompressed, bad hash
    params = _params(params_dict, [str(tmp_path / "missing"), str(wrong), str(good_dir)])
    data = fetch_verified("train-labels-idx1-ubyte", *params)
    assert parse_idx(data, "labels").shape == (10 * TRAIN_PER_CLASS,)


def test_fetch_failure_names_every_source(tmp_path: Path, params_dict: dict) -> None:
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    (wrong / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(np.zeros(5, np.uint8))))
    empty = tmp_path / "empty"
    empty.mkdir()
    params = _params(params_dict, [str(tmp_path / "missing"), str(wrong), str(empty), "https://127.0.0.1:9/m"])
    with pytest.raises(WardrobeError) as info:
        fetch_verified("t10k-labels-idx1-ubyte", *params)
    message = str(info.value)
    assert message.startswith("t10k-labels-idx1-ubyte: no source worked; tried ")
    assert f"{tmp_path / 'missing'}: no such directory" in message
    assert f"{wrong}: SHA-256 mismatch" in message
    assert f"{empty}: neither t10k-labels-idx1-ubyte.gz nor t10k-labels-idx1-ubyte is there" in message
    assert "https://127.0.0.1:9/m: download failed" in message
    assert "\n" not in message


@pytest.mark.pipeline
def test_prepare_main_writes_split_arrays(tmp_path: Path, params_dict: dict) -> None:
    write_params(tmp_path, params_dict)
    result = run_module("stages.prepare", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    prepared = tmp_path / "data/prepared"
    assert sorted(p.name for p in prepared.iterdir()) == sorted(
        ["dataset.json", "origins.csv", *(f"{a}_{s}.npy" for a in "xy" for s in ("train", "val", "test"))]
    )
    assert json.loads((prepared / "dataset.json").read_text()) == {
        "name": "Fashion-MNIST",
        "class_names": list(CLASS_NAMES),
        "image_shape": [28, 28],
        "photo_fit": "object",
        "counts": {"train": 90, "val": 30, "test": 10 * TEST_PER_CLASS},
        # what was read: for IDX files, their pinned hashes
        "content_sha256": hashlib.sha256(
            "".join(f"{name} {digest}\n" for name, digest in sorted(params_dict["data"]["sha256"].items())).encode()
        ).hexdigest(),
    }
    x_train, y_train = load_split(prepared, "train")
    x_val, y_val = load_split(prepared, "val")
    x_test, _ = load_split(prepared, "test")
    x_train = np.asarray(x_train)  # read whole (the stages read it in batches)
    assert x_train.shape == (90, 28, 28) and x_val.shape == (30, 28, 28)
    assert x_test.shape == (10 * TEST_PER_CLASS, 28, 28)
    assert y_train.dtype == np.uint8 and x_test.dtype == np.float32
    assert x_train.min() >= 0.0 and x_train.max() <= 1.0
    assert np.bincount(y_val).tolist() == [3] * 10


@pytest.mark.pipeline
def test_prepare_failure_keeps_previous_output(tmp_path: Path, params_dict: dict) -> None:
    write_params(tmp_path, params_dict)
    assert run_module("stages.prepare", cwd=tmp_path).returncode == 0
    before = (tmp_path / "data/prepared/x_train.npy").read_bytes()
    params_dict["data"]["sha256"]["t10k-images-idx3-ubyte"] = "0" * 64
    write_params(tmp_path, params_dict)
    result = run_module("stages.prepare", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.startswith("error: t10k-images-idx3-ubyte: no source worked; tried ")
    assert "SHA-256 mismatch" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert (tmp_path / "data/prepared/x_train.npy").read_bytes() == before
    assert [p.name for p in (tmp_path / "data").iterdir()] == ["prepared"]  # no temp dirs left


def test_a_prepared_split_is_read_as_indexed_without_holding_it(tmp_path: Path) -> None:
    """ImageFile reads exactly the rows asked for (a slice, any order of indices, one image),
    the same values as the array np.save wrote; a truncated file is refused naming it."""
    array = np.random.default_rng(0).random((50, 6, 5, 3), dtype=np.float32)
    np.save(tmp_path / "x.npy", array)
    images = ImageFile(tmp_path / "x.npy")
    assert len(images) == 50 and images.shape == (50, 6, 5, 3)
    np.testing.assert_array_equal(images[10:23], array[10:23])
    order = np.array([7, 8, 9, 3, 49, 0, 1, 2, 2])  # runs, a repeat, backwards
    np.testing.assert_array_equal(images[order], array[order])
    np.testing.assert_array_equal(images[-1], array[-1])
    np.testing.assert_array_equal(np.asarray(images), array)
    assert images[5:5].shape == (0, 6, 5, 3)
    with pytest.raises(IndexError):
        images[np.array([50])]
    (tmp_path / "cut.npy").write_bytes((tmp_path / "x.npy").read_bytes()[:-4])
    with pytest.raises(WardrobeError, match=r"cut\.npy: .* bytes, but \(50, 6, 5, 3\) float32 needs"):
        ImageFile(tmp_path / "cut.npy")


def test_streamed_batches_are_the_in_memory_batches(tmp_path: Path) -> None:
    """train's input read from the file on disk gives the same batches, in the same order, as
    from the array in memory, with shuffling and augmentation, epoch after epoch."""
    from wardrobe.training import make_dataset

    x = np.random.default_rng(1).random((70, 8, 8), dtype=np.float32)
    y = np.arange(70, dtype=np.uint8) % 10
    np.save(tmp_path / "x.npy", x)

    def epochs(images: object) -> list[np.ndarray]:
        dataset = make_dataset(images, y, 16, shuffle_seed=3, one_hot=10, flip=True, shift=1)
        return [array for _ in range(2) for batch in dataset.as_numpy_iterator() for array in batch]

    in_memory, streamed = epochs(x), epochs(ImageFile(tmp_path / "x.npy"))
    assert len(in_memory) == len(streamed) == 2 * 2 * 5  # 2 epochs × 5 batches × (images, labels)
    for want, got in zip(in_memory, streamed, strict=True):
        assert want.tobytes() == got.tobytes()
    assert in_memory[0].tobytes() != in_memory[10].tobytes()  # the second epoch is shuffled anew


def test_download_from_a_mirror_gives_the_same_arrays_as_a_local_directory(
    params_dict: dict, idx_source: tuple[Path, dict[str, str]]
) -> None:
    """The path every user without the Debian package takes (and the GitHub workflow): the four
    files come over HTTP from a mirror (here on 127.0.0.1, the only place plain HTTP is allowed)."""
    directory, _ = idx_source
    requested: list[str] = []

    class Mirror(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, directory=str(directory), **kwargs)

        def log_message(self, format: str, *args: object) -> None:
            requested.append(self.path)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Mirror)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/"
        downloaded = load_idx(*_params(params_dict, [url]))
    finally:
        server.shutdown()
        server.server_close()
    local = load_idx(*_params(params_dict, [str(directory)]))
    assert sorted(requested) == sorted(f"/{name}.gz" for name in IDX_FILES)
    for got_set, want_set in zip(downloaded, local, strict=True):
        for got, want in zip(got_set, want_set, strict=True):
            np.testing.assert_array_equal(got, want)
