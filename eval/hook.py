"""The post-training eval hook: score one stage's model on the recipe's tasks, record it, report it, gate on it.

    scores = evaluate_stage("sft", model, processor, recipe.eval, run_dir, model_id_for_cache=model_id,
                            accelerator=accelerator, data=recipe.data)

Writes under `run_dir/eval/` (on the main process):

    results.json                      {task: {metric: {stage: value}}}; other stages' values are kept
    predictions/<stage>/<task>.jsonl  one line per example: id, question, references, prediction, score, meta
    thumbnails/<task>/*.png           images of the examples the report shows
    cache/base-<task>-<hash>.json     the base model's predictions (see below)
    report.html                       eval.report

**Base cache.** The base model's predictions are cached per (model id, task source and wording, limit, generation
settings, crops per image), keyed by a hash of those, in `cache_dir` (`run_dir/eval/cache/` unless given: pass a
shared folder to reuse base scores across runs). A cache entry is reused only when it holds the same example ids;
its predictions are scored again, so metric fixes apply. Trained stages are never cached.

**Gate.** With `eval.gate_margin` set, a metric that falls from one scored stage to the next (base -> sft -> dpo;
a stage not scored is skipped) by more than the margin, in either pair that holds the stage just scored, raises
`EvalGateError` after everything is written. Metrics where neither direction is better (POPE's yes_ratio) are not
gated.

**Several processes.** Every process must call this with the same arguments: generation is sharded and gathered,
and the decisions that read files (cache hit, merged results) are made on the main process and broadcast, so that
every rank takes the same path and raises the same gate error.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch.distributed as dist

from eval.generate import generate_answers, rgb_image
from eval.report import (
    STAGES,
    biggest_changes,
    predictions_path,
    read_predictions,
    save_thumbnail,
    thumbnail_path,
    write_report,
)
from eval.tasks import EvalExample, Task, load_examples, resolve_tasks, score_task
from rundir.atomic import write_text_atomically
from rundir.layout import during_training_file, eval_cache_dir, report_file, results_file

log = logging.getLogger(__name__)

CACHE_VERSION = 1
"""Bump when what a cached prediction depends on changes in code (generation, decoding, prompt building)."""

T = TypeVar("T")


class EvalGateError(RuntimeError):
    """A stage scored worse than the stage before it by more than `eval.gate_margin`; `.violations` lists each."""

    def __init__(self, message: str, violations: Sequence[str]):
        super().__init__(message)
        self.violations = tuple(violations)


# ------------------------------------------------------------------------------------------------ small helpers


def _check_stage(stage: str) -> None:
    if stage not in STAGES:
        raise ValueError(
            f"evaluate_stage: stage {stage!r} is not one of {list(STAGES)}; results.json records "
            "the base model and the sft and dpo stages"
        )


def _on_main(accelerator, compute: Callable[[], T]) -> T:
    """compute() on the main process, its value on every process (so that all ranks take the same branch).
    torch.distributed directly, as in eval.generate.gather_object."""
    if accelerator is None or accelerator.num_processes == 1:
        return compute()
    value = [compute() if accelerator.is_main_process else None]
    dist.broadcast_object_list(value, src=0)
    return value[0]


def _write_jsonl(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    # default=str: a dataset's descriptive columns in `meta` may hold values JSON has no type for.
    write_text_atomically(
        path, "".join(json.dumps(row, ensure_ascii=False, default=str) + "\n" for row in rows)
    )


# ------------------------------------------------------------------------------------------------ base cache


def cache_key(
    model_id: str, task: Task, *, limit: int | None, max_new_tokens: int, batch_size: int, processor
) -> dict[str, Any]:
    """What the base model's answers to a task depend on."""
    num_crops = getattr(getattr(processor, "image_processor", None), "num_crops", None)
    return {
        "version": CACHE_VERSION,
        "model": model_id,
        "task": task.fingerprint(),
        "limit": limit,
        "max_new_tokens": max_new_tokens,
        "batch_size": batch_size,
        "num_crops": num_crops,
    }


def cache_path(cache_dir: Path, task: Task, key: Mapping[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode("utf-8")).hexdigest()[:16]
    return cache_dir / f"base-{task.name}-{digest}.json"


def read_cache(path: Path, key: Mapping[str, Any], examples: Sequence[EvalExample]) -> list[str] | None:
    """The cached predictions, or None when there are none for this key and these examples."""
    if not path.is_file():
        return None
    try:
        entry = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        log.warning("eval cache %s is unreadable (%s); generating again", path, error)
        return None
    if entry.get("key") != key or entry.get("ids") != [example.id for example in examples]:
        return None
    return entry["predictions"]


def write_cache(
    path: Path, key: Mapping[str, Any], examples: Sequence[EvalExample], predictions: Sequence[str]
) -> None:
    entry = {"key": key, "ids": [example.id for example in examples], "predictions": list(predictions)}
    write_text_atomically(path, json.dumps(entry, ensure_ascii=False) + "\n")


# ------------------------------------------------------------------------------------------------ one task


def _predict(
    stage: str,
    task: Task,
    examples: Sequence[EvalExample],
    model,
    processor,
    recipe_eval,
    *,
    cache_dir: Path,
    model_id: str,
    accelerator,
) -> list[str]:
    """The stage's answers: from the base cache when it holds them, else generated (and cached for base)."""
    key = cache_key(
        model_id,
        task,
        limit=recipe_eval.limit,
        max_new_tokens=recipe_eval.max_new_tokens,
        batch_size=recipe_eval.batch_size,
        processor=processor,
    )
    path = cache_path(cache_dir, task, key)
    if stage == "base":
        cached = _on_main(accelerator, lambda: read_cache(path, key, examples))
        if cached is not None:
            log.info("eval %s: base predictions reused from %s", task.name, path)
            return cached
    predictions = generate_answers(
        model,
        processor,
        examples,
        batch_size=recipe_eval.batch_size,
        max_new_tokens=recipe_eval.max_new_tokens,
        accelerator=accelerator,
    )
    if stage == "base" and (accelerator is None or accelerator.is_main_process):
        write_cache(path, key, examples, predictions)
    return predictions


def prediction_rows(
    examples: Sequence[EvalExample], predictions: Sequence[str], scores: Sequence[float]
) -> list[dict[str, Any]]:
    return [
        {
            "id": example.id,
            "question": example.question,
            "references": list(example.references),
            "prediction": prediction,
            "score": score,
            "meta": dict(example.meta),
        }
        for example, prediction, score in zip(examples, predictions, scores)
    ]


def _neighbour_pairs(run_dir: Path, stage: str, task: str) -> list[tuple[str, str]]:
    """(earlier, later) pairs of `stage` with the nearest scored stage before and after it (predictions on disk)."""
    index = STAGES.index(stage)
    scored = [s for s in STAGES if s != stage and predictions_path(run_dir, s, task).is_file()]
    before = [s for s in scored if STAGES.index(s) < index]
    after = [s for s in scored if STAGES.index(s) > index]
    return ([(before[-1], stage)] if before else []) + ([(stage, after[0])] if after else [])


def save_report_thumbnails(run_dir: Path, stage: str, task: str, examples: Sequence[EvalExample]) -> None:
    """Thumbnails of the examples the report shows next to this stage: only those, so that a large benchmark's
    images are not all decoded a second time."""
    by_id = {example.id: example for example in examples}
    for earlier, later in _neighbour_pairs(run_dir, stage, task):
        regressions, gains = biggest_changes(
            read_predictions(predictions_path(run_dir, earlier, task)),
            read_predictions(predictions_path(run_dir, later, task)),
        )
        for change in regressions + gains:
            example = by_id.get(change.id)
            path = thumbnail_path(run_dir, task, change.id)
            if example is not None and example.images and not path.is_file():
                save_thumbnail(rgb_image(example.images[0], example, 0), path)


# ------------------------------------------------------------------------------------------------ results, gate


def merge_results(run_dir: Path, stage: str, scores: Mapping[str, Mapping[str, float]]) -> dict[str, Any]:
    """results.json with this stage's scores set (other stages and tasks kept), written atomically."""
    path = results_file(run_dir)
    results: dict[str, Any] = {}
    if path.is_file():
        try:
            results = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as error:
            raise ValueError(
                f"{path} is not valid JSON ({error}); the scores of earlier stages cannot be kept. "
                "Fix: repair or delete the file, then score again"
            ) from error
    for task, metrics in scores.items():
        for metric, value in metrics.items():
            results.setdefault(task, {}).setdefault(metric, {})[stage] = value
    write_text_atomically(path, json.dumps(results, indent=2, sort_keys=True) + "\n")
    return results


def gate_violations(
    results: Mapping[str, Any], stage: str, tasks: Sequence[Task], margin: float
) -> list[str]:
    """One line per gated metric that fell by more than `margin` between consecutive scored stages, in a pair
    that holds `stage`."""
    violations = []
    for task in tasks:
        for metric in task.metrics:
            if metric in task.ungated_metrics:
                continue
            by_stage = results.get(task.name, {}).get(metric, {})
            present = [s for s in STAGES if s in by_stage]
            for earlier, later in zip(present, present[1:]):
                drop = by_stage[earlier] - by_stage[later]
                if stage in (earlier, later) and drop > margin:
                    violations.append(
                        f"{task.name} {metric}: {later} scored {by_stage[later]:.4f}, {earlier} "
                        f"scored {by_stage[earlier]:.4f}, a drop of {drop:.4f} > margin {margin}"
                    )
    return violations


def check_gate(
    results: Mapping[str, Any], stage: str, tasks: Sequence[Task], margin: float | None, run_dir: Path
) -> None:
    if margin is None:
        return
    violations = gate_violations(results, stage, tasks, margin)
    if violations:
        listing = "\n".join(f"  - {line}" for line in violations)
        raise EvalGateError(
            f"eval gate failed after scoring stage '{stage}': {len(violations)} metric(s) fell by more than "
            f"eval.gate_margin = {margin}:\n{listing}\nThe scores are in {results_file(run_dir)} and the "
            f"examples that changed in {report_file(run_dir)}. Fix: look into the regression, or raise "
            "eval.gate_margin (null turns the gate off).",
            violations,
        )


# ------------------------------------------------------------------------------------------------ the hook


def _score_task(
    stage: str,
    task: Task,
    model,
    processor,
    recipe_eval,
    run_dir: Path,
    *,
    cache_dir: Path,
    model_id: str,
    accelerator,
) -> dict[str, float]:
    examples = load_examples(task, limit=recipe_eval.limit)
    predictions = _predict(
        stage,
        task,
        examples,
        model,
        processor,
        recipe_eval,
        cache_dir=cache_dir,
        model_id=model_id,
        accelerator=accelerator,
    )
    metrics, scores = score_task(task, examples, predictions)
    if accelerator is None or accelerator.is_main_process:
        _write_jsonl(
            predictions_path(run_dir, stage, task.name), prediction_rows(examples, predictions, scores)
        )
        save_report_thumbnails(run_dir, stage, task.name, examples)
    log.info(
        "eval %s %s (%d examples): %s",
        stage,
        task.name,
        len(examples),
        ", ".join(f"{metric} {value:.4f}" for metric, value in metrics.items()),
    )
    return metrics


def evaluate_stage(
    stage: str,
    model,
    processor,
    recipe_eval,
    run_dir: str | Path,
    *,
    model_id_for_cache: str,
    accelerator=None,
    data=None,
    task_paths: Mapping[str, str | Path] | None = None,
    cache_dir: str | Path | None = None,
    step: int | None = None,
) -> dict[str, dict[str, float]]:
    """Score `model` (in eval mode) as `stage` on every task of `recipe_eval` (an EvalSection) and return this
    stage's scores, {task: {metric: value}}.

    `model_id_for_cache` names the base weights (hub id or path and revision) for the base cache; `data` (the
    recipe's DataSection) tells the synthetic task where its dataset is; `task_paths` ({task: local path})
    overrides any task's source; `step` is the tracker step the scores are logged at (`tracker_scores`): 0 for the
    base (SFT's first), a trained stage's last optimizer step. Raises EvalGateError (after writing everything) when
    the gate fails.
    """
    _check_stage(stage)
    run_dir = Path(run_dir)
    tasks = resolve_tasks(recipe_eval.tasks, data=data, paths=task_paths)
    cache_dir = Path(cache_dir) if cache_dir is not None else eval_cache_dir(run_dir)
    scores = {
        task.name: _score_task(
            stage,
            task,
            model,
            processor,
            recipe_eval,
            run_dir,
            cache_dir=cache_dir,
            model_id=model_id_for_cache,
            accelerator=accelerator,
        )
        for task in tasks
    }
    results = _on_main(accelerator, lambda: merge_results(run_dir, stage, scores))
    if accelerator is None or accelerator.is_main_process:
        write_report(run_dir)
    if accelerator is not None:
        accelerator.log(tracker_scores(scores), step=step)
        accelerator.wait_for_everyone()
    check_gate(results, stage, tasks, recipe_eval.gate_margin, run_dir)
    return scores


def tracker_scores(scores: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """Scores as tracker keys, `eval/<task>/<metric>`. The stage is not in the key: each stage is its own tracker
    run (train/core/tracking.py), so that in SFT's run the base (step 0), the scores during training and SFT's own (its
    last step) draw one curve, and DPO's run continues it on DPO's steps."""
    return {
        f"eval/{task}/{metric}": value
        for task, metrics in scores.items()
        for metric, value in metrics.items()
    }


def score_during_training(
    stage: str,
    step: int,
    model,
    processor,
    recipe_eval,
    run_dir: str | Path,
    *,
    accelerator=None,
    data=None,
    examples_by_task: dict | None = None,
) -> dict[str, dict[str, float]]:
    """`eval.every_steps`: score the training model on the same fixed subset (`eval.limit`) of every task, log the
    scores to the trackers at `step` and append them to `eval/during_training.jsonl`. Not a stage: results.json,
    the base cache, the report and the gate are left to the end-of-stage hook. `examples_by_task` (filled on the
    first call) keeps the subset loaded between calls."""
    examples_by_task = {} if examples_by_task is None else examples_by_task
    scores = {}
    for task in resolve_tasks(recipe_eval.tasks, data=data):
        if task.name not in examples_by_task:
            examples_by_task[task.name] = load_examples(task, limit=recipe_eval.limit)
        examples = examples_by_task[task.name]
        predictions = generate_answers(
            model,
            processor,
            examples,
            batch_size=recipe_eval.batch_size,
            max_new_tokens=recipe_eval.max_new_tokens,
            accelerator=accelerator,
        )
        scores[task.name], _ = score_task(task, examples, predictions)
    if accelerator is None or accelerator.is_main_process:
        path = during_training_file(Path(run_dir))
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as stream:
            stream.write(json.dumps({"stage": stage, "step": step, "scores": scores}) + "\n")
    if accelerator is not None:
        accelerator.log(tracker_scores(scores), step=step)
    log.info("eval during %s at step %d: %s", stage, step, scores)
    return scores
