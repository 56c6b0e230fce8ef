"""The GRPO demo end to end (recipes/demo_grpo.yaml: SFT -> GRPO -> eval -> export) and GRPO on 2 processes.

Slow: the demo trains for minutes on 2 cores; the 2-process test launches accelerate."""

from __future__ import annotations

import json

import pytest

from config import load_recipe
from train import grpo, sft
from train.export import merge as export

from ..run_helpers import DEMO, REPO, adapter, assert_same_adapter, history, launch_two_processes

DEMO_GRPO = REPO / "recipes" / "demo_grpo.yaml"

pytestmark = pytest.mark.slow


def test_grpo_raises_the_held_out_exact_match_over_sft(synthetic, tmp_path):
    overrides = [f"output_dir={tmp_path / 'run'}", f"data.train.0.path={synthetic}"]
    run_dir = sft.main(load_recipe(DEMO_GRPO, overrides), DEMO_GRPO)
    grpo.main(load_recipe(DEMO_GRPO, overrides), DEMO_GRPO)
    export.main([str(run_dir)])
    scores = json.loads((run_dir / "eval" / "results.json").read_text())["synthetic"]["exact_match"]
    assert scores["grpo"] > scores["sft"] > scores["base"], scores
    steps = history(run_dir, "grpo")
    assert steps[-1]["rewards/exact_match/mean"] > steps[0]["rewards/exact_match/mean"], steps
    summary = json.loads((run_dir / "grpo" / "summary.json").read_text())
    assert summary["sampled_groups"] and all(len(g["completions"]) == 8 for g in summary["sampled_groups"])
    assert (run_dir / "grpo" / "merged" / "model.safetensors").is_file()


def small(run_dir, synthetic, **train):
    settings = {
        "max_steps": 3,
        "micro_batch_size": 2,
        "grad_accum": 2,
        "log_every": 1,
        "checkpoint_every": 100,
        **train,
    }
    return [
        f"output_dir={run_dir}",
        f"data.train.0.path={synthetic}",
        "data.train.0.limit=64",
        "stages=[grpo]",
        "grpo.max_steps=null",
        "grpo.num_generations=4",
        "grpo.max_new_tokens=4",
        "grpo.scale_rewards=batch",
        "grpo.rewards=[{type: exact_match}, {type: length, weight: 0.5}]",
        *(f"train.{key}={value}" for key, value in settings.items()),
    ]


def test_two_processes_sample_and_train_what_one_does(synthetic, tmp_path):
    # launch_two_processes runs recipes/demo.yaml: the same recipe on both sides.
    one = grpo.main(load_recipe(DEMO, small(tmp_path / "one", synthetic, grad_accum=4)), DEMO)
    launch_two_processes("grpo", small(tmp_path / "two", synthetic, grad_accum=2))
    a, b = history(one, "grpo"), history(tmp_path / "two", "grpo")
    for x, y in zip(a, b, strict=True):  # the same completions (same rewards), the same loss and gradients
        for key in ("reward", "rewards/length/mean", "units", "loss", "grad_norm"):
            assert x[key] == pytest.approx(y[key], rel=1e-4, abs=1e-7), (key, x, y)
    assert_same_adapter(adapter(one, "grpo"), adapter(tmp_path / "two", "grpo"))
