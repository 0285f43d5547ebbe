"""wardrobe/common.py and wardrobe/plumbing.py: the helpers every stage, and every command-line tool, uses."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from wardrobe.common import WardrobeError, atomic_dir, atomic_path, complete_text, read_csv, read_json
from wardrobe.plumbing import find_tool


def test_atomic_path_keeps_the_old_file_when_writing_fails(tmp_path: Path) -> None:
    target = tmp_path / "out" / "result.txt"
    with atomic_path(target) as tmp:
        tmp.write_text("first")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")
    assert target.read_text() == "first"
    assert sorted(p.name for p in target.parent.iterdir()) == ["result.txt"]  # no temp file left


def test_atomic_dir_swaps_whole_folders_and_clears_a_killed_runs_leftovers(tmp_path: Path) -> None:
    target = tmp_path / "out"
    with atomic_dir(target) as tmp:
        (tmp / "a").write_text("first")
    (tmp_path / ".out.abc123.tmp").mkdir()  # what a killed run leaves
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "a").write_text("half")
        raise RuntimeError("killed mid-write")
    assert (target / "a").read_text() == "first" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with atomic_dir(target) as tmp:
        (tmp / "b").write_text("second")
    assert sorted(p.name for p in target.iterdir()) == ["b"] and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_reading_an_output_fails_in_one_line_naming_the_file(tmp_path: Path) -> None:
    with pytest.raises(WardrobeError, match=r"^\S+missing.json: not found; run `dvc repro` to produce it$"):
        read_json(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(WardrobeError, match=r"bad.json: cannot read JSON: Expecting property name"):
        read_json(tmp_path / "bad.json")
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(WardrobeError, match=r"empty.csv: cannot read CSV: No columns to parse from file$"):
        read_csv(tmp_path / "empty.csv")


def test_find_tool_prefers_the_one_beside_this_python(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    assert find_tool("dvc") == str(Path(sys.executable).parent / "dvc")  # the venv's, not on PATH
    assert find_tool("git") == "/usr/bin/git"  # not beside this python: from PATH
    with pytest.raises(WardrobeError, match=r"^no-such-tool: command not found next to .* or on PATH; install"):
        find_tool("no-such-tool")


def test_complete_text_never_cuts_a_sentence() -> None:
    """Issue #27: a Keras message cut at 200 characters ended mid-sentence ("... is not supported by")."""
    keras_message = (
        "File format not supported: filepath=notes.txt. Keras 3 only supports V3 `.keras` files and legacy H5\n"
        "format files (`.h5` extension). Note that the legacy SavedModel format is not supported by `load_model()` "
        "in Keras 3. In order to reload a TensorFlow SavedModel as an inference-only layer in Keras 3, use "
        "`keras.layers.TFSMLayer(notes.txt, call_endpoint='serving_default')` (note that your `call_endpoint` "
        "might have a different name)."
    )
    text = complete_text(keras_message)
    assert text == (
        "File format not supported: filepath=notes.txt. Keras 3 only supports V3 `.keras` files and legacy H5 "
        "format files (`.h5` extension). Note that the legacy SavedModel format is not supported by `load_model()` "
        "in Keras 3. …"
    )
    assert complete_text("short\n  message") == "short message"
    assert complete_text("x" * 500) == "x" * 500  # one sentence longer than the limit: kept whole
