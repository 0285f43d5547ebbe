"""The one command: `wardrobe --help` lists every verb, each verb has its own --help, and a usage
error is one line with exit status 2."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import run_module
from wardrobe.cli import VERBS

pytestmark = pytest.mark.pipeline  # subprocesses (a verb's --help may import TensorFlow)


def test_help_lists_every_verb_and_each_verb_has_its_own(tmp_path: Path) -> None:
    listed = run_module("wardrobe", "--help", cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert [line.split()[0] for line in listed.stdout.split("verbs:\n")[1].splitlines()] == list(VERBS)
    for verb in VERBS:
        own = run_module("wardrobe", verb, "--help", cwd=tmp_path)
        assert own.returncode == 0 and own.stdout.startswith(f"usage: wardrobe {verb}"), (verb, own.stderr)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((), "error: no verb; one of predict, serve, validate, report, audit, params (usage: wardrobe --help)"),
        (("bogus",), "error: unknown verb 'bogus'; one of predict, serve, validate, report, audit, params"),
        (("serve", "--port", "0"), "error: --port must be >= 1 (usage: wardrobe serve --help)"),
        (("predict",), "error: the following arguments are required: PATH (usage: wardrobe predict --help)"),
    ],
)
def test_a_usage_error_is_one_line_with_status_2(tmp_path: Path, args: tuple[str, ...], message: str) -> None:
    result = run_module("wardrobe", *args, cwd=tmp_path)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith(message), result.stderr
