"""GRPO's rewards: the eval metrics themselves, a format reward, a length penalty and a user's own function.

Every reward is a function `(completion: str, example: EvalExample) -> float` (a user's may also return None:
"does not apply", excluded from its mean as in TRL), scoring one sampled completion against the prompt's row:
`example.references` (the reference answers), `example.meta`, `example.origin` (dataset and row), `example.question`.

    exact_match        eval.metrics.exact_match (the synthetic task's metric)
    relaxed_accuracy   eval.metrics.relaxed_accuracy (ChartQA: numbers within 5%, other answers exact)
    anls               eval.metrics.anls (DocVQA)
    vqa_accuracy       eval.metrics.vqa_accuracy (TextVQA / VQAv2, over the references given)
    option_letter      eval.metrics.multiple_choice_accuracy (AI2D, ScienceQA): the option the completion names
                       equals the reference letter; options from the row's meta, else read off the prompt's
                       "A. ..." lines
    format             1 when `pattern` matches the completion (re.search, DOTALL), else 0
    length             -(completion tokens / grpo.max_new_tokens): in [-1, 0], a penalty with a positive weight
    function           a user's function by import path `module:function`, same signature

The metric rewards score the answer: the whole completion, or the first group of `grpo.answer_pattern` where it
matches (a completion in which it does not match gets 0: it gave no answer). They are the same functions the eval
stage scores with (eval/tasks.py), so the reward a completion earns is the score the eval would give that answer.

The weighted sum (`grpo.rewards[].weight`) is the reward advantages are computed from; each function's mean and std
over the step are logged as `rewards/<name>/mean` and `rewards/<name>/std`.
"""

from __future__ import annotations

import importlib
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from eval import metrics
from eval.tasks import EvalExample

RewardFn = Callable[[str, EvalExample], "float | None"]
METRIC_REWARDS = ("exact_match", "relaxed_accuracy", "anls", "vqa_accuracy", "option_letter")
REWARD_TYPES = (*METRIC_REWARDS, "format", "length", "function")
_OPTION_LINE = re.compile(r"^([A-Z])\. (.+)$", re.MULTILINE)


class RewardError(RuntimeError):
    """A reward function failed or returned a non-number; names the function, the row and the completion."""


def _options(example: EvalExample) -> list[str]:
    if example.meta.get("options"):
        return list(example.meta["options"])
    return [text for _, text in _OPTION_LINE.findall(example.question)]


def option_letter(answer: str, example: EvalExample) -> float:
    options = _options(example)
    if not options:
        return float(answer.strip().upper().rstrip(".") == example.references[0].strip().upper())
    return metrics.multiple_choice_accuracy(answer, options, example.references[0])


_METRICS: dict[str, Callable[[str, EvalExample], float]] = {
    "exact_match": lambda answer, example: metrics.exact_match(answer, example.references),
    "relaxed_accuracy": lambda answer, example: metrics.relaxed_accuracy(answer, example.references),
    "anls": lambda answer, example: metrics.anls(answer, example.references),
    "vqa_accuracy": lambda answer, example: metrics.vqa_accuracy(answer, example.references),
    "option_letter": option_letter,
}
assert set(_METRICS) == set(METRIC_REWARDS)


def import_reward(path: str) -> RewardFn:
    """The function named by `module:function` (the module importable from the working directory or PYTHONPATH)."""
    module_name, _, name = path.partition(":")
    if not module_name or not name:
        raise ValueError(
            f"grpo.rewards: function {path!r} is not of the form 'module:function' (e.g. "
            "'my_rewards:short_answer')"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(
            f"grpo.rewards: cannot import module {module_name!r} of reward function {path!r}: {error}. "
            "Fix: put it on PYTHONPATH (or in the working directory)"
        ) from error
    function = getattr(module, name, None)
    if not callable(function):
        raise ValueError(
            f"grpo.rewards: module {module_name!r} has no function {name!r} (reward function {path!r})"
        )
    return function


@dataclass(frozen=True)
class Reward:
    name: str  # what the logs call it: the type, or the function's import path
    weight: float
    score: RewardFn
    needs_answer: bool  # scored on the extracted answer (metric rewards) rather than the whole completion


def build_rewards(grpo) -> list[Reward]:
    """The recipe's `grpo.rewards` as scoring functions (a `function` reward is imported here, so a bad path fails
    before the model loads)."""
    rewards = []
    for index, spec in enumerate(grpo.rewards):
        if spec.type in _METRICS:
            rewards.append(Reward(spec.type, spec.weight, _METRICS[spec.type], needs_answer=True))
        elif spec.type == "format":
            if not spec.pattern:
                raise ValueError(
                    f"grpo.rewards.{index}: a format reward needs `pattern` (a regular expression)"
                )
            pattern = re.compile(spec.pattern, re.DOTALL)
            rewards.append(
                Reward(
                    "format",
                    spec.weight,
                    lambda text, _, p=pattern: float(p.search(text) is not None),
                    needs_answer=False,
                )
            )
        elif spec.type == "length":
            rewards.append(Reward("length", spec.weight, _length_unset, needs_answer=False))
        elif spec.type == "function":
            if not spec.function:
                raise ValueError(f"grpo.rewards.{index}: a function reward needs `function: module:function`")
            rewards.append(
                Reward(spec.function, spec.weight, import_reward(spec.function), needs_answer=False)
            )
        else:
            raise ValueError(
                f"grpo.rewards.{index}: unknown type {spec.type!r}; use one of {', '.join(REWARD_TYPES)}"
            )
    names = [reward.name for reward in rewards]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(
            f"grpo.rewards lists {repeated} more than once; list each once with the sum of its weights"
        )
    return rewards


def _length_unset(
    text: str, example: EvalExample
) -> float:  # replaced by score_completions, which knows lengths
    raise AssertionError("the length reward is computed from token counts")


def extract_answer(completion: str, answer_pattern: re.Pattern[str] | None) -> str | None:
    """The answer a completion gives: all of it, or the first group of `answer_pattern` (None: no match)."""
    if answer_pattern is None:
        return completion.strip()
    match = answer_pattern.search(completion)
    if match is None:
        return None
    return (match.group(1) if match.groups() else match.group(0)).strip()


def score_completions(
    rewards: Sequence[Reward],
    completions: Sequence[str],
    examples: Sequence[EvalExample],
    num_tokens: Sequence[int],
    *,
    max_new_tokens: int,
    answer_pattern: re.Pattern[str] | None,
) -> list[list[float]]:
    """rewards_per_function[i][f]: completion i (of example i) under reward f, NaN where a user's function
    returned None. A function that raises, or returns something that is not a finite number, raises RewardError
    naming the function, the row (dataset and row index) and the completion."""
    table = []
    for completion, example, tokens in zip(completions, examples, num_tokens, strict=True):
        answer = extract_answer(completion, answer_pattern)
        row = []
        for reward in rewards:
            if reward.name == "length":
                row.append(-tokens / max_new_tokens)
                continue
            if reward.needs_answer and answer is None:
                row.append(0.0)
                continue
            text = answer if reward.needs_answer else completion
            try:
                value = reward.score(text, example)
            except Exception as error:
                raise RewardError(
                    f"reward function {reward.name} raised {type(error).__name__}: {error}, on "
                    f"{example.origin} (example id {example.id}), completion {completion!r}"
                ) from error
            if value is None:
                row.append(math.nan)
                continue
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise RewardError(
                    f"reward function {reward.name} returned {value!r}, not a finite number (or None), "
                    f"on {example.origin} (example id {example.id}), completion {completion!r}"
                )
            row.append(float(value))
        table.append(row)
    return table
