"""`wardrobe`, the one command: `wardrobe VERB [ARGS]`, each verb with its own `--help`.

The DVC stages are not verbs: `dvc repro` runs them (stages/). The verbs are what a user runs
around the pipeline. Each verb's module is imported only when called, so `wardrobe predict` on
the TensorFlow-free install (`make venv-serve`) imports neither TensorFlow nor pandas.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import NoReturn

# verb: (module with main(argv), what it does)
VERBS: dict[str, tuple[str, str]] = {
    "predict": ("wardrobe.cli.predict", "classify pictures with the trained (or exported) model"),
    "serve": ("wardrobe.cli.serve", "serve the exported model over HTTP: /predict, a page, health, metrics"),
    "validate": ("wardrobe.cli.validate", "check the pipeline's outputs against the contract and the quality gates"),
    "report": ("wardrobe.cli.report", "write a markdown report of this workspace against a revision"),
    "audit": ("wardrobe.cli.audit", "rank the images whose label the trained model disputes"),
    "params": ("wardrobe.cli.params", "compose params.yaml from conf/ (Hydra), as dvc exp run does"),
}


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line like every other error (with where to read the
    usage), exit status 2 as argparse's convention has it (1 is for bad inputs)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (usage: {self.prog} --help)\n")


def usage() -> str:
    width = max(len(verb) for verb in VERBS)
    lines = [f"  {verb:<{width}}  {summary}" for verb, (_, summary) in VERBS.items()]
    return "usage: wardrobe VERB [ARGS...]   (wardrobe VERB --help for a verb's options)\n\nverbs:\n" + "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] in ("-h", "--help"):
        print(usage())
        return
    if not args or args[0] not in VERBS:  # a usage error: one line, argparse's status 2
        found = f"unknown verb {args[0]!r}" if args else "no verb"
        print(f"error: {found}; one of {', '.join(VERBS)} (usage: wardrobe --help)", file=sys.stderr)
        sys.exit(2)
    verb, rest = args[0], args[1:]
    importlib.import_module(VERBS[verb][0]).main(rest)
