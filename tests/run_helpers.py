"""Small runs of the real entry points on the demo recipe, for the training tests."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from config import load_recipe
from train import dpo, sft

from .conftest import REPO

DEMO = REPO / "recipes" / "demo.yaml"


def small_overrides(run_dir: Path, synthetic: Path, stage: str, **train) -> list[str]:
    """The demo recipe cut down to a few fp32 steps on 64 rows, every step logged and no eval or export."""
    settings = {
        "max_steps": 3,
        "micro_batch_size": 4,
        "grad_accum": 2,
        "log_every": 1,
        "checkpoint_every": 100,
        **train,
    }
    # dpo.sft_weight=0: DPO's sigmoid loss alone (the demo adds RPO's NLL term), so a fresh adapter starts at log 2.
    overrides = [
        f"output_dir={run_dir}",
        f"data.train.0.path={synthetic}",
        f"data.eval.0.path={synthetic}",
        "data.train.0.limit=64",
        f"stages=[{stage}]",
        "dpo.max_steps=null",
        "dpo.sft_weight=0.0",
    ]
    return overrides + [f"train.{key}={value}" for key, value in settings.items()]


def run_stage(stage: str, overrides: list[str], **kwargs) -> Path:
    module = sft if stage == "sft" else dpo
    return module.main(load_recipe(DEMO, overrides), DEMO, **kwargs)


FSDP2_CONFIG = REPO / "recipes" / "accelerate" / "fsdp2.yaml"


def two_process_command(
    stage: str,
    overrides: list[str],
    *,
    deepspeed: bool = False,
    zero_stage: int = 2,
    fsdp: bool = False,
    port_offset: int = 0,
    processes: int = 2,
) -> tuple[list[str], dict[str, str]]:
    """(command, environment) that launch the stage in 2 (or `processes`) CPU processes over gloo: DDP, DeepSpeed, or
    FSDP2 (the shipped recipes/accelerate/fsdp2.yaml with 2 processes in fp32; train.core.device selects FSDP2 on CPU)."""
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--num_processes",
        str(processes),
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--main_process_port",
        str(29500 + (os.getpid() + port_offset) % 1000),
    ]
    if fsdp:
        command[3:3] = ["--config_file", str(FSDP2_CONFIG)]
    elif deepspeed:
        command += ["--use_deepspeed", "--zero_stage", str(zero_stage), "--gradient_clipping", "1.0"]
    else:
        command += ["--multi_gpu"]
    command += [str(REPO / "train" / f"{stage}.py"), str(DEMO), *overrides]
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    if not deepspeed and not fsdp:  # DDP on CPU; with ACCELERATE_USE_CPU, DeepSpeed would become plain DDP
        env["ACCELERATE_USE_CPU"] = "1"
    return command, env


def launch_two_processes(
    stage: str,
    overrides: list[str],
    *,
    deepspeed: bool = False,
    zero_stage: int = 2,
    fsdp: bool = False,
    timeout: int = 600,
    expect_failure: bool = False,
    processes: int = 2,
) -> subprocess.CompletedProcess:
    """The stage in 2 (or `processes`) CPU processes over gloo (DDP, DeepSpeed, or FSDP2), through accelerate's
    launcher; `timeout` turns a hang into a failure."""
    command, env = two_process_command(
        stage, overrides, deepspeed=deepspeed, zero_stage=zero_stage, fsdp=fsdp, processes=processes
    )
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if expect_failure:
        assert result.returncode != 0, result.stderr[-4000:]
        return result
    assert result.returncode == 0, (
        f"2-process {stage} run failed:\n{result.stdout[-4000:]}\n{result.stderr[-8000:]}"
    )
    expected = (
        "DistributedType.FSDP"
        if fsdp
        else "DistributedType.DEEPSPEED"
        if deepspeed
        else "DistributedType.MULTI_CPU"
    )
    assert f"accelerate: {expected}, {processes} process(es)" in result.stderr, result.stderr[-4000:]
    return result


def assert_same_steps(a: list[dict], b: list[dict], rtol: float) -> None:
    assert [h["step"] for h in a] == [h["step"] for h in b]
    for x, y in zip(a, b):
        for key in ("loss", "grad_norm", "units", "tokens", "supervised_tokens"):  # tokens: padding excluded
            assert math.isclose(x[key], y[key], rel_tol=rtol, abs_tol=1e-7), (key, x, y)


def text_and_image_rows(synthetic: Path, folder: Path) -> list[str]:
    """Overrides training SFT on two rows, one with an image (from `synthetic`) and one text-only, written to
    `folder`: on 2 ranks with micro-batches of 1, one rank's batch is text-only at every step."""
    (folder / "images").mkdir(parents=True)
    shutil.copy(next((synthetic / "images").iterdir()), folder / "images" / "a.png")
    rows = [
        {
            "messages": [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What shape?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "a circle"}]},
            ],
            "images": ["images/a.png"],
        },
        {
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "Say hello."}]},
                {"role": "assistant", "content": [{"type": "text", "text": "hello there"}]},
            ]
        },
    ]
    (folder / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return [
        "data.train.0.format=trl_messages",
        f"data.train.0.path={folder / 'train.jsonl'}",
        f"data.train.0.image_root={folder}",
        "data.train.0.limit=null",
    ]


def wait_for_file(job: subprocess.Popen, path: Path, log: Path, seconds: float) -> None:
    """Wait while the launched `job` runs until `path` exists (e.g. a checkpoint's last file); fails when the job ends
    first (with the end of its `log`) or after `seconds`."""
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert job.poll() is None, f"the run ended before {path} existed:\n{log.read_text()[-4000:]}"
        assert time.monotonic() < deadline, f"no {path} after {seconds} s"
        time.sleep(0.05)


def history(run_dir: Path, stage: str) -> list[dict]:
    return json.loads((run_dir / stage / "summary.json").read_text())["history"]


def adapter(run_dir: Path, stage: str) -> dict[str, torch.Tensor]:
    return load_file(run_dir / stage / "adapter" / "adapter_model.safetensors")


def assert_same_adapter(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], rel: float = 1e-3) -> None:
    """Each adapter tensor equal to `rel` in relative Frobenius norm. Not element-wise: Adam divides by the root of
    the squared gradients, so an entry whose gradient is ~0 moves by about +-lr either way on float rounding."""
    assert a.keys() == b.keys()
    for key in a:
        gap = (a[key] - b[key]).norm() / a[key].norm().clamp_min(1e-12)
        assert gap <= rel, f"{key}: relative difference {gap:.2e} > {rel:.0e}"
