"""GRPO's rewards are the eval metrics: on the reference-implementation cases of tests/eval/test_metrics.py, the reward a
completion earns equals the score the eval task gives it; the format and length rewards, the answer pattern, and a
user's function (loaded by import path, its failures naming the row)."""

from __future__ import annotations

import math
import sys
import types
from types import SimpleNamespace

import pytest

from config.schema import GrpoReward
from data.sample import Origin
from eval.tasks import TASKS, EvalExample
from tests.eval.test_metrics import OPTIONS, PIX2STRUCT_PAIRS
from train.rl.rewards import REWARD_TYPES, RewardError, build_rewards, extract_answer, score_completions


def example(references, question="Q?", meta=None, row=7) -> EvalExample:
    return EvalExample(
        id=str(row),
        messages=({"role": "user", "content": question},),
        images=(),
        references=tuple(references),
        meta=meta or {},
        origin=Origin(dataset="charts.jsonl", row=row),
    )


def rewards_of(*specs, answer_pattern=None, max_new_tokens=8):
    return SimpleNamespace(rewards=tuple(specs), answer_pattern=answer_pattern, max_new_tokens=max_new_tokens)


def score(spec_type, completion, ex, **kwargs):
    rewards = build_rewards(rewards_of(GrpoReward(type=spec_type, **kwargs)))
    return score_completions(rewards, [completion], [ex], [3], max_new_tokens=8, answer_pattern=None)[0][0]


def test_the_schema_lists_every_reward_type():
    from typing import get_args

    from config.schema import GrpoRewardType

    assert set(get_args(GrpoRewardType)) == set(REWARD_TYPES)


@pytest.mark.parametrize(("prediction", "target", "_"), PIX2STRUCT_PAIRS)
def test_metric_rewards_equal_the_eval_task_scores(prediction, target, _):
    ex = example([target])
    for reward, task in (("relaxed_accuracy", "chartqa"), ("anls", "docvqa"), ("exact_match", "synthetic")):
        assert score(reward, prediction, ex) == TASKS[task].score(prediction.strip(), ex), reward


def test_vqa_accuracy_reward_equals_textvqa_score_over_ten_answers():
    ex = example(["2", "2", "2", "3", "3", "3", "3", "4", "4", "4"])
    for prediction in ("2", "two", "3", "4", "5"):
        assert score("vqa_accuracy", prediction, ex) == TASKS["textvqa"].score(prediction, ex)


def test_option_letter_reward_equals_the_multiple_choice_score():
    ex = example(["B"], meta={"options": OPTIONS, "answer": 1})
    for prediction in ("B", "(B)", "The answer is B.", "London", "A", "Paris"):
        assert score("option_letter", prediction, ex) == TASKS["ai2d"].score(prediction, ex), prediction
    # Without options in the row, they are read off the prompt's "A. ..." lines (the eval's prompt layout).
    from_prompt = example(["B"], question="Capital of the UK?\nA. Paris\nB. London\nAnswer with the letter.")
    assert score("option_letter", "London", from_prompt) == 1.0
    assert score("option_letter", "Paris", from_prompt) == 0.0


def test_format_length_and_answer_pattern():
    specs = (
        GrpoReward(type="relaxed_accuracy"),
        GrpoReward(type="format", pattern=r"^<think>.*</think>\s*<answer>"),
        GrpoReward(type="length", weight=0.1),
    )
    rewards = build_rewards(rewards_of(*specs))
    pattern = __import__("re").compile(r"<answer>(.*?)</answer>", __import__("re").DOTALL)
    table = score_completions(
        rewards,
        ["<think>12 + 30</think> <answer>42</answer>", "42"],
        [example(["42"])] * 2,
        [6, 2],
        max_new_tokens=8,
        answer_pattern=pattern,
    )
    assert table[0] == [1.0, 1.0, -6 / 8]
    assert table[1] == [0.0, 0.0, -2 / 8]  # no answer tag: no answer, so the metric scores 0
    assert extract_answer(" 42 ", None) == "42"


@pytest.fixture()
def user_module():
    module = types.ModuleType("my_grpo_rewards")

    def short(completion, example):
        return 1.0 if len(completion) <= len(example.references[0]) else 0.0

    def broken(completion, example):
        raise KeyError("meta['unit']")

    def skips(completion, example):
        return None if completion == "skip" else 0.5

    module.short, module.broken, module.skips, module.text = short, broken, skips, lambda c, e: "1"
    sys.modules["my_grpo_rewards"] = module
    yield module
    del sys.modules["my_grpo_rewards"]


def test_a_user_function_by_import_path(user_module):
    rewards = build_rewards(
        rewards_of(
            GrpoReward(type="function", function="my_grpo_rewards:short"),
            GrpoReward(type="function", function="my_grpo_rewards:skips"),
        )
    )
    assert [r.name for r in rewards] == ["my_grpo_rewards:short", "my_grpo_rewards:skips"]
    table = score_completions(
        rewards, ["42", "skip"], [example(["42"])] * 2, [1, 1], max_new_tokens=8, answer_pattern=None
    )
    assert table[0] == [1.0, 0.5] and table[1][0] == 0.0 and math.isnan(table[1][1])


def test_a_failing_user_function_names_the_row(user_module):
    rewards = build_rewards(rewards_of(GrpoReward(type="function", function="my_grpo_rewards:broken")))
    with pytest.raises(
        RewardError, match=r"my_grpo_rewards:broken raised KeyError.*charts.jsonl row 7.*'42'"
    ):
        score_completions(rewards, ["42"], [example(["42"])], [1], max_new_tokens=8, answer_pattern=None)
    rewards = build_rewards(rewards_of(GrpoReward(type="function", function="my_grpo_rewards:text")))
    with pytest.raises(RewardError, match="returned '1', not a finite number"):
        score_completions(rewards, ["42"], [example(["42"])], [1], max_new_tokens=8, answer_pattern=None)


@pytest.mark.parametrize(
    "path, message",
    [
        ("nocolon", "module:function"),
        ("no_such_module_x:f", "cannot import"),
        ("math:no_such_function", "has no function"),
    ],
)
def test_bad_import_paths_are_refused(path, message):
    with pytest.raises(ValueError, match=message):
        build_rewards(rewards_of(GrpoReward(type="function", function=path)))
