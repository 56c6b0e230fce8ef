"""The command line the training entry points share: `<stage>.py RECIPE [key=value ...]`, or `--help`."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

from recipe import load_recipe, recipe_help
from train.loop import StopTraining


def run_cli(main: Callable, doc: str, argv: list[str] | None = None):
    """Parse the recipe and its overrides and run `main(recipe, recipe_path)`; `--help` prints the entry point's
    documentation and every recipe key."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(doc)
        print(recipe_help())
        raise SystemExit(0)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return main(load_recipe(argv[0], argv[1:]), argv[0])
    except StopTraining as stopped:  # diverged, or stopped by a signal: the message (step, how to go on) alone
        print(f"error: {stopped}", file=sys.stderr)
        raise SystemExit(stopped.exit_code) from None
