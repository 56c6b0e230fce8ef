"""Training invariants on the real entry points: loss normalisation across micro-batches and ranks, resume."""

import pytest

from train.core.callbacks import Preempted

from ..run_helpers import (
    adapter,
    assert_same_adapter,
    assert_same_steps,
    history,
    launch_two_processes,
    run_stage,
    small_overrides,
)


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_batch_8_accum_1_equals_batch_1_accum_8(stage, synthetic, tmp_path):
    wide = run_stage(
        stage,
        small_overrides(tmp_path / "wide", synthetic, stage, micro_batch_size=8, grad_accum=1, max_steps=5),
    )
    deep = run_stage(
        stage,
        small_overrides(tmp_path / "deep", synthetic, stage, micro_batch_size=1, grad_accum=8, max_steps=5),
    )
    assert_same_steps(history(wide, stage), history(deep, stage), rtol=1e-4)
    assert_same_adapter(adapter(wide, stage), adapter(deep, stage))


@pytest.mark.slow  # launches 2 processes
@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_two_ddp_processes_equal_one_with_twice_the_accumulation(stage, synthetic, tmp_path):
    one = run_stage(
        stage, small_overrides(tmp_path / "one", synthetic, stage, micro_batch_size=2, grad_accum=4)
    )
    launch_two_processes(
        stage, small_overrides(tmp_path / "two", synthetic, stage, micro_batch_size=2, grad_accum=2)
    )
    assert_same_steps(history(one, stage), history(tmp_path / "two", stage), rtol=1e-4)
    assert_same_adapter(adapter(one, stage), adapter(tmp_path / "two", stage))


@pytest.mark.slow  # launches 2 processes
def test_two_deepspeed_zero2_processes_equal_one_with_twice_the_accumulation(synthetic, tmp_path):
    one = run_stage(
        "sft", small_overrides(tmp_path / "one", synthetic, "sft", micro_batch_size=2, grad_accum=4)
    )
    launch_two_processes(
        "sft",
        small_overrides(tmp_path / "two", synthetic, "sft", micro_batch_size=2, grad_accum=2),
        deepspeed=True,
    )
    assert_same_steps(history(one, "sft"), history(tmp_path / "two", "sft"), rtol=1e-4)
    assert_same_adapter(adapter(one, "sft"), adapter(tmp_path / "two", "sft"))


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_stop_and_resume_ends_with_the_same_adapter(stage, synthetic, tmp_path):
    settings = dict(max_steps=4, checkpoint_every=2)
    straight = run_stage(stage, small_overrides(tmp_path / "straight", synthetic, stage, **settings))
    interrupted = small_overrides(tmp_path / "resumed", synthetic, stage, **settings)
    with pytest.raises(Preempted):
        run_stage(stage, interrupted, stop_after_step=2)
    run_stage(stage, [*interrupted, "train.resume=true"])
    assert_same_adapter(adapter(straight, stage), adapter(tmp_path / "resumed", stage), rel=1e-6)
    assert history(straight, stage)[-1]["loss"] == pytest.approx(
        history(tmp_path / "resumed", stage)[-1]["loss"], rel=1e-5
    )


def test_an_existing_run_directory_is_not_overwritten(synthetic, tmp_path):
    run_stage("sft", small_overrides(tmp_path / "run", synthetic, "sft", max_steps=1))
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        run_stage("sft", small_overrides(tmp_path / "run", synthetic, "sft", max_steps=1))
    run_stage(
        "sft",
        [*small_overrides(tmp_path / "run", synthetic, "sft", max_steps=1), "overwrite_output_dir=true"],
    )


def test_eval_every_steps_scores_during_training(synthetic, tmp_path):
    import json

    overrides = [
        *small_overrides(tmp_path / "run", synthetic, "sft", max_steps=4),
        "stages=[sft,eval]",
        "eval.every_steps=2",
        "eval.limit=8",
        "eval.when=[sft]",
    ]
    run = run_stage("sft", overrides)
    lines = [json.loads(line) for line in (run / "eval" / "during_training.jsonl").read_text().splitlines()]
    assert [(line["stage"], line["step"]) for line in lines] == [
        ("sft", 2)
    ]  # step 4 is the end-of-stage eval
    assert set(lines[0]["scores"]["synthetic"]) == {"exact_match"}
    results = json.loads((run / "eval" / "results.json").read_text())
    assert set(results["synthetic"]["exact_match"]) == {"sft"}


def test_eval_every_steps_skips_the_last_step_of_an_epoch_based_run(synthetic, tmp_path):
    """The stage's length comes from train.epochs here (64 rows / (4 x 2) = 8 steps per epoch, half an epoch = 4): the
    callback must know it, or step 4 is scored twice (during training and by the end-of-stage eval)."""
    import json

    overrides = [
        *small_overrides(tmp_path / "run", synthetic, "sft"),
        "train.max_steps=null",
        "train.epochs=0.5",
        "stages=[sft,eval]",
        "eval.every_steps=2",
        "eval.limit=8",
        "eval.when=[sft]",
    ]
    run = run_stage("sft", overrides)
    assert json.loads((run / "sft" / "summary.json").read_text())["steps"] == 4
    lines = [json.loads(line) for line in (run / "eval" / "during_training.jsonl").read_text().splitlines()]
    assert [(line["stage"], line["step"]) for line in lines] == [("sft", 2)]
