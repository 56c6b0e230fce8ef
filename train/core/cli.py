"""The command line the training entry points share: `<stage>.py RECIPE [key=value ...] [--debug]`, or `--help`.

User errors (a bad recipe, file, row or path) print as one message with exit code 2 (runtime/user_errors.py); a stage that
fails before its first step leaves no half-made run directory (rundir/layout.py `removed_if_failed_before_training`).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

from config import load_recipe, recipe_help
from rundir import run_lock
from rundir.stage_dir import removed_if_failed_before_training
from runtime.user_errors import run_main
from train.core.loop import StopTraining

log = logging.getLogger("train.core.cli")


def run_cli(main: Callable, doc: str, argv: list[str] | None = None, *, prog: str | None = None):
    """Parse the recipe and its overrides and run `main(recipe, recipe_path)`; `--help` prints the entry point's
    documentation and every recipe key. Exits (SystemExit) with 0, or 2 on a user error."""
    prog = prog or (sys.argv[0] if argv is None else "train")

    def run(args: list[str]):
        if not args or args[0] in ("-h", "--help"):
            print(doc)
            print(recipe_help())
            return 0
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        recipe = load_recipe(args[0], args[1:])
        removed: list = []
        try:
            with removed_if_failed_before_training() as removed:
                main(recipe, args[0])
        except (
            StopTraining
        ) as stopped:  # diverged, or stopped by a signal: the message (step, how to go on) alone
            print(f"{prog}: error: {stopped}", file=sys.stderr)
            return stopped.exit_code
        finally:
            run_lock.release_all()  # a failed stage too: the next launch need not wait for this process to be gone
            for path in removed:
                log.warning("removed %s: the run failed before its first step", path)
        return 0

    run_main(prog, run, argv)
