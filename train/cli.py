"""The command line the training entry points share: `<stage>.py RECIPE [key=value ...]`, or `--help`."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

from recipe import load_recipe, recipe_help


def run_cli(main: Callable, doc: str, argv: list[str] | None = None):
    """Parse the recipe and its overrides and run `main(recipe, recipe_path)`; `--help` prints the entry point's
    documentation and every recipe key."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(doc)
        print(recipe_help())
        raise SystemExit(0)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return main(load_recipe(argv[0], argv[1:]), argv[0])
