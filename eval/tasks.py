"""Eval tasks: where each benchmark's rows come from, how a row becomes a prompt, and how answers are scored.

    task = TASKS["chartqa"].with_source(path="charts.parquet")   # a local copy instead of the hub dataset
    examples = load_examples(task, limit=100)
    metrics, per_example = score_task(task, examples, predictions)

Every hub task reads its rows through `data.sources.load_rows` (`datasets.load_dataset`, image columns left encoded)
and builds one `EvalExample` per row: chat messages for `Phi3VProcessor.apply_chat_template` (the image first, then
the text: the layout lmms-eval's `phi3v` model builds, `<|image_1|>\\n{prompt}`), the images as `ImageRef`s, and
the reference answers. A local override reads a file with the hub dataset's columns (`columns` renames others).

Prompt wording follows lmms-eval's `default` `lmms_eval_specific_kwargs` (the ones its `phi3v` model gets), so that
scores compare with published ones; each task's `prompt` field documents its wording. Per-example scores feed the
report's regressions and gains; the task's metrics are what results.json records.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from string import ascii_uppercase
from typing import Any

from PIL import Image

from config.schema import SYNTHETIC_DIR, Source
from data.adapters import adapt_row, apply_columns, resolve_image, vqa_references
from data.multipage import is_multipage_question
from data.render import to_messages
from data.sample import DataError, ImageRef, Origin, SFTSample
from data.sources import LOCAL_FILE_BUILDERS, image_root_of, load_rows, source_name
from data.synthetic import question_task
from eval import metrics

SINGLE_WORD_OR_PHRASE = "\nAnswer the question using a single word or phrase."
OPTION_LETTER = "\nAnswer with the option's letter from the given choices directly."
CHARTQA_INSTRUCTION = "\nAnswer the question with a single word."
"""Where the demo writes its synthetic dataset when the recipe's synthetic source names no path (data/loaders.py)."""


@dataclass(frozen=True, kw_only=True)
class EvalExample:
    """One prompt to answer and what to score the answer against."""

    id: str
    """Unique within the task: the row's index in its source, the same for every stage (predictions join on it)."""
    messages: tuple[dict[str, Any], ...]
    """Chat messages ending with a user turn; image parts `{"type": "image"}` take `images` in order."""
    images: tuple[ImageRef | Image.Image, ...]
    references: tuple[str, ...]
    """The reference answers (a multiple-choice task: the right option's letter)."""
    meta: Mapping[str, Any] = field(default_factory=dict)
    """What scoring needs beyond the references (options, answer index) and what the dataset says about the row."""
    origin: Origin
    """The source and row, for error messages."""

    @property
    def question(self) -> str:
        """The text of the last user turn: the prompt as the model reads it, less the chat template."""
        content = self.messages[-1]["content"]
        if isinstance(content, str):
            return content
        return "".join(part.get("text") or "" for part in content if part.get("type") == "text")


RowMapper = Callable[[Mapping[str, Any], Origin, Path | None], EvalExample]
ExampleScorer = Callable[[str, EvalExample], float]
Aggregator = Callable[[Sequence[str], Sequence[EvalExample], Sequence[float]], dict[str, float]]


def mean_score(metric: str) -> Aggregator:
    """The task's metric as the mean of its per-example scores."""

    def aggregate(predictions: Sequence[str], examples: Sequence[EvalExample], scores: Sequence[float]):
        return {metric: sum(scores) / len(scores)}

    return aggregate


@dataclass(frozen=True, kw_only=True)
class Task:
    """One benchmark: its source, its prompt, its metrics."""

    name: str
    path: str
    """A hub dataset id, a local dataset folder, or a local .json/.jsonl/.parquet/.arrow file."""
    config: str | None = None
    split: str
    revision: str | None = None
    columns: Mapping[str, str] = field(default_factory=dict)
    """Renames applied to each row first, {raw name: the hub dataset's name}, for local copies named otherwise."""
    data_file: str | None = None
    """A file inside `path` when `path` is a dataset directory (the synthetic task reads `sft_eval.jsonl`)."""
    metrics: tuple[str, ...]
    """The metric names results.json records for this task."""
    ungated_metrics: frozenset[str] = frozenset()
    """Reported, but never compared by the eval gate: neither direction is better (POPE's yes_ratio)."""
    prompt: str
    """The prompt wording, as documentation (the row mapper builds it)."""
    to_example: RowMapper
    score: ExampleScorer
    """The per-example score in [0, 1]."""
    aggregate: Aggregator

    def with_source(
        self,
        *,
        path: str | Path,
        split: str | None = None,
        config: str | None = None,
        columns: Mapping[str, str] | None = None,
    ) -> Task:
        """The same task on another copy of its data (no pinned revision). A local .json/.jsonl/.parquet/.arrow file
        is the split `train` (the packaged `datasets` builders name it so) with no config; a folder or another hub id
        keeps this task's split and config unless given."""
        local_file = Path(path).suffix in LOCAL_FILE_BUILDERS
        return dataclasses.replace(
            self,
            path=str(path),
            split=split or ("train" if local_file else self.split),
            config=config if config is not None else (None if local_file else self.config),
            revision=None,
            columns=dict(columns) if columns is not None else self.columns,
        )

    def fingerprint(self) -> dict[str, Any]:
        """What decides this task's examples and prompts (for caches): the source and the wording."""
        return {
            "name": self.name,
            "path": self.path,
            "config": self.config,
            "split": self.split,
            "revision": self.revision,
            "columns": dict(self.columns),
            "data_file": self.data_file,
            "prompt": self.prompt,
            "metrics": list(self.metrics),
        }


# ------------------------------------------------------------------------------------------------ row helpers


def _field(row: Mapping[str, Any], key: str, origin: Origin) -> Any:
    if row.get(key) is None:
        raise DataError(
            origin,
            key,
            f"missing column: '{key}' is absent or None (columns: {sorted(row)}); map the "
            "right column onto it with the task's `columns`",
        )
    return row[key]


def _text(row: Mapping[str, Any], key: str, origin: Origin) -> str:
    value = _field(row, key, origin)
    if not isinstance(value, str):
        raise DataError(
            origin, key, f"bad text type: expected a string, got {type(value).__name__} {value!r}"
        )
    return value


def _text_list(row: Mapping[str, Any], key: str, origin: Origin) -> list[str]:
    value = _field(row, key, origin)
    if (
        not isinstance(value, list | tuple)
        or not value
        or not all(isinstance(v, str) and v.strip() for v in value)
    ):
        raise DataError(
            origin, key, f"bad options: expected a non-empty list of non-empty strings, got {value!r}"
        )
    return list(value)


def _answer_index(row: Mapping[str, Any], key: str, num_options: int, origin: Origin) -> int:
    """A 0-based option index; AI2D stores it as a string ("2"), ScienceQA as an int."""
    value = _field(row, key, origin)
    try:
        index = int(value)
    except (TypeError, ValueError):
        index = -1
    if isinstance(value, bool) or not 0 <= index < num_options:
        raise DataError(origin, key, f"bad answer: {value!r} is not an index into the {num_options} options")
    return index


def _user_turn(text: str, num_images: int) -> tuple[dict[str, Any], ...]:
    content = [{"type": "image"}] * num_images + [{"type": "text", "text": text}]
    return ({"role": "user", "content": content},)


def _image(row: Mapping[str, Any], origin: Origin, image_root: Path | None) -> ImageRef:
    return resolve_image(_field(row, "image", origin), image_root=image_root, origin=origin, field="image")


def _options_text(options: Sequence[str]) -> str:
    """lmms-eval's option block: "A. first\\nB. second"."""
    return "\n".join(f"{letter}. {option}" for letter, option in zip(ascii_uppercase, options))


def _extra(row: Mapping[str, Any], keys: Sequence[str]) -> dict[str, Any]:
    """The row's descriptive columns worth keeping in the predictions (ids, categories), where present."""
    return {key: row[key] for key in keys if row.get(key) is not None}


# ------------------------------------------------------------------------------------------------ row mappers


def _vqa_example(
    row: Mapping[str, Any], origin: Origin, image_root: Path | None, *, text: str, meta_keys: Sequence[str]
) -> EvalExample:
    return EvalExample(
        id=str(origin.row),
        messages=_user_turn(text, 1),
        images=(_image(row, origin, image_root),),
        references=tuple(vqa_references(row, {}, origin=origin)),
        meta=_extra(row, meta_keys),
        origin=origin,
    )


def chartqa_example(row: Mapping[str, Any], origin: Origin, image_root: Path | None) -> EvalExample:
    """HuggingFaceM4/ChartQA: `query`, `label` (a list), `human_or_machine` (0 human, 1 augmented)."""
    text = _text(row, "query", origin) + CHARTQA_INSTRUCTION
    return _vqa_example(row, origin, image_root, text=text, meta_keys=("human_or_machine",))


def docvqa_example(row: Mapping[str, Any], origin: Origin, image_root: Path | None) -> EvalExample:
    """lmms-lab/DocVQA (config DocVQA): `question`, `answers`, `questionId`."""
    text = _text(row, "question", origin) + SINGLE_WORD_OR_PHRASE
    return _vqa_example(row, origin, image_root, text=text, meta_keys=("questionId", "docId"))


def textvqa_example(row: Mapping[str, Any], origin: Origin, image_root: Path | None) -> EvalExample:
    """lmms-lab/textvqa: `question`, `answers` (10 human answers), `question_id`.

    The question is `str.capitalize()`d as lmms-eval's `textvqa_doc_to_text` does (TextVQA questions are lower-case;
    capitalize also lower-cases the rest, kept for the same prompts)."""
    text = _text(row, "question", origin).capitalize() + SINGLE_WORD_OR_PHRASE
    return _vqa_example(row, origin, image_root, text=text, meta_keys=("question_id",))


def _choice_example(
    row: Mapping[str, Any],
    origin: Origin,
    image_root: Path | None,
    *,
    text: str,
    options: list[str],
    answer: int,
    meta_keys: Sequence[str],
) -> EvalExample:
    has_image = row.get("image") is not None  # ScienceQA has text-only questions
    images = (_image(row, origin, image_root),) if has_image else ()
    meta = {"options": options, "answer": answer, **_extra(row, meta_keys)}
    return EvalExample(
        id=str(origin.row),
        messages=_user_turn(text, len(images)),
        images=images,
        references=(ascii_uppercase[answer],),
        meta=meta,
        origin=origin,
    )


def ai2d_example(row: Mapping[str, Any], origin: Origin, image_root: Path | None) -> EvalExample:
    """lmms-lab/ai2d: `question`, `options` (a list), `answer` (the index, as a string)."""
    options = _text_list(row, "options", origin)
    answer = _answer_index(row, "answer", len(options), origin)
    text = f"{_text(row, 'question', origin)}\n{_options_text(options)}{OPTION_LETTER}"
    return _choice_example(row, origin, image_root, text=text, options=options, answer=answer, meta_keys=())


def scienceqa_example(row: Mapping[str, Any], origin: Origin, image_root: Path | None) -> EvalExample:
    """lmms-lab/ScienceQA (config ScienceQA-IMG) or derek-thomas/ScienceQA: `question`, `choices`, `answer` (an int),
    `hint` (the context, may be empty), `image` (None for text-only questions)."""
    options = _text_list(row, "choices", origin)
    answer = _answer_index(row, "answer", len(options), origin)
    hint = row.get("hint") or ""
    context = f"Context: {hint}\n" if hint else ""
    text = f"{context}{_text(row, 'question', origin)}\n{_options_text(options)}{OPTION_LETTER}"
    return _choice_example(
        row, origin, image_root, text=text, options=options, answer=answer, meta_keys=("subject", "grade")
    )


def pope_example(row: Mapping[str, Any], origin: Origin, image_root: Path | None) -> EvalExample:
    """lmms-lab/POPE: `question`, `answer` ("yes"/"no"), `category` (adversarial, popular, random)."""
    label = _text(row, "answer", origin).strip().lower()
    if label not in ("yes", "no"):
        raise DataError(origin, "answer", f"bad label: POPE answers are 'yes' or 'no', got {row['answer']!r}")
    text = _text(row, "question", origin).strip() + SINGLE_WORD_OR_PHRASE
    return EvalExample(
        id=str(origin.row),
        messages=_user_turn(text, 1),
        images=(_image(row, origin, image_root),),
        references=(label,),
        meta=_extra(row, ("question_id", "category")),
        origin=origin,
    )


def synthetic_example(row: Mapping[str, Any], origin: Origin, image_root: Path | None) -> EvalExample:
    """A synthetic `sft_eval.jsonl` row (TRL messages; the demo's task or data/multipage.py's): every turn before the
    last answer is the prompt (a dialogue keeps its earlier, reference answers), the last answer is the reference. The questions are used verbatim: the
    model was tuned on that wording."""
    sample = adapt_row(row, format="trl_messages", columns={}, origin=origin, image_root=image_root)
    assert isinstance(sample, SFTSample), "trl_messages rows adapt to SFT samples"
    *prompt, answer = sample.turns
    if answer.role != "assistant" or answer.num_images:
        raise DataError(
            origin, "messages", "bad eval row: the last turn must be a text-only assistant answer"
        )
    question = prompt[-1].text
    return EvalExample(
        id=str(origin.row),
        messages=tuple(to_messages(prompt)),
        images=sample.images,
        references=(answer.text,),
        origin=origin,
        meta={"kind": "multipage" if is_multipage_question(question) else question_task(question)},
    )


# ------------------------------------------------------------------------------------------------ scorers


def relaxed_accuracy_score(prediction: str, example: EvalExample) -> float:
    return metrics.relaxed_accuracy(prediction, example.references)


def anls_score(prediction: str, example: EvalExample) -> float:
    return metrics.anls(prediction, example.references)


def vqa_accuracy_score(prediction: str, example: EvalExample) -> float:
    return metrics.vqa_accuracy(prediction, example.references)


def multiple_choice_score(prediction: str, example: EvalExample) -> float:
    return metrics.multiple_choice_accuracy(prediction, example.meta["options"], example.meta["answer"])


def exact_match_score(prediction: str, example: EvalExample) -> float:
    return metrics.exact_match(prediction, example.references)


def pope_score(prediction: str, example: EvalExample) -> float:
    """1 when the answer reads as the label (POPE's own yes/no reading, `metrics.pope_answer`)."""
    return float(metrics.pope_answer(prediction) == example.references[0])


def pope_aggregate(predictions: Sequence[str], examples: Sequence[EvalExample], scores: Sequence[float]):
    return metrics.pope(predictions, [example.references[0] for example in examples])


# ------------------------------------------------------------------------------------------------ the tasks

TASKS: dict[str, Task] = {
    "chartqa": Task(
        name="chartqa",
        path="HuggingFaceM4/ChartQA",
        split="test",
        metrics=("relaxed_accuracy",),
        prompt="{query}\\nAnswer the question with a single word.  (lmms-eval chartqa, default post_prompt)",
        to_example=chartqa_example,
        score=relaxed_accuracy_score,
        aggregate=mean_score("relaxed_accuracy"),
    ),
    "docvqa": Task(
        name="docvqa",
        path="lmms-lab/DocVQA",
        config="DocVQA",
        split="validation",
        metrics=("anls",),
        prompt="{question}\\nAnswer the question using a single word or phrase.  (lmms-eval docvqa_val)",
        to_example=docvqa_example,
        score=anls_score,
        aggregate=mean_score("anls"),
    ),
    "textvqa": Task(
        name="textvqa",
        path="lmms-lab/textvqa",
        split="validation",
        metrics=("vqa_accuracy",),
        prompt="{question.capitalize()}\\nAnswer the question using a single word or phrase.  (lmms-eval textvqa_val)",
        to_example=textvqa_example,
        score=vqa_accuracy_score,
        aggregate=mean_score("vqa_accuracy"),
    ),
    "ai2d": Task(
        name="ai2d",
        path="lmms-lab/ai2d",
        split="test",
        metrics=("accuracy",),
        prompt="{question}\\nA. {option 0}\\nB. {option 1}...\\nAnswer with the option's letter from the given "
        "choices directly.  (lmms-eval ai2d, mcq format)",
        to_example=ai2d_example,
        score=multiple_choice_score,
        aggregate=mean_score("accuracy"),
    ),
    "scienceqa": Task(
        name="scienceqa",
        path="lmms-lab/ScienceQA",
        config="ScienceQA-IMG",
        split="test",
        metrics=("accuracy",),
        prompt="Context: {hint}\\n (when the hint is not empty){question}\\nA. {choice 0}\\nB. {choice 1}...\\n"
        "Answer with the option's letter from the given choices directly.  (lmms-eval scienceqa_img)",
        to_example=scienceqa_example,
        score=multiple_choice_score,
        aggregate=mean_score("accuracy"),
    ),
    "pope": Task(
        name="pope",
        path="lmms-lab/POPE",
        split="test",
        metrics=("accuracy", "precision", "recall", "f1", "yes_ratio"),
        ungated_metrics=frozenset({"yes_ratio"}),
        prompt="{question.strip()}\\nAnswer the question using a single word or phrase.  (lmms-eval pope)",
        to_example=pope_example,
        score=pope_score,
        aggregate=pope_aggregate,
    ),
    "synthetic": Task(
        name="synthetic",
        path=SYNTHETIC_DIR,
        split="train",
        data_file="sft_eval.jsonl",
        metrics=("exact_match",),
        prompt="the held-out conversation up to its last answer, verbatim (data.synthetic questions)",
        to_example=synthetic_example,
        score=exact_match_score,
        aggregate=mean_score("exact_match"),
    ),
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"eval task {name!r} is not known; eval.tasks takes names from {sorted(TASKS)}")
    return TASKS[name]


def resolve_tasks(
    names: Sequence[str], *, data: Any = None, paths: Mapping[str, str | Path] | None = None
) -> list[Task]:
    """The named tasks, each once. The synthetic task reads the directory of the recipe's synthetic source
    (`data.train`, a recipe DataSection) when one is named; `paths` ({task name: local path}) overrides any task."""
    paths = dict(paths or {})
    unknown = sorted(set(paths) - set(names))
    if unknown:
        raise ValueError(
            f"eval data paths are given for {unknown}, which are not among the tasks {list(names)}; "
            "drop those paths or add the tasks"
        )
    synthetic_paths = [source.path for source in getattr(data, "train", ()) if source.format == "synthetic"]
    if synthetic_paths and synthetic_paths[0]:
        paths.setdefault("synthetic", synthetic_paths[0])
    tasks = [get_task(name) for name in dict.fromkeys(names)]
    return [task.with_source(path=paths[task.name]) if task.name in paths else task for task in tasks]


# ------------------------------------------------------------------------------------------------ loading, scoring


def _data_path(task: Task) -> str:
    """The path load_rows reads: the task's `data_file` inside a dataset directory, else the path itself."""
    path = Path(task.path)
    if task.data_file is None or path.is_file():
        return task.path
    if not path.is_dir():
        raise ValueError(
            f"eval task {task.name}: {task.path} is not a directory holding {task.data_file}, so there "
            "is nothing to score; point the task at the dataset directory (the demo's sft stage writes "
            "the synthetic one)"
        )
    return str(path / task.data_file)


def _source(task: Task, limit: int | None) -> Source:
    # `format` is not read by load_rows; the row mapper is this task's own.
    return Source(
        format="vqa",
        path=_data_path(task),
        config=task.config,
        split=task.split,
        revision=task.revision,
        limit=limit,
    )


def load_examples(task: Task, *, limit: int | None = None) -> list[EvalExample]:
    """The task's first `limit` rows (all when None) as examples, in row order; a bad row raises its DataError."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"eval task {task.name}: limit must be a positive int or None, got {limit!r}")
    source = _source(task, limit)
    name, image_root = f"{task.name} ({source_name(source)})", image_root_of(source)
    examples = []
    for row_index, row in enumerate(load_rows(source)):
        origin = Origin(dataset=name, row=row_index)
        examples.append(task.to_example(apply_columns(row, task.columns, origin=origin), origin, image_root))
    if not examples:
        raise ValueError(
            f"eval task {task.name}: {source_name(source)} has no rows, so there is nothing to score; "
            "check the task's path and split"
        )
    return examples


def score_task(
    task: Task, examples: Sequence[EvalExample], predictions: Sequence[str]
) -> tuple[dict[str, float], list[float]]:
    """(the task's metrics, the per-example scores) of one prediction per example, in the same order."""
    if len(predictions) != len(examples):
        raise ValueError(
            f"eval task {task.name}: {len(predictions)} predictions for {len(examples)} examples; "
            "pass one prediction per example, in order"
        )
    scores = [task.score(prediction, example) for prediction, example in zip(predictions, examples)]
    values = task.aggregate(predictions, examples, scores)
    assert set(values) == set(task.metrics), (
        f"{task.name} aggregates {sorted(values)}, declares {task.metrics}"
    )
    return {metric: values[metric] for metric in task.metrics}, scores
