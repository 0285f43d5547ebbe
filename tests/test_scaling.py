"""Sharing data and models through DVC remotes, for real on loopback: a directory and an
S3-compatible server. (Training on several devices or hosts: tests/test_distribute.py.)"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import free_port, make_project, repro, sh, tiny_params

pytestmark = pytest.mark.pipeline  # every test here runs dvc, git or the stages in subprocesses


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    """moto's S3-compatible server on 127.0.0.1, with the bucket `wardrobe`; fake credentials."""
    port = free_port()
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(url, timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise
                time.sleep(0.2)
        request = urllib.request.Request(f"{url}/wardrobe", method="PUT")  # create the bucket
        urllib.request.urlopen(request, timeout=5).close()
        yield url
    finally:
        server.terminate()
        server.wait(10)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def tracked_files(repo: Path) -> dict[str, bytes]:
    """Bytes of everything DVC produced: data/ (prepared arrays, model) and the plots."""
    return {
        str(p.relative_to(repo)): p.read_bytes()
        for folder in ("data", "plots", "metrics")
        for p in sorted((repo / folder).rglob("*"))
        if p.is_file() and p.name != ".gitignore"
    }


@pytest.mark.parametrize("kind", ["directory", "s3"])
def test_push_then_pull_in_a_fresh_clone(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path, idx_source: tuple[Path, dict[str, str]]
) -> None:
    repo = make_project(tmp_path / "origin", tiny_params(*idx_source))
    if kind == "s3":
        endpoint = request.getfixturevalue("s3_endpoint")
        sh(repo, "dvc", "remote", "add", "-d", "storage", "s3://wardrobe/cache")
        sh(repo, "dvc", "remote", "modify", "storage", "endpointurl", endpoint)
    else:
        sh(repo, "dvc", "remote", "add", "-d", "storage", str(tmp_path / "shared-remote"))
    assert repro(repo) == ["prepare", "train", "evaluate", "export", "card"]
    pushed = sh(repo, "dvc", "push").stdout
    assert "pushed" in pushed
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "results and remote")

    clone = tmp_path / "clone"
    sh(tmp_path, "git", "clone", "-q", str(repo), str(clone))
    assert not (clone / "data/model/model.keras").exists()
    sh(clone, "dvc", "pull")
    assert tracked_files(clone) == tracked_files(repo)  # byte-identical data, model and results
    assert repro(clone) == []
    assert "Data and pipelines are up to date" in sh(clone, "dvc", "status").stdout
