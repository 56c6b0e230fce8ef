"""python -m train.export RUN_DIR: merge a run's trained stages into hub-layout checkpoints (train/export/merge.py)."""

from runtime.user_errors import run_main
from train.export.merge import main

run_main("python -m train.export", main)
