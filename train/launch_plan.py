"""What launch.sh needs from a recipe, computed in Python (the shell never parses YAML).

    python -m train.launch_plan RECIPE [key=value ...] --field output_dir|stages
"""

from __future__ import annotations

import argparse

from recipe import load_recipe
from recipe.run_dir import resolve_output_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m train.launch_plan")
    parser.add_argument("recipe")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--field", choices=["output_dir", "stages"], required=True)
    args = parser.parse_args(argv)
    recipe = load_recipe(args.recipe, args.overrides)
    if args.field == "output_dir":
        print(resolve_output_dir(recipe, args.recipe))
    else:
        print(" ".join(recipe.stages))


if __name__ == "__main__":
    from recipe.errors import run_main

    run_main("launch.sh", main)
