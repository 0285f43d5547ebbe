"""`wardrobe params [OVERRIDE...]` (`make params`): write params.yaml from conf/, as `dvc exp run`
would, without running anything; refuse a composition that does not validate."""

from __future__ import annotations

import yaml

from wardrobe.cli import OneLineParser
from wardrobe.common import WardrobeError, run_main, write_text_atomic
from wardrobe.params import CONF_DIR, PARAMS_FILE, compose, parse_params


def run(overrides: list[str]) -> None:
    text = compose(CONF_DIR, overrides)
    try:
        parse_params(yaml.safe_load(text))
    except WardrobeError as exc:
        raise WardrobeError(f"{CONF_DIR}: composed params: {exc}") from exc
    write_text_atomic(PARAMS_FILE, text)
    print(f"params: wrote {PARAMS_FILE} from {CONF_DIR}/")


def main(argv: list[str] | None = None) -> None:
    parser = OneLineParser(
        prog="wardrobe params", description="Compose params.yaml from conf/ (Hydra), as dvc exp run does."
    )
    parser.add_argument("overrides", nargs="*", metavar="OVERRIDE", help="e.g. train=long train.epochs=10")
    args = parser.parse_args(argv)
    run_main(lambda: run(args.overrides))
