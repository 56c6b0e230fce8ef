"""Data pipeline: decode + crop + collate throughput through a DataLoader, and padding waste of the batch layouts.

    python benchmarks/data_pipeline.py            # 2,000 planned samples, 160 through each loader: ~1 min on 2 cores
    python benchmarks/data_pipeline.py --quick    # 400 planned samples, 48 through each loader: ~25 s

Everything is generated in-process into a temporary folder, deterministically from `--seed`: a pool of PNG/JPEG files
of a realistic size mix (phone photos, screenshots, charts, documents, thumbnails) and chat samples with realistic
text lengths (questions 5-60 words, answers 1-200 words, a quarter multi-turn, a tenth text-only), each image sample
pointing at a file of the pool. Tokens come from the real hub tokenizer when `$PHI3V_HUB_DIR` (default
`../shared/phi3v/hub`) holds `Phi-3-vision-128k-instruct`, else from the tiny in-process tokenizer
(`models.phi3v.tiny.build_tiny_tokenizer`; the header says which). Image geometry is the real model's (336/14).

1. **Loader throughput**: samples/s of `DataLoader(RenderedDataset(planned), batch_size, collate_fn=SFTCollator)`,
   i.e. render + decode the file + HD crops + collate, at num_workers 0 and 2 and num_crops 16 and 4. The time
   covers one pass over the samples, worker start-up included. Also the bytes of crops a batch moves: our uint8
   real crops vs the official layout (every image padded to num_crops + 1 float32 crops, docs/phi3v.md#hd-transform).
2. **Padding waste** (padding tokens / all tokens the model computes) of five layouts over the planned token
   lengths (image slots included, from the image headers): random batches (`data.samplers.ShuffledBatchSampler`),
   length-grouped batches (`data.samplers.LengthGroupedSampler`), token-budget batches padded (`SFTCollator`) and
   packed (`PackedSFTCollator`) (`token_budget_batches` below), and what `data.loaders.loader_factory` runs
   with `data.packing` (`PackedBatchSampler`, one pack per max_length). Each batch goes through the real collator
   (rows of the planned lengths), so the computed tokens are the collated tensor's size, not a formula. Fill = real
   tokens per batch / the tokens the batch must be provisioned for (batch x max_length, or the token budget).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import PIL
import torch
import transformers
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader

from data.collate import PackedSFTCollator, RenderedDataset, SFTCollator
from data.length import PlannedSample, plan_lengths
from data.render import IGNORE_INDEX
from data.sample import ImagePart, ImageRef, Origin, SFTSample, TextPart, Turn
from data.samplers import LengthGroupedSampler, PackedBatchSampler, ShuffledBatchSampler
from data.sources import SkipCounter
from models.phi3v import Phi3VImageProcessor, Phi3VProcessor
from models.phi3v.tiny import build_tiny_tokenizer

REPO = Path(__file__).resolve().parents[1]
HUB_DIR = Path(os.environ.get("PHI3V_HUB_DIR", REPO.parent / "shared" / "phi3v" / "hub"))
HUB_MODEL = "Phi-3-vision-128k-instruct"
CROP_SIZE = 336  # px, the real CLIP input; patch size 14 is Phi3VImageProcessor's default
CROP_BYTES_UINT8 = 3 * CROP_SIZE * CROP_SIZE
NUM_CROPS = (16, 4)
NUM_WORKERS = (0, 2)

# ------------------------------------------------------------------------------------------------ images


def draw_photo(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A smooth scene (a 12x9 colour field upscaled) plus luminance noise: JPEG size (~2.6 MB at 12 MP, quality 90)
    and decode time close to a phone photo's; pure noise would be 3x larger, a flat image 50x smaller."""
    field = rng.integers(0, 256, (9, 12, 3), dtype=np.uint8)
    scene = np.asarray(
        Image.fromarray(field).resize((width, height), Image.Resampling.BICUBIC), dtype=np.int16
    )
    noise = rng.integers(-10, 11, (height, width, 1), dtype=np.int16)
    return Image.fromarray(np.clip(scene + noise, 0, 255).astype(np.uint8))


def draw_text_lines(
    draw: ImageDraw.ImageDraw,
    rng: np.random.Generator,
    box: tuple[int, int, int, int],
    line_height: int,
    colour: tuple[int, int, int],
) -> None:
    """Lines of word-shaped blocks filling `box` (left, top, right, bottom): the flat, edge-rich look of text."""
    left, top, right, bottom = box
    char_width = max(1, line_height // 2)
    for y in range(top, bottom - line_height, line_height):
        x = left
        while x < right:
            word_width = int(rng.integers(2, 10)) * char_width
            draw.rectangle((x, y, min(x + word_width, right), y + line_height * 6 // 10), fill=colour)
            x += word_width + char_width


def draw_screenshot(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A UI: title bar, sidebar, panels of text on a light background."""
    image = Image.new("RGB", (width, height), (246, 247, 249))
    draw = ImageDraw.Draw(image)
    bar = max(8, height // 20)
    draw.rectangle((0, 0, width, bar), fill=tuple(int(c) for c in rng.integers(30, 90, 3)))
    sidebar = width // 5
    draw.rectangle((0, bar, sidebar, height), fill=(228, 231, 236))
    draw_text_lines(draw, rng, (8, bar + 8, sidebar - 8, height), max(6, height // 40), (90, 90, 100))
    for top in range(bar + 16, height - 40, height // 3):
        draw.rectangle(
            (sidebar + 16, top, width - 16, top + height // 3 - 16),
            fill=(255, 255, 255),
            outline=(210, 210, 215),
        )
        draw_text_lines(
            draw,
            rng,
            (sidebar + 32, top + 16, width - 32, top + height // 3 - 32),
            max(6, height // 60),
            (40, 40, 45),
        )
    return image


def draw_chart(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A bar chart: title, grid, axes, coloured bars, axis labels."""
    image = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = width // 8, height // 8, width - width // 16, height - height // 8
    draw_text_lines(
        draw, rng, (width // 4, top // 4, width * 3 // 4, top), max(6, height // 30), (20, 20, 20)
    )
    for y in np.linspace(top, bottom, 6).astype(int):
        draw.line((left, int(y), right, int(y)), fill=(220, 220, 220), width=1)
    draw.line((left, top, left, bottom), fill=(0, 0, 0), width=2)
    draw.line((left, bottom, right, bottom), fill=(0, 0, 0), width=2)
    num_bars = int(rng.integers(4, 13))
    slot = (right - left) // num_bars
    for k in range(num_bars):
        bar_top = int(bottom - rng.uniform(0.1, 1.0) * (bottom - top))
        colour = tuple(int(c) for c in rng.integers(40, 220, 3))
        draw.rectangle(
            (left + k * slot + slot // 5, bar_top, left + (k + 1) * slot - slot // 5, bottom), fill=colour
        )
    draw_text_lines(draw, rng, (left, bottom + 8, right, height), max(6, height // 40), (60, 60, 60))
    return image


def draw_document(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A page: heading, paragraphs and a ruled table, on white with margins."""
    image = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    margin, line = width // 10, max(6, height // 90)
    draw_text_lines(draw, rng, (margin, margin, width // 2, margin + 3 * line), 2 * line, (0, 0, 0))
    table_top, table_bottom = height // 2, height // 2 + height // 6
    draw_text_lines(
        draw, rng, (margin, margin + 4 * line, width - margin, table_top - line), line, (30, 30, 30)
    )
    for y in np.linspace(table_top, table_bottom, 7).astype(int):
        draw.line((margin, int(y), width - margin, int(y)), fill=(0, 0, 0), width=max(1, width // 800))
    draw_text_lines(
        draw, rng, (margin, table_bottom + 2 * line, width - margin, height - margin), line, (30, 30, 30)
    )
    return image


@dataclass(frozen=True, kw_only=True)
class ImageKind:
    name: str
    sizes: tuple[tuple[int, int], ...]
    """(width, height) in pixels, cycled through as the pool is written."""
    file_format: str
    share: float
    """Fraction of the image samples that use this kind."""
    draw: Callable[[np.random.Generator, int, int], Image.Image]


# Sizes as they reach a training set: 12 MP phone photos (and a messenger-compressed one), desktop and phone
# screenshots, chart exports (ChartQA-like), letter/A4 pages at 100-300 dpi (DocVQA-like), web thumbnails.
KINDS = (
    ImageKind(
        name="phone photo",
        sizes=((4032, 3024), (3024, 4032), (4000, 3000), (1600, 1200)),
        file_format="JPEG",
        share=0.25,
        draw=draw_photo,
    ),
    ImageKind(
        name="screenshot",
        sizes=((1920, 1080), (2560, 1440), (1170, 2532), (1280, 800)),
        file_format="PNG",
        share=0.20,
        draw=draw_screenshot,
    ),
    ImageKind(
        name="chart",
        sizes=((800, 600), (1000, 700), (640, 480), (1200, 800)),
        file_format="PNG",
        share=0.25,
        draw=draw_chart,
    ),
    ImageKind(
        name="document",
        sizes=((1700, 2200), (2480, 3508), (850, 1100), (1654, 2339)),
        file_format="PNG",
        share=0.20,
        draw=draw_document,
    ),
    ImageKind(
        name="thumbnail",
        sizes=((224, 224), (320, 240), (150, 150), (336, 336)),
        file_format="JPEG",
        share=0.10,
        draw=draw_photo,
    ),
)
FILE_SUFFIX = {"JPEG": ".jpg", "PNG": ".png"}


def write_image_pool(root: Path, images_per_kind: int, seed: int) -> dict[str, list[Path]]:
    """`images_per_kind` files of every kind under `root`, named by kind and index; {kind name: paths}."""
    rng = np.random.default_rng(seed)
    pool: dict[str, list[Path]] = {}
    for kind in KINDS:
        paths = []
        for k in range(images_per_kind):
            width, height = kind.sizes[k % len(kind.sizes)]
            path = root / f"{kind.name.replace(' ', '_')}_{k:02d}{FILE_SUFFIX[kind.file_format]}"
            kind.draw(rng, width, height).save(path, format=kind.file_format, quality=90)
            paths.append(path)
        pool[kind.name] = paths
    return pool


# ------------------------------------------------------------------------------------------------ chat samples

WORDS = tuple(
    "the a of to and in is what which how many much value chart shows total percent year between highest lowest "
    "average difference page document table row column section date invoice amount name address number figure "
    "screen button menu settings click open window error message photo image left right top bottom colour red "
    "blue green person people car street building sign text label axis legend bar line trend increase decrease "
    "compared first second third last 2019 2020 2021 2022 2023 12 45 3.5 78% $1,200 approximately because "
    "therefore shown above below it this that there are was were has have with for on by from as at".split()
)
TEXT_ONLY_SHARE = 0.10
MULTI_TURN_SHARE = 0.25
SHORT_ANSWER_SHARE = 0.35  # VQA-style answers of 1-4 words; the rest are explanations and descriptions


def lognormal_words(rng: np.random.Generator, median: float, sigma: float, low: int, high: int) -> int:
    return int(np.clip(round(rng.lognormal(np.log(median), sigma)), low, high))


def sentence(rng: np.random.Generator, num_words: int, end: str) -> str:
    words = rng.choice(WORDS, num_words).tolist()
    return " ".join([words[0].capitalize(), *words[1:]]) + end


def question_text(rng: np.random.Generator) -> str:
    return sentence(rng, lognormal_words(rng, median=14, sigma=0.6, low=5, high=60), "?")


def answer_text(rng: np.random.Generator) -> str:
    if rng.random() < SHORT_ANSWER_SHARE:
        return sentence(rng, int(rng.integers(1, 5)), "")
    return sentence(rng, lognormal_words(rng, median=40, sigma=0.9, low=1, high=200), ".")


def pick_image(rng: np.random.Generator, pool: Mapping[str, Sequence[Path]]) -> Path:
    kind = KINDS[rng.choice(len(KINDS), p=[kind.share for kind in KINDS])]
    files = pool[kind.name]
    return files[int(rng.integers(len(files)))]


def make_sample(rng: np.random.Generator, row: int, pool: Mapping[str, Sequence[Path]]) -> SFTSample:
    """One conversation: 1 round, or 2-4 rounds for MULTI_TURN_SHARE; the image (if any) opens the first question."""
    rounds = int(rng.integers(2, 5)) if rng.random() < MULTI_TURN_SHARE else 1
    image = None if rng.random() < TEXT_ONLY_SHARE else pick_image(rng, pool)
    turns = []
    for r in range(rounds):
        image_parts = (ImagePart(),) if r == 0 and image is not None else ()
        turns.append(Turn(role="user", parts=(*image_parts, TextPart(question_text(rng)))))
        turns.append(Turn(role="assistant", parts=(TextPart(answer_text(rng)),)))
    images = (ImageRef(path=image),) if image is not None else ()
    return SFTSample(turns=tuple(turns), images=images, origin=Origin(dataset="bench", row=row))


def make_samples(count: int, pool: Mapping[str, Sequence[Path]], seed: int) -> list[SFTSample]:
    rng = np.random.default_rng([seed, 1])
    return [make_sample(rng, row, pool) for row in range(count)]


# ------------------------------------------------------------------------------------------------ processor


def load_tokenizer(samples: Sequence[SFTSample]) -> tuple[transformers.PreTrainedTokenizerBase, str]:
    """The real hub tokenizer when its files are here, else the tiny one trained on the samples' text."""
    folder = HUB_DIR / HUB_MODEL
    if (folder / "tokenizer.json").is_file():
        return Phi3VProcessor.from_pretrained(folder).tokenizer, f"real hub tokenizer from {folder}"
    texts = [turn.text for sample in samples for turn in sample.turns]
    note = (
        f"TINY tokenizer (models.phi3v.tiny.build_tiny_tokenizer, BPE vocab 512 trained on the samples): "
        f"{folder} not found; text token counts differ from the real model's"
    )
    return build_tiny_tokenizer(texts), note


def processor_for(tokenizer: transformers.PreTrainedTokenizerBase, num_crops: int) -> Phi3VProcessor:
    return Phi3VProcessor(Phi3VImageProcessor(num_crops=num_crops), tokenizer)


@dataclass(frozen=True, kw_only=True)
class Plan:
    planned: list[PlannedSample]
    num_dropped: int
    seconds: float

    @property
    def lengths(self) -> list[int]:
        return [p.num_tokens for p in self.planned]


def plan(samples: Sequence[SFTSample], processor: Phi3VProcessor, max_length: int) -> Plan:
    """Token lengths from the image headers and one tokenisation per sample; over-long samples are dropped."""
    start = time.perf_counter()
    planned = plan_lengths(samples, processor, max_length=max_length, on_overlong="drop", skips=SkipCounter())
    return Plan(planned=planned, num_dropped=len(samples) - len(planned), seconds=time.perf_counter() - start)


# ------------------------------------------------------------------------------------------------ 1. loader


@dataclass(frozen=True, kw_only=True)
class LoaderRun:
    num_samples: int
    num_images: int
    num_batches: int
    num_crops_moved: int
    seconds: float


def run_loader(
    planned: Sequence[PlannedSample], processor: Phi3VProcessor, batch_size: int, num_workers: int
) -> LoaderRun:
    """One pass of the training-style loader, timed from iter() (worker start-up included) to the last batch."""
    loader = DataLoader(
        RenderedDataset(planned, processor),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=SFTCollator(pad_token_id=processor.tokenizer.pad_token_id),
    )
    num_images = num_batches = num_crops_moved = 0
    start = time.perf_counter()
    for batch in loader:
        num_batches += 1
        if "image_sizes" in batch:
            num_images += batch["image_sizes"].shape[0]
            num_crops_moved += batch["pixel_values"].shape[0]
    return LoaderRun(
        num_samples=len(planned),
        num_images=num_images,
        num_batches=num_batches,
        num_crops_moved=num_crops_moved,
        seconds=time.perf_counter() - start,
    )


def print_loader_table(runs: Sequence[tuple[int, int, LoaderRun]]) -> None:
    print(
        f"{'num_crops':>9} {'workers':>7} {'samples/s':>9} {'images/s':>8} {'crops/img':>9} "
        f"{'uint8 MB/batch':>14} {'official MB/batch':>17} {'ratio':>6}"
    )
    for num_crops, num_workers, run in runs:
        ours_mb = run.num_crops_moved * CROP_BYTES_UINT8 / 1e6 / run.num_batches
        # Official: (num_images, num_crops + 1, 3, 336, 336) float32, padding crops included.
        official_mb = run.num_images * (num_crops + 1) * CROP_BYTES_UINT8 * 4 / 1e6 / run.num_batches
        print(
            f"{num_crops:>9} {num_workers:>7} {run.num_samples / run.seconds:>9.1f} "
            f"{run.num_images / run.seconds:>8.1f} {run.num_crops_moved / run.num_images:>9.2f} "
            f"{ours_mb:>14.1f} {official_mb:>17.1f} {official_mb / ours_mb:>5.1f}x"
        )


# ------------------------------------------------------------------------------------------------ 2. padding


@dataclass(frozen=True, kw_only=True)
class Layout:
    name: str
    batches: list[list[int]]
    collate: Callable[[list[dict]], dict]
    capacity_tokens: int
    """Tokens one batch must be provisioned for: batch x max_length, or the token budget."""


@dataclass(frozen=True, kw_only=True)
class LayoutStats:
    num_batches: int
    num_samples: int
    computed_tokens: int
    """Size of the collated input_ids over all batches: real tokens plus padding."""
    real_tokens: int


def token_budget_batches(lengths: Sequence[int], max_tokens: int, seed: int) -> list[list[int]]:
    """Batches of sample indices whose padded cost `len(batch) * longest sample` is at most `max_tokens`.

    Indices are shuffled (seeded), sorted by length (stable, longest first) and filled greedily, so each batch holds
    samples of similar length; the batches are then shuffled. Every index appears exactly once. A sample longer than
    `max_tokens` raises: it fits no batch.
    """
    values = [int(length) for length in lengths]
    too_long = [i for i, length in enumerate(values) if length > max_tokens]
    if too_long:
        raise ValueError(
            f"{len(too_long)} sample(s) exceed max_tokens={max_tokens}, e.g. index {too_long[0]} with "
            f"{values[too_long[0]]} tokens; raise max_tokens to at least data.max_length"
        )
    rng = np.random.default_rng(seed)
    order = sorted(rng.permutation(len(values)).tolist(), key=lambda i: -values[i])
    batches: list[list[int]] = []
    for i in order:
        # The batch's first index is its longest sample: the order is longest first.
        if batches and (len(batches[-1]) + 1) * values[batches[-1][0]] <= max_tokens:
            batches[-1].append(i)
        else:
            batches.append([i])
    return [batches[b] for b in rng.permutation(len(batches))]


def layouts(
    lengths: list[int], batch_size: int, token_budget: int, max_length: int, pad_token_id: int, seed: int
) -> list[Layout]:
    padded, packed = SFTCollator(pad_token_id=pad_token_id), PackedSFTCollator(max_tokens=token_budget)
    budget_batches = token_budget_batches(lengths, token_budget, seed)
    return [
        Layout(
            name=f"random, batch {batch_size}",
            collate=padded,
            capacity_tokens=batch_size * max_length,
            batches=list(ShuffledBatchSampler(len(lengths), batch_size, seed)),
        ),
        Layout(
            name=f"length-grouped, batch {batch_size}",
            collate=padded,
            capacity_tokens=batch_size * max_length,
            batches=list(LengthGroupedSampler(lengths, batch_size, seed, drop_last=True)),
        ),
        Layout(
            name=f"token budget {token_budget}, padded",
            collate=padded,
            capacity_tokens=token_budget,
            batches=budget_batches,
        ),
        Layout(
            name=f"token budget {token_budget}, packed",
            collate=packed,
            capacity_tokens=token_budget,
            batches=budget_batches,
        ),
        Layout(
            name=f"packed per max_length {max_length}",
            collate=PackedSFTCollator(max_tokens=max_length),
            capacity_tokens=max_length,
            batches=list(PackedBatchSampler(lengths, max_length, seed)),
        ),
    ]


def measure_layout(layout: Layout, lengths: Sequence[int], pad_token_id: int) -> LayoutStats:
    """Collate every batch from rows of the planned lengths and count what the model would compute."""
    computed = real = samples = 0
    for indices in layout.batches:
        rows = [
            {"input_ids": [pad_token_id] * lengths[i], "labels": [IGNORE_INDEX] * lengths[i]} for i in indices
        ]
        computed += layout.collate(rows)["input_ids"].numel()
        real += sum(lengths[i] for i in indices)
        samples += len(indices)
    return LayoutStats(
        num_batches=len(layout.batches), num_samples=samples, computed_tokens=computed, real_tokens=real
    )


def print_length_summary(num_crops: int, result: Plan) -> None:
    lengths = result.lengths
    image_tokens = sum(sum(p.image_token_counts) for p in result.planned)
    p10, p50, p90 = np.percentile(lengths, [10, 50, 90]).round().astype(int)
    print(
        f"num_crops {num_crops}: {len(lengths)} samples kept, {result.num_dropped} over max_length dropped; "
        f"planned in {result.seconds:.2f} s ({len(lengths) / result.seconds:.0f} samples/s, headers only); "
        f"tokens/sample p10 {p10}, p50 {p50}, p90 {p90}, max {max(lengths)}; "
        f"image slots {image_tokens / sum(lengths):.0%} of all tokens"
    )


def print_padding_table(num_crops: int, rows: Sequence[tuple[Layout, LayoutStats]]) -> None:
    print(
        f"{'num_crops':>9} {'layout':<34} {'batches':>7} {'samples/batch':>13} {'tokens/batch':>12} "
        f"{'padding waste':>13} {'capacity':>8} {'fill':>5}"
    )
    for layout, stats in rows:
        waste = (stats.computed_tokens - stats.real_tokens) / stats.computed_tokens
        fill = stats.real_tokens / stats.num_batches / layout.capacity_tokens
        print(
            f"{num_crops:>9} {layout.name:<34} {stats.num_batches:>7} {stats.num_samples / stats.num_batches:>13.2f} "
            f"{stats.computed_tokens / stats.num_batches:>12.0f} {waste:>13.1%} {layout.capacity_tokens:>8} "
            f"{fill:>5.0%}"
        )


# ------------------------------------------------------------------------------------------------ main


@dataclass(frozen=True, kw_only=True)
class Sizes:
    samples: int
    """Samples planned for the padding tables."""
    loader_samples: int
    """The first planned samples pushed through each DataLoader."""
    images_per_kind: int
    """Files written per image kind (each kind cycles through its 4 sizes)."""


FULL = Sizes(samples=2000, loader_samples=160, images_per_kind=8)
QUICK = Sizes(samples=400, loader_samples=48, images_per_kind=4)


def parse_args() -> tuple[argparse.Namespace, Sizes]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help=f"smaller run: {QUICK}")
    parser.add_argument(
        "--samples", type=int, help=f"samples planned for the padding tables (default {FULL.samples})"
    )
    parser.add_argument(
        "--loader-samples", type=int, help=f"samples through each DataLoader (default {FULL.loader_samples})"
    )
    parser.add_argument(
        "--images-per-kind", type=int, help=f"image files per kind (default {FULL.images_per_kind})"
    )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument(
        "--max-length", type=int, default=4096, help="data.max_length: longer samples are dropped"
    )
    parser.add_argument(
        "--token-budget", type=int, help="tokens per token-budget batch (default batch x max_length)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--padding-only", action="store_true", help="only part 2 (exact; no image decoding timed)"
    )
    args = parser.parse_args()
    sizes = QUICK if args.quick else FULL
    sizes = replace(
        sizes,
        **{
            field: getattr(args, field)
            for field in ("samples", "loader_samples", "images_per_kind")
            if getattr(args, field) is not None
        },
    )
    args.token_budget = args.token_budget or args.batch_size * args.max_length
    for name, value in (
        ("--samples", sizes.samples),
        ("--loader-samples", sizes.loader_samples),
        ("--images-per-kind", sizes.images_per_kind),
        ("--batch-size", args.batch_size),
    ):
        if value < 1:
            parser.error(f"{name} must be >= 1, got {value}")
    if sizes.loader_samples > sizes.samples:
        parser.error(f"--loader-samples ({sizes.loader_samples}) cannot exceed --samples ({sizes.samples})")
    if args.token_budget < args.max_length:
        parser.error(
            f"--token-budget ({args.token_budget}) must hold one sample of --max-length ({args.max_length})"
        )
    return args, sizes


def print_header(sizes: Sizes, tokenizer_note: str, load_at_start: tuple[float, float, float]) -> None:
    print(f"# data pipeline benchmark, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
    print(f"command: {shlex.join([sys.executable, *sys.argv])}  (cwd {Path.cwd()})")
    print(
        f"machine: {platform.platform()}, {platform.machine()}, {os.cpu_count()} CPUs "
        f"({len(os.sched_getaffinity(0))} usable); python {platform.python_version()}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}, pillow {PIL.__version__}, numpy {np.__version__}"
    )
    # Throughput is only comparable between runs on an otherwise idle machine; the load says whether it was.
    print(f"load average at start (1/5/15 min): {'/'.join(f'{load:.2f}' for load in load_at_start)}")
    print(f"tokenizer: {tokenizer_note}")
    print(f"sizes: {sizes}")


def print_data_summary(samples: Sequence[SFTSample], pool: Mapping[str, Sequence[Path]]) -> None:
    kind_of = {path: name for name, paths in pool.items() for path in paths}
    counts = {kind.name: 0 for kind in KINDS}
    for sample in samples:
        for ref in sample.images:
            counts[kind_of[ref.path]] += 1
    text_only = sum(not sample.images for sample in samples)
    multi_turn = sum(len(sample.turns) > 2 for sample in samples)
    disk_mb = sum(path.stat().st_size for paths in pool.values() for path in paths) / 1e6
    print(
        f"data: {len(samples)} samples, {text_only / len(samples):.0%} text-only, "
        f"{multi_turn / len(samples):.0%} multi-turn; images by kind {counts}; "
        f"pool of {len(kind_of)} files, {disk_mb:.0f} MB on disk"
    )


def main() -> None:
    # The DataLoader forks workers after the tokenizer has run; HF tokenizers would warn and turn its threads off.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    load_at_start = os.getloadavg()
    args, sizes = parse_args()
    with tempfile.TemporaryDirectory(prefix="data_pipeline_bench_") as tmp:
        pool = write_image_pool(Path(tmp), sizes.images_per_kind, args.seed)
        samples = make_samples(sizes.samples, pool, args.seed)
        tokenizer, tokenizer_note = load_tokenizer(samples)
        print_header(sizes, tokenizer_note, load_at_start)
        print_data_summary(samples, pool)
        plans = {n: plan(samples, processor_for(tokenizer, n), args.max_length) for n in NUM_CROPS}

        if args.padding_only:
            print("\n## 1. decode + crop + collate: not run (--padding-only)")
        loader_planned = {n: plans[n].planned[: sizes.loader_samples] for n in NUM_CROPS}
        if not any(p.image_token_counts for p in loader_planned[NUM_CROPS[0]]):
            sys.exit(
                f"the first {sizes.loader_samples} samples are all text-only, so there are no crops to "
                "measure; raise --loader-samples"
            )
        if not args.padding_only:
            print(
                f"\n## 1. decode + crop + collate: DataLoader(RenderedDataset, batch_size={args.batch_size}, "
                f"collate_fn=SFTCollator), {sizes.loader_samples} samples per run"
            )
            runs = [
                (
                    n,
                    workers,
                    run_loader(loader_planned[n], processor_for(tokenizer, n), args.batch_size, workers),
                )
                for n in NUM_CROPS
                for workers in NUM_WORKERS
            ]
            print_loader_table(runs)

        print(
            f"\n## 2. padding waste over planned token lengths (max_length {args.max_length}, seed {args.seed})"
        )
        for n in NUM_CROPS:
            print_length_summary(n, plans[n])
        for n in NUM_CROPS:
            lengths = plans[n].lengths
            chosen = layouts(
                lengths,
                args.batch_size,
                args.token_budget,
                args.max_length,
                tokenizer.pad_token_id,
                args.seed,
            )
            print_padding_table(
                n, [(layout, measure_layout(layout, lengths, tokenizer.pad_token_id)) for layout in chosen]
            )


if __name__ == "__main__":
    main()
