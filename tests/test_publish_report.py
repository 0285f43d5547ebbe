""".ci/publish_report.py against a local server that speaks the part of GitHub's REST API it uses.

GitHub itself cannot be reached from where this project is built; the server keeps what a real
repository would (blobs, trees, commits, refs, comments), so the test checks what GitHub would end
up holding: the pictures' bytes, one comment edited in place, image URLs of the assets commit.
"""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import REPO

SCRIPT = REPO / ".ci" / "publish_report.py"
REPOSITORY = "octo/wardrobe"


class FakeGitHub:
    def __init__(self) -> None:
        self.blobs: dict[str, bytes] = {}
        self.trees: dict[str, list[dict]] = {}
        self.commits: dict[str, dict] = {}
        self.refs: dict[str, str] = {}
        self.comments: list[dict] = [{"id": 1, "body": "LGTM", "user": {"type": "User"}}]
        self.tokens: set[str] = set()

    def handle(self, method: str, path: str, payload: dict | None) -> tuple[int, object]:
        prefix = f"/repos/{REPOSITORY}"
        assert path.startswith(prefix), path
        path = path[len(prefix) :]

        def new_sha(data: object) -> str:
            return hashlib.sha1(json.dumps(data, sort_keys=True).encode()).hexdigest()

        if method == "POST" and path == "/git/blobs":
            content = base64.b64decode(payload["content"])
            sha = hashlib.sha1(content).hexdigest()
            self.blobs[sha] = content
            return 201, {"sha": sha}
        if method == "POST" and path == "/git/trees":
            assert all(entry["sha"] in self.blobs for entry in payload["tree"])
            sha = new_sha(payload)
            self.trees[sha] = payload["tree"]
            return 201, {"sha": sha}
        if method == "POST" and path == "/git/commits":
            assert payload["tree"] in self.trees
            sha = new_sha(payload)
            self.commits[sha] = payload
            return 201, {"sha": sha}
        if method == "PATCH" and path.startswith("/git/refs/heads/"):
            name = path.removeprefix("/git/")
            if name not in self.refs:
                return 422, {"message": "Reference does not exist"}
            self.refs[name] = payload["sha"]
            return 200, {"ref": name}
        if method == "POST" and path == "/git/refs":
            self.refs[payload["ref"]] = payload["sha"]
            return 201, {"ref": payload["ref"]}
        if method == "GET" and path.startswith("/issues/7/comments"):
            return 200, self.comments if "page=1" in path else []
        if method == "POST" and path == "/issues/7/comments":
            self.comments.append({"id": 100 + len(self.comments), "body": payload["body"], "user": {"type": "Bot"}})
            return 201, self.comments[-1]
        if method == "PATCH" and path.startswith("/issues/comments/"):
            comment = next(c for c in self.comments if c["id"] == int(path.rsplit("/", 1)[1]))
            comment["body"] = payload["body"]
            return 200, comment
        return 404, {"message": "Not Found"}


@pytest.fixture
def github() -> Iterator[tuple[FakeGitHub, str]]:
    state = FakeGitHub()

    class Handler(BaseHTTPRequestHandler):
        def respond(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            payload = json.loads(self.rfile.read(length)) if length else None
            state.tokens.add(self.headers["Authorization"])
            status, body = state.handle(self.command, self.path, payload)
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PATCH = respond

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield state, f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


def write_report(folder: Path, headline: str) -> Path:
    (folder / "report_images").mkdir(parents=True, exist_ok=True)
    (folder / "plots").mkdir(exist_ok=True)
    Image.new("RGB", (4, 3), "red").save(folder / "report_images" / "accuracy.png")
    Image.new("L", (2, 2), 9).save(folder / "plots" / "confusion_matrix.png")
    report = folder / "report.md"
    report.write_text(
        f"# wardrobe report\n\n{headline}\n\n![accuracy](report_images/accuracy.png)\n"
        "![confusion_matrix](plots/confusion_matrix.png)\n![badge](https://example.com/b.svg)\n"
    )
    return report


def publish(report: Path, api: str, summary: Path, pr: str, run_id: str) -> subprocess.CompletedProcess:
    env = {
        "GITHUB_TOKEN": "t0ken",
        "GITHUB_REPOSITORY": REPOSITORY,
        "GITHUB_API_URL": api,
        "GITHUB_SERVER_URL": "https://github.example",
        "GITHUB_RUN_ID": run_id,
        "GITHUB_STEP_SUMMARY": str(summary),
        "PR_NUMBER": pr,
        "PATH": "/usr/bin:/bin",
    }
    return subprocess.run([sys.executable, str(SCRIPT), str(report)], env=env, capture_output=True, text=True)


def test_the_report_becomes_one_comment_updated_in_place_with_pictures_that_resolve(
    github: tuple[FakeGitHub, str], tmp_path: Path
) -> None:
    state, api = github
    summary = tmp_path / "summary.md"
    report = write_report(tmp_path, "**Test accuracy 0.9398 → 0.9410**")
    first = publish(report, api, summary, "7", "11")
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip() == "comment created on pull request #7 (2 pictures)"

    sha = state.refs["refs/heads/report-assets"]
    tree = {entry["path"]: state.blobs[entry["sha"]] for entry in state.trees[state.commits[sha]["tree"]]}
    assert tree == {
        "run-11/report_images/accuracy.png": (tmp_path / "report_images" / "accuracy.png").read_bytes(),
        "run-11/plots/confusion_matrix.png": (tmp_path / "plots" / "confusion_matrix.png").read_bytes(),
    }
    body = state.comments[-1]["body"]
    assert body.startswith("<!-- wardrobe-report -->\n# wardrobe report")
    url = f"https://github.example/{REPOSITORY}/raw/{sha}/run-11"
    assert f"![accuracy]({url}/report_images/accuracy.png)" in body
    assert f"![confusion_matrix]({url}/plots/confusion_matrix.png)" in body
    assert "![badge](https://example.com/b.svg)" in body  # absolute URLs are left alone
    assert summary.read_text() == body.removeprefix("<!-- wardrobe-report -->\n")
    assert state.tokens == {"Bearer t0ken"}

    report = write_report(tmp_path, "**Test accuracy 0.9398 → 0.9420**")
    second = publish(report, api, summary, "7", "12")
    assert second.returncode == 0, second.stderr
    assert second.stdout.strip() == "comment updated on pull request #7 (2 pictures)"
    assert [c["id"] for c in state.comments] == [1, 101]  # the user's comment, and one report
    assert "0.9420" in state.comments[1]["body"] and "/run-12/" in state.comments[1]["body"]
    assert state.commits[state.refs["refs/heads/report-assets"]]["parents"] == []


def test_a_push_writes_the_summary_only_and_a_missing_picture_is_one_line(
    github: tuple[FakeGitHub, str], tmp_path: Path
) -> None:
    state, api = github
    report = write_report(tmp_path, "headline")
    result = publish(report, api, tmp_path / "summary.md", "", "5")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "job summary written (2 pictures); no pull request, no comment"
    assert [c["id"] for c in state.comments] == [1]

    (tmp_path / "plots" / "confusion_matrix.png").unlink()
    failed = publish(report, api, tmp_path / "summary2.md", "7", "6")
    assert failed.returncode == 1
    assert failed.stderr == f"error: {report}: image plots/confusion_matrix.png does not exist\n"
    assert not (tmp_path / "summary2.md").exists()


def test_an_api_error_is_one_line_naming_the_call(tmp_path: Path) -> None:
    report = write_report(tmp_path, "headline")
    result = publish(report, "http://127.0.0.1:9", tmp_path / "summary.md", "7", "1")  # nothing listens
    assert result.returncode == 1
    assert result.stderr.startswith("error: GitHub API POST /git/blobs: ")
    assert result.stderr.count("\n") == 1
