"""launch.sh: help, input checks, and the exact commands it would run (--dry-run) at each scale."""

import os
import subprocess
import sys

from ..conftest import REPO


def launch(*args: str, **env: str) -> subprocess.CompletedProcess:
    inherited = ("SLURM_", "NPROC", "NNODES", "NODE_RANK", "MASTER_")
    environment = {k: v for k, v in os.environ.items() if not k.startswith(inherited)}
    environment.update(PYTHON=sys.executable, **env)
    return subprocess.run(
        [str(REPO / "launch.sh"), *args],
        cwd=REPO,
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
    )


def commands(result: subprocess.CompletedProcess) -> list[str]:
    assert result.returncode == 0, result.stderr
    return [line[2:] for line in result.stdout.splitlines() if line.startswith("+ ")]


def test_help():
    result = launch("--help")
    assert result.returncode == 0 and "Usage: ./launch.sh" in result.stdout and "MASTER_ADDR" in result.stdout


def test_one_cpu_process_runs_the_stages_in_order(tmp_path):
    run = commands(launch("--dry-run", "recipes/demo.yaml", f"output_dir={tmp_path}"))
    assert len(run) == 3
    assert run[0].endswith(f"train/sft.py recipes/demo.yaml output_dir={tmp_path} ")
    assert run[1].endswith(f"train/dpo.py recipes/demo.yaml output_dir={tmp_path} ")
    assert "-m train.export" in run[2] and str(tmp_path) in run[2]
    assert "accelerate" not in run[0]


def test_no_recipe_means_the_demo():
    result = launch("--dry-run")
    assert "running the CPU demo" in result.stdout and "recipes/demo.yaml" in commands(result)[0]


def test_two_cpu_processes_use_gloo_ddp(tmp_path):
    run = commands(launch("--dry-run", "recipes/demo.yaml", f"output_dir={tmp_path}", NPROC="2"))
    assert run[0].startswith("env ACCELERATE_USE_CPU=1 ")
    assert "--multi_gpu" in run[0] and "--num_processes 2" in run[0]


def test_slurm_variables_set_the_nodes_and_the_config_is_chosen(tmp_path):
    run = commands(
        launch(
            "--dry-run",
            "--config",
            "zero2",
            "recipes/chartqa.yaml",
            f"output_dir={tmp_path}",
            NPROC="8",
            SLURM_NNODES="2",
            SLURM_NODEID="1",
            MASTER_ADDR="10.1.2.3",
        )
    )
    first = run[0]
    assert "recipes/accelerate/zero2.yaml" in first
    for part in ("--num_machines 2", "--num_processes 16", "--machine_rank 1", "--main_process_ip 10.1.2.3"):
        assert part in first


def test_bad_input_is_refused_with_a_reason():
    missing = launch("--dry-run", "recipes/nope.yaml")
    assert missing.returncode == 2 and "not found" in missing.stderr
    unknown = launch("--frobnicate")
    assert unknown.returncode == 2 and "unknown option" in unknown.stderr
    bad_nproc = launch("--dry-run", "recipes/demo.yaml", NPROC="two")
    assert bad_nproc.returncode == 2 and "NPROC must be a whole number" in bad_nproc.stderr
    no_config = launch("--dry-run", "--config", "tpu", "recipes/demo.yaml")
    assert no_config.returncode == 2 and "no accelerate config 'tpu'" in no_config.stderr


def test_a_bad_recipe_stops_before_anything_runs():
    result = launch("--dry-run", "recipes/demo.yaml", "lora.dropuot=0.1")
    assert result.returncode != 0 and "did you mean 'lora.dropout'" in result.stderr
