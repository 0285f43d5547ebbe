"""Publish report.md where reviewers read it: one pull-request comment, updated on every push, and
the job summary, with pictures that render in both.

    python .ci/publish_report.py report.md

GitHub renders an image in a comment only from a URL it can fetch, and neither a relative path nor
a data: URI is one. So the report's pictures are committed (Git Data API) to the branch
`report-assets`, one parentless commit per run whose tree holds only that run's pictures, and
report.md's relative image paths become URLs of that commit: immutable, so an old comment keeps
its pictures. The comment is found again by a hidden marker and edited, never duplicated.

Why not CML (`cml comment update --publish`, DVC's own way): its --publish uploads the pictures to
a third-party host (asset.cml.dev), and its npm package cannot be installed or tested where this
project is built. This script uses only the standard library and the GitHub REST API, and
tests/test_publish_report.py runs it against a local server speaking that API.

Environment (set by GitHub Actions; the workflow passes PR_NUMBER): GITHUB_TOKEN,
GITHUB_REPOSITORY, GITHUB_API_URL, GITHUB_SERVER_URL, GITHUB_RUN_ID, GITHUB_STEP_SUMMARY,
PR_NUMBER (empty on a push: then only the job summary is written). The token needs
`contents: write` (the assets branch) and `pull-requests: write` (the comment).
"""

from __future__ import annotations

import base64
import json
import os
import re
import sys
import urllib.error
import urllib.request
from pathlib import Path

MARKER = "<!-- wardrobe-report -->"
ASSETS_BRANCH = "report-assets"
MAX_COMMENT = 65_000  # GitHub refuses comment bodies over 65,536 characters
IMAGE = re.compile(r"!\[([^\]]*)\]\(([^)\s]+)\)")


class PublishError(Exception):
    pass


def local_images(markdown: str) -> list[str]:
    """Relative image paths in the markdown, in order, each once."""
    paths = [path for _, path in IMAGE.findall(markdown) if not re.match(r"^[a-z]+:", path)]
    return list(dict.fromkeys(paths))


def rewrite_images(markdown: str, urls: dict[str, str]) -> str:
    return IMAGE.sub(lambda m: f"![{m.group(1)}]({urls.get(m.group(2), m.group(2))})", markdown)


def comment_body(markdown: str) -> str:
    body = f"{MARKER}\n{markdown}"
    if len(body) > MAX_COMMENT:
        body = body[: MAX_COMMENT - 80] + "\n\n_(truncated: the whole report is in the job summary)_\n"
    return body


def find_report_comment(comments: list[dict]) -> int | None:
    """The id of the bot's earlier report comment on this pull request, if any."""
    for comment in comments:
        if MARKER in (comment.get("body") or "") and comment.get("user", {}).get("type") == "Bot":
            return comment["id"]
    return None


class GitHub:
    def __init__(self, api: str, repository: str, token: str) -> None:
        self.base, self.token = f"{api.rstrip('/')}/repos/{repository}", token

    def call(self, method: str, path: str, payload: dict | None = None) -> object:
        request = urllib.request.Request(
            self.base + path,
            method=method,
            data=None if payload is None else json.dumps(payload).encode(),
            headers={
                "Authorization": f"Bearer {self.token}",
                "Accept": "application/vnd.github+json",
                "X-GitHub-Api-Version": "2022-11-28",
                "Content-Type": "application/json",
            },
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return json.loads(response.read() or b"null")
        except urllib.error.HTTPError as error:
            raise PublishError(f"GitHub API {method} {path}: HTTP {error.code} {error.reason}") from error
        except urllib.error.URLError as error:
            raise PublishError(f"GitHub API {method} {path}: {error.reason}") from error

    def commit_images(self, files: dict[str, bytes], message: str) -> str:
        """One parentless commit holding `files`, set as the assets branch's head; its sha."""
        tree = [
            {"path": path, "mode": "100644", "type": "blob", "sha": self.blob(content)}
            for path, content in files.items()
        ]
        tree_sha = self.call("POST", "/git/trees", {"tree": tree})["sha"]
        commit_sha = self.call("POST", "/git/commits", {"message": message, "tree": tree_sha, "parents": []})["sha"]
        ref = f"refs/heads/{ASSETS_BRANCH}"
        try:
            self.call("PATCH", f"/git/{ref}", {"sha": commit_sha, "force": True})
        except PublishError:  # the branch does not exist yet
            self.call("POST", "/git/refs", {"ref": ref, "sha": commit_sha})
        return commit_sha

    def blob(self, content: bytes) -> str:
        payload = {"content": base64.b64encode(content).decode(), "encoding": "base64"}
        return self.call("POST", "/git/blobs", payload)["sha"]

    def upsert_comment(self, number: str, body: str) -> str:
        comments: list[dict] = []
        for page in range(1, 51):
            batch = self.call("GET", f"/issues/{number}/comments?per_page=100&page={page}")
            comments += batch
            if len(batch) < 100:
                break
        existing = find_report_comment(comments)
        if existing is None:
            self.call("POST", f"/issues/{number}/comments", {"body": body})
            return "created"
        self.call("PATCH", f"/issues/comments/{existing}", {"body": body})
        return "updated"


def publish(report: Path, env: dict[str, str]) -> str:
    markdown = report.read_text(encoding="utf-8")
    images = local_images(markdown)
    files: dict[str, bytes] = {}
    for image in images:
        path = report.parent / image
        if not path.is_file():
            raise PublishError(f"{report}: image {image} does not exist")
        files[f"run-{env.get('GITHUB_RUN_ID', 'local')}/{image.replace('../', '')}"] = path.read_bytes()
    repository = env["GITHUB_REPOSITORY"]
    github = GitHub(env.get("GITHUB_API_URL", "https://api.github.com"), repository, env["GITHUB_TOKEN"])
    if files:
        sha = github.commit_images(files, f"report pictures of run {env.get('GITHUB_RUN_ID', 'local')}")
        server = env.get("GITHUB_SERVER_URL", "https://github.com").rstrip("/")
        urls = {image: f"{server}/{repository}/raw/{sha}/{key}" for image, key in zip(images, files, strict=True)}
        markdown = rewrite_images(markdown, urls)
    if env.get("GITHUB_STEP_SUMMARY"):
        with open(env["GITHUB_STEP_SUMMARY"], "a", encoding="utf-8") as summary:
            summary.write(markdown)
    if not env.get("PR_NUMBER"):
        return f"job summary written ({len(files)} pictures); no pull request, no comment"
    action = github.upsert_comment(env["PR_NUMBER"], comment_body(markdown))
    return f"comment {action} on pull request #{env['PR_NUMBER']} ({len(files)} pictures)"


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: publish_report.py REPORT.md", file=sys.stderr)
        return 2
    try:
        for name in ("GITHUB_TOKEN", "GITHUB_REPOSITORY"):
            if not os.environ.get(name):
                raise PublishError(f"{name} is not set (run inside GitHub Actions, or set it)")
        print(publish(Path(argv[0]), dict(os.environ)))
    except (PublishError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
