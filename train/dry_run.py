"""python -m train.dry_run RECIPE: the dry run's command (the dry run is train/tools/dry_run.py)."""

if __name__ == "__main__":
    from runtime.user_errors import run_main
    from train.tools.dry_run import cli

    run_main("python -m train.dry_run", cli)
