"""Intra-op threads: `train.num_threads`, then $OMP_NUM_THREADS, then cores // local processes on CPU; launch.sh's
per-process default (train/core/device.py set_threads, launch.sh)."""

import os

import pytest
import torch

from config import load_recipe
from tests.whole_run.test_launch import REPO, launch
from train.core.device import set_threads


@pytest.fixture()
def restore_threads(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))  # undone after the test
    yield monkeypatch
    torch.set_num_threads(before)


def demo(*overrides: str):
    return load_recipe(REPO / "recipes" / "demo.yaml", list(overrides))


def test_recipe_value_wins_over_the_environment(restore_threads):
    restore_threads.setenv("OMP_NUM_THREADS", "2")
    assert set_threads(demo("train.num_threads=1")) == 1
    assert os.environ["OMP_NUM_THREADS"] == "1"  # what DataLoader workers and child processes inherit


def test_environment_is_respected_when_the_recipe_says_null(restore_threads):
    restore_threads.setenv("OMP_NUM_THREADS", "1")
    assert set_threads(demo("train.num_threads=null")) == 1


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="the CPU default; with a GPU torch's own default stands"
)
def test_cpu_default_is_cores_per_local_process(restore_threads):
    restore_threads.delenv("OMP_NUM_THREADS")
    restore_threads.setenv("LOCAL_WORLD_SIZE", "2")
    cores = len(os.sched_getaffinity(0))
    assert set_threads(demo("train.num_threads=null")) == max(1, cores // 2)
    assert os.environ["OMP_NUM_THREADS"] == str(max(1, cores // 2))


def test_the_demo_runs_one_thread_per_process():
    assert demo().train.num_threads == 1
    with pytest.raises(ValueError):
        demo("train.num_threads=0")


@pytest.mark.slow  # several launch.sh dry runs, each starting Python twice: 15-20 s
def test_launch_sets_one_share_of_the_cores_per_process_unless_set(tmp_path):
    env = {k: v for k, v in os.environ.items() if k == "OMP_NUM_THREADS"}
    os.environ.pop("OMP_NUM_THREADS", None)
    try:
        cores = len(os.sched_getaffinity(0))
        shown = launch("--dry-run", "recipes/demo.yaml", f"output_dir={tmp_path}", NPROC="2").stdout
        assert f"OMP_NUM_THREADS={max(1, cores // 2)}" in shown
        shown = launch("--dry-run", "recipes/demo.yaml", f"output_dir={tmp_path}", OMP_NUM_THREADS="3").stdout
        assert "OMP_NUM_THREADS=3" in shown
    finally:
        os.environ.update(env)
