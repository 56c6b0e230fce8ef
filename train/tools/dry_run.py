"""Dry run of a recipe: validate it, then push one batch of fixture data per training stage through the tiny model.

    python -m train.dry_run recipes/chartqa.yaml [key=value ...]     # prints the summary as JSON; exit 1 on a problem
    summary = dry_run(load_recipe("recipes/chartqa.yaml"))

Nothing is downloaded or read from the recipe's sources. The model is the demo's tiny Phi-3-V
(`train.core.model_loading.build_tiny`, with the recipe's num_crops and seed) in the recipe's dtype; the data are rows built here
in each source's raw format, under the dataset's own column names (the source's `columns` renames applied in
reverse), with small PNGs drawn with PIL. Per training stage in `recipe.stages` (sft, dpo): the stage's sources are
adapted, planned and rendered under the recipe's max_length, on_overlong, on_bad_sample and assistant_turns, batched
by the stage's sampler and collator (data/loaders.py), and one forward and backward runs with the recipe's trained
parts and LoRA (DPO: `train.core.trainable.dpo_parts`) under its precision. The loss must be finite (SFT: `sft_loss_sum` per
supervised token; DPO: the recipe's preference losses per pair) and every trained part must get a finite, non-zero
gradient (`train.core.trainable.check_gradients`).

The recipe is validated as every entry point validates it (config/checks.py): data.max_length must hold the
smallest image the real model can take at the recipe's num_crops, eval tasks must exist, and so on.

With `model.quantization` the tiny model's language linears are quantised with bitsandbytes as the real run's are
(the summary gives the bytes of the quantised layers and of the rest). The optimizer is not built: `paged_adamw_8bit`
needs the run's CUDA device.

With `train.sequence_parallel: N` > 1 (one process here, so no sequence is really split) the summary gives the group
layout (processes must be a multiple of N; tokens a rank holds at data.max_length) and, per stage, how the fixture
batch's supervised positions fall on the N ranks' chunks (what each rank's loss sums). The split itself is checked
by tests/test_sequence_parallel*.py on CPU processes.

What a dry run cannot show: that the hub dataset really has the columns the recipe names, or that the real model
fits in memory (`python -m train.memory RECIPE --gpus N` estimates it).
"""

from __future__ import annotations

import dataclasses
import io
import json
import re
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from PIL import Image, ImageDraw

from config import ModelSection, Recipe, RecipeError, Source, load_recipe, recipe_help
from config.checks import recipe_problems
from data.adapters import VQA_ANSWER_COLUMNS, VQA_QUESTION_COLUMNS, adapt_row
from data.loaders import SYNTHETIC_FILES, loader_factory, plan, stage_sources
from data.sample import Origin, PreferenceSample, SFTSample
from data.sources import SkipCounter, source_name
from data.synthetic import write_synthetic
from models import DTYPES
from models.phi3v.sequence_parallel import SequenceParallel
from models.quantization import apply_quantization, weight_bytes
from runtime.user_errors import debug_requested
from train.core.device import set_threads
from train.core.losses import sft_loss_sum, supervised_positions, supervised_tokens
from train.core.model_loading import build_tiny
from train.core.trainable import (
    check_gradients,
    configure_trainable,
    dpo_parts,
    trainable_counts,
    trained_parts,
    upcast_trainable_,
)
from train.preference.stage_loss import DPOLoss, count_pairs
from train.rl.step import grpo_parts
from train.tools.dry_run_grpo import grpo_fixture_step

TRAINING_STAGES = ("sft", "dpo", "grpo")
FIXTURE_ROWS_PER_SOURCE = 2
# Row 0 of a source shows one image; row 1 shows two where the format holds several images per row.
MULTI_IMAGE_FORMATS = frozenset({"trl_messages", "llava", "sharegpt", "trl_preference"})
# (width, height, bar colour): landscape, portrait and wide pictures, so crop grids of several shapes occur.
FIXTURE_PICTURES = ((64, 48, "red"), (48, 64, "blue"), (80, 40, "green"))
# The smallest synthetic dataset write_synthetic makes; its first rows are image questions.
FIXTURE_SYNTHETIC_COUNTS = {
    "n_train": FIXTURE_ROWS_PER_SOURCE,
    "n_eval": 1,
    "n_pref_train": FIXTURE_ROWS_PER_SOURCE,
    "n_pref_eval": 1,
}
# VQA column layouts the adapter reads: ChartQA (query/label) and DocVQA/TextVQA (question/answers).
VQA_LAYOUTS = (("query", "label"), ("question", "answers"))

SYSTEM = "Answer briefly."
QUESTION = ("What colour is the bar?", "Which picture has the taller bar?")  # by number of images: 1, 2
ANSWER = ("red", "the first")
WRONG_ANSWER = ("blue", "the second")
FOLLOW_UP, FOLLOW_UP_ANSWER = "And what colour is it?", "red"


# ----------------------------------------------------------------------------------------------- fixture rows


def fixture_png(width: int, height: int, colour: str) -> bytes:
    """A white picture with one bar of `colour`, PNG-encoded."""
    image = Image.new("RGB", (width, height), "white")
    ImageDraw.Draw(image).rectangle((width // 4, height // 3, 3 * width // 4, height - 4), fill=colour)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def image_values(source: Source, folder: Path, count: int) -> list[Any]:
    """`count` images as the source's loader yields them: path strings relative to `folder` for a local .json/.jsonl
    file (rows name their image files), else HF-datasets image dicts with the bytes (hub and parquet datasets)."""
    pictures = [FIXTURE_PICTURES[k % len(FIXTURE_PICTURES)] for k in range(count)]
    if Path(source.path).suffix not in (".json", ".jsonl"):
        return [{"bytes": fixture_png(*picture), "path": None} for picture in pictures]
    values = []
    for k, picture in enumerate(pictures):
        relative = Path("images") / f"{k}.png"
        (folder / relative).parent.mkdir(parents=True, exist_ok=True)
        (folder / relative).write_bytes(fixture_png(*picture))
        values.append(str(relative))
    return values


def text_part(text: str) -> dict[str, str]:
    return {"type": "text", "text": text}


def trl_messages_row(images: list[Any]) -> dict[str, Any]:
    """TRL conversational rows; the two-image row adds a text-only second exchange (assistant_turns matters)."""
    n = len(images) - 1
    user = [{"type": "image"} for _ in images] + [text_part(QUESTION[n])]
    messages = [{"role": "user", "content": user}, {"role": "assistant", "content": [text_part(ANSWER[n])]}]
    if n:
        messages += [
            {"role": "user", "content": FOLLOW_UP},
            {"role": "assistant", "content": FOLLOW_UP_ANSWER},
        ]
    return {"messages": messages, "images": images}


def tagged_conversation(images: list[Any], human: str, assistant: str) -> list[dict[str, str]]:
    n = len(images) - 1
    return [
        {"from": human, "value": "<image>\n" * len(images) + QUESTION[n]},
        {"from": assistant, "value": ANSWER[n]},
    ]


def llava_row(images: list[Any]) -> dict[str, Any]:
    """LLaVA rows hold one image path, or a list of them."""
    return {
        "conversations": tagged_conversation(images, "human", "gpt"),
        "image": images[0] if len(images) == 1 else images,
    }


def sharegpt_row(images: list[Any]) -> dict[str, Any]:
    system = [{"from": "system", "value": SYSTEM}]
    return {"conversations": system + tagged_conversation(images, "user", "assistant"), "images": images}


def trl_preference_row(images: list[Any]) -> dict[str, Any]:
    n = len(images) - 1
    prompt = [{"role": "user", "content": [{"type": "image"} for _ in images] + [text_part(QUESTION[n])]}]
    return {
        "prompt": prompt,
        "images": images,
        "chosen": [{"role": "assistant", "content": [text_part(ANSWER[n])]}],
        "rejected": [{"role": "assistant", "content": [text_part(WRONG_ANSWER[n])]}],
    }


def rlaif_v_row(images: list[Any]) -> dict[str, Any]:
    """RLAIF-V rows: one image, a question, two free-text answers."""
    return {
        "image": images[0],
        "question": QUESTION[0],
        "chosen": f"The bar is {ANSWER[0]}.",
        "rejected": f"The bar is {WRONG_ANSWER[0]}.",
    }


ROW_BUILDERS: dict[str, Callable[[list[Any]], dict[str, Any]]] = {
    "trl_messages": trl_messages_row,
    "llava": llava_row,
    "sharegpt": sharegpt_row,
    "trl_preference": trl_preference_row,
    "rlaif_v": rlaif_v_row,
}


def vqa_row(index: int, image: Any, columns: Mapping[str, str]) -> dict[str, Any]:
    """Row 0 in ChartQA's layout (query, label), row 1 in DocVQA's (question, answers), each with a list of answers;
    a column the recipe's `columns` renames onto wins, as the raw rows then carry it under another name."""
    question, answers = VQA_LAYOUTS[index % len(VQA_LAYOUTS)]
    targets = set(columns.values())
    question = next((name for name in VQA_QUESTION_COLUMNS if name in targets), question)
    answers = next((name for name in VQA_ANSWER_COLUMNS if name in targets), answers)
    return {"image": image, question: QUESTION[0], answers: [ANSWER[0], ANSWER[0].upper()]}


def raw_row(canonical: dict[str, Any], columns: Mapping[str, str]) -> dict[str, Any]:
    """The row under the dataset's own names: `columns` maps raw -> canonical, so each canonical column moves back
    to its raw name. A renamed column the adapter does not read gets a placeholder value."""
    row = dict(canonical)
    for raw, name in columns.items():
        row[raw] = row.pop(name, "fixture value")
    return row


def canonical_rows(source: Source, folder: Path) -> list[dict[str, Any]]:
    rows = []
    for index in range(FIXTURE_ROWS_PER_SOURCE):
        count = index + 1 if source.format in MULTI_IMAGE_FORMATS else 1
        images = image_values(source, folder, count)
        if source.format == "vqa":
            rows.append(vqa_row(index, images[0], source.columns))
        else:
            rows.append(ROW_BUILDERS[source.format](images))
    return rows


def synthetic_rows(stage: str, folder: Path) -> tuple[str, list[dict[str, Any]], Path]:
    """(format, rows, image root) of a tiny synthetic dataset written under `folder`, as data.loaders.concrete reads it."""
    paths = write_synthetic(folder / "synthetic", seed=0, **FIXTURE_SYNTHETIC_COUNTS)
    file = getattr(paths, SYNTHETIC_FILES[(stage, "train")])
    rows = [json.loads(line) for line in file.read_text().splitlines()[:FIXTURE_ROWS_PER_SOURCE]]
    return ("trl_messages" if stage == "sft" else "trl_preference"), rows, paths.root


def source_samples(
    source: Source, index: int, stage: str, folder: Path
) -> list[SFTSample | PreferenceSample]:
    """The fixture rows of data.train.<index>, adapted as the training run adapts the real ones."""
    dataset = f"dry-run fixture of data.train.{index} ({source_name(source)})"
    if source.format == "synthetic":
        row_format, rows, image_root = synthetic_rows(stage, folder)
        columns: Mapping[str, str] = {}
    else:
        row_format, image_root, columns = source.format, folder, source.columns
        rows = [raw_row(row, columns) for row in canonical_rows(source, folder)]
    return [
        adapt_row(
            row,
            format=row_format,
            columns=columns,
            origin=Origin(dataset=dataset, row=k),
            image_root=image_root,
        )
        for k, row in enumerate(rows)
    ]


# ----------------------------------------------------------------------------------------------- one stage


class _Unwrapped:
    """The one accelerator call DPOLoss makes (unwrap_model): a dry run has no DDP or DeepSpeed wrapper. A real
    Accelerator is avoided on purpose: its process-wide state refuses a second precision in the same process."""

    @staticmethod
    def unwrap_model(model):
        return model


def first_batch(
    samples: Sequence[SFTSample | PreferenceSample], processor, recipe: Recipe, stage: str
) -> dict:
    """One batch of every planned sample, through the stage's sampler and collator (no worker processes)."""
    data = dataclasses.replace(recipe.data, num_workers=0)
    planned = plan(list(samples), processor, data, SkipCounter())
    make_loader, _ = loader_factory(
        planned,
        processor,
        data,
        stage=stage,
        micro_batch_size=len(planned),
        seed=recipe.seed,
        num_replicas=1,
        rank=0,
        share_prompt=recipe.dpo.share_prompt,
    )
    return next(iter(make_loader(0)))


def trainable_model(recipe: Recipe, parts: ModelSection):
    """The tiny model in the recipe's dtype, its language model quantised as the recipe says (QLoRA), with the
    recipe's trained parts and LoRA, fp32 where it trains."""
    model, processor = build_tiny(recipe.model, recipe.seed)
    model = apply_quantization(model.to(DTYPES[recipe.model.dtype]), recipe.model)
    model = configure_trainable(model, parts, recipe.lora)
    upcast_trainable_(model)
    model.train()
    return model, processor


def stage_loss(
    stage: str, recipe: Recipe, model, batch: dict, share_features: bool
) -> tuple[torch.Tensor, int]:
    """(mean loss, units): SFT per supervised token, DPO per pair, as the loop normalises them."""
    precision = torch.autocast("cpu", dtype=torch.bfloat16, enabled=recipe.train.precision == "bf16")
    with precision:
        if stage == "sft":
            loss_sum, _ = sft_loss_sum(model, batch)
            units = supervised_tokens(batch)
        else:
            loss_sum, _ = DPOLoss(recipe, _Unwrapped(), share_features=share_features)(model, batch)
            units = count_pairs(batch)
    return loss_sum / units, units


def check_finite_gradients(model) -> None:
    for name, param in model.named_parameters():
        if param.grad is not None and not bool(torch.isfinite(param.grad).all()):
            raise RuntimeError(
                f"dry run: the gradient of {name} is not finite (NaN or inf) after one backward"
            )


def run_stage(recipe: Recipe, stage: str, folder: Path) -> dict[str, Any]:
    """One batch of the stage's fixture rows, forward and backward; the stage's summary."""
    indexed = [
        (index, source) for index, source in enumerate(recipe.data.train) if stage_sources((source,), stage)
    ]
    samples = [
        sample for index, source in indexed for sample in source_samples(source, index, stage, folder / stage)
    ]
    parts = recipe.model if stage == "sft" else dpo_parts(recipe.model)
    model, processor = trainable_model(recipe, parts)
    batch = first_batch(samples, processor, recipe, stage)
    loss, units = stage_loss(stage, recipe, model, batch, share_features=parts.vision != "lora")
    if not bool(torch.isfinite(loss)):
        raise RuntimeError(f"dry run: the {stage} loss of the fixture batch is {float(loss)}, not finite")
    loss.backward()
    check_gradients(model, trained_parts(parts))
    check_finite_gradients(model)
    summary = {
        "sources": [
            {"format": s.format, "path": s.path, "fixture_rows": FIXTURE_ROWS_PER_SOURCE} for _, s in indexed
        ],
        "batch": {key: list(value.shape) for key, value in batch.items() if isinstance(value, torch.Tensor)},
        "supervised_tokens" if stage == "sft" else "pairs": units,
        "loss": round(loss.item(), 6),
        "trained_parts": sorted(trained_parts(parts)),
        "parameters": trainable_counts(model),
        "weight_bytes": weight_bytes(model),
    }
    if recipe.train.sequence_parallel > 1:
        summary["supervised_positions_per_rank"] = chunk_counts(batch, recipe.train.sequence_parallel)
    return summary


def chunk_counts(batch: dict, size: int) -> list[int]:
    """How many of the batch's supervised positions each rank of a group of `size` holds (SFT rows, or DPO's
    2B-row layout)."""
    keep = supervised_positions(batch["labels"])[0]
    return [int((SequenceParallel(None, size, rank).local_rows(keep) >= 0).sum()) for rank in range(size)]


def run_grpo_stage(recipe: Recipe, stage: str, folder: Path) -> dict[str, Any]:
    """GRPO's fixture prompts (its sources' rows, as SFT reads them): one generation, rewards, loss and backward
    (train/tools/dry_run_grpo.py); the stage's summary."""
    indexed = [
        (index, source) for index, source in enumerate(recipe.data.train) if stage_sources((source,), stage)
    ]
    samples = [
        sample for index, source in indexed for sample in source_samples(source, index, "sft", folder / stage)
    ]
    parts = grpo_parts(recipe.model)
    model, processor = trainable_model(recipe, parts)
    summary = grpo_fixture_step(recipe, samples, model, processor, parts)
    check_finite_gradients(model)
    return {
        "sources": [
            {"format": s.format, "path": s.path, "fixture_rows": FIXTURE_ROWS_PER_SOURCE} for _, s in indexed
        ],
        **summary,
        "parameters": trainable_counts(model),
        "weight_bytes": weight_bytes(model),
    }


def dry_run(recipe: Recipe) -> dict[str, Any]:
    """Validate `recipe` and run one fixture batch per training stage; the summary per stage (sources, batch
    shapes, units, loss, trained parts, trainable and total parameters per part). Raises RecipeError for an
    invalid recipe, DataError for fixture rows the recipe's formats or columns cannot read, RuntimeError for a
    non-finite loss or a trained part without gradient."""
    problems = recipe_problems(recipe)
    if problems:
        raise RecipeError("dry run", problems)
    started = time.perf_counter()
    stages = {}
    with tempfile.TemporaryDirectory(prefix="dry-run-") as tmp:
        for stage in (s for s in recipe.stages if s in TRAINING_STAGES):
            run = run_grpo_stage if stage == "grpo" else run_stage
            stages[stage] = run(recipe, stage, Path(tmp))
    return {
        "model": {
            "recipe": recipe.model.name_or_path,
            "dry_run": "tiny",
            "num_crops": recipe.model.num_crops,
            "dtype": recipe.model.dtype,
            "precision": recipe.train.precision,
            "quantization": recipe.model.quantization,
        },
        "stages": stages,
        **(
            {
                "sequence_parallel": {
                    "size": recipe.train.sequence_parallel,
                    "processes": f"a multiple of {recipe.train.sequence_parallel}",
                    "tokens_per_rank": -(-recipe.data.max_length // recipe.train.sequence_parallel),
                }
            }
            if recipe.train.sequence_parallel > 1
            else {}
        ),
        "not_run": [s for s in recipe.stages if s not in TRAINING_STAGES],
        "seconds": round(time.perf_counter() - started, 2),
    }


def cli(argv: list[str] | None = None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        print(recipe_help())
        raise SystemExit(0)
    recipe_path, overrides = argv[0], argv[1:]
    try:
        recipe = load_recipe(recipe_path, overrides)
        set_threads(recipe)
        summary = {"recipe": recipe_path, **dry_run(recipe)}
    except (ValueError, RuntimeError) as error:  # RecipeError and DataError are ValueErrors
        if debug_requested(sys.argv):
            raise
        print(f"dry run of {recipe_path} failed:\n{error}", file=sys.stderr)
        raise SystemExit(1) from error
    print(summary_json(summary))
    return summary


def summary_json(summary: dict[str, Any]) -> str:
    """Indented JSON with each list of integers or single words (a batch shape, part names) kept on one line."""
    text = json.dumps(summary, indent=1)
    return re.sub(r'\[(?:[\s,]|-?\d+|"\w+")*\]', lambda match: json.dumps(json.loads(match.group())), text)
