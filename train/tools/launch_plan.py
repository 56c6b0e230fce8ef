"""What launch.sh needs from a recipe, computed in Python (the shell never parses YAML).

    python -m train.tools.launch_plan RECIPE [key=value ...] --field output_dir|stages [--job-id ID] [--nodes N]
                                [--processes P]

Every node of a multi-node job must write into the same run directory, so its name cannot come from each node's
clock: with `--job-id` (launch.sh passes $SLURM_JOB_ID) a recipe without `output_dir` runs in
runs/<recipe>-job<ID>/, and with `--nodes` > 1 and neither, the plan is refused with the fix. With `--processes`
(the job's processes, all nodes), a `train.sequence_parallel` group that does not divide them is refused before
anything starts.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from config import load_recipe
from rundir.layout import resolve_output_dir
from train.core.sequence_groups import check_layout


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m train.tools.launch_plan")
    parser.add_argument("recipe")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--field", choices=["output_dir", "stages"], required=True)
    parser.add_argument("--job-id", default="", help="the scheduler's job id (names the run directory)")
    parser.add_argument("--nodes", type=int, default=1, help="nodes of the job")
    parser.add_argument("--processes", type=int, default=None, help="processes of the job (all nodes)")
    args = parser.parse_args(argv)
    recipe = load_recipe(args.recipe, args.overrides)
    if args.processes is not None:
        check_layout(args.processes, recipe.train.sequence_parallel)
    if args.field == "output_dir":
        if recipe.output_dir is None and args.job_id:
            print(Path("runs") / f"{Path(args.recipe).stem}-job{args.job_id}")
        elif recipe.output_dir is None and args.nodes > 1:
            parser.exit(
                2,
                f"launch_plan: {args.nodes} nodes need one run directory that every node names alike: "
                "pass output_dir=PATH (on a filesystem every node sees), or run under SLURM\n",
            )
        else:
            print(resolve_output_dir(recipe, args.recipe))
    else:
        print(" ".join(recipe.stages))


if __name__ == "__main__":
    from runtime.user_errors import run_main

    run_main("launch.sh", main)
