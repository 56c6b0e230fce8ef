"""See exactly what the model is trained on: rendered samples with image slots collapsed and supervised spans marked.

    python -m data.inspect recipes/demo.yaml --n 3
    python -m data.inspect recipes/chartqa.yaml --n 20 --html /tmp/chartqa.html data.assistant_turns=last

For the first `--n` samples of each of the recipe's `data.train` sources (read as the SFT stage reads them, then
as the DPO stage does; a `synthetic` source feeds both) this prints the rendered token stream:
special tokens as they are (`<s>`, `<|user|>`, `<|end|>`), `▁` as a space, each image's run of slots as
`<image 1: 3x5 crops, 2353 tokens>`, and every supervised span wrapped in ⟦ ⟧; then the token counts (all, image,
supervised). `--html` also writes a page with each sample's images (embedded as base64 PNG) beside its text,
supervised spans highlighted. Trailing `key=value` arguments override recipe keys, as for training.

Rows are read with `on_bad_sample: skip` whatever the recipe says, and a sample that cannot be planned is shown with
its error, so one bad row does not hide the others; a sample over `data.max_length` is shown and flagged.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import itertools
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from data.images import DEFAULT_MAX_PIXELS, load_rgb
from data.length import PlannedSample, plan_sample
from data.render import IGNORE_INDEX, AssistantTurns, render_preference, render_sft
from data.sample import DataError, ImageRef, Origin, SFTSample
from models.phi3v.image_processing import crop_grid
from models.phi3v.processing import Phi3VProcessor

SegmentKind = Literal["prompt", "supervised", "image"]
BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")
THUMBNAIL_PIXELS = 384
"""Longest side of an image in the HTML page, in pixels."""


@dataclass(frozen=True, kw_only=True)
class Segment:
    text: str
    kind: SegmentKind


@dataclass(frozen=True, kw_only=True)
class InspectedSample:
    origin: Origin
    title: str
    sections: tuple[tuple[str, tuple[Segment, ...]], ...]
    """(name, segments): the whole conversation for SFT; prompt, chosen, rejected (and rejected prompt) for a pair."""
    images: tuple[tuple[str, ImageRef], ...]
    """(field, image) in display order: `images[k]`, then an image-contrast pair's `rejected_images[k]`."""


# ------------------------------------------------------------------------------------------------ token stream


def tokens_to_text(tokens: Sequence[str]) -> str:
    """Tokens as text: `▁` -> space, byte-fallback tokens `<0xNN>` joined and decoded as UTF-8, others verbatim."""
    out, pending = [], bytearray()
    for token in tokens:
        byte = BYTE_TOKEN.fullmatch(token)
        if byte:
            pending.append(int(byte.group(1), 16))
            continue
        if pending:
            out.append(pending.decode("utf-8", errors="replace"))
            pending.clear()
        out.append(token.replace("▁", " "))
    if pending:
        out.append(pending.decode("utf-8", errors="replace"))
    return "".join(out)


def image_label(k: int, num_tokens: int, size: tuple[int, int], processor: Phi3VProcessor) -> str:
    image_processor = processor.image_processor
    rows, cols = crop_grid(*size, image_processor.num_crops, image_processor.crop_size)
    return f"<image {k + 1}: {rows}x{cols} crops, {num_tokens} tokens>"


def segments(
    processor: Phi3VProcessor,
    input_ids: Sequence[int],
    labels: Sequence[int],
    image_token_counts: Sequence[int],
    image_sizes: Sequence[tuple[int, int]],
    first_image: int = 0,
) -> tuple[Segment, ...]:
    """The ids as text segments: runs of unsupervised and supervised tokens, and one segment per image.

    Image k's slots are the k-th run of `image_token_counts[k]` image ids; `image_sizes` are (width, height);
    `first_image` is how many images were shown before these ids (a rejected prompt's images follow the prompt's)."""
    tokens = processor.tokenizer.convert_ids_to_tokens(list(input_ids))
    out: list[Segment] = []
    position, k = 0, 0
    while position < len(input_ids):
        if input_ids[position] == processor.image_token_id:
            count = image_token_counts[k]
            label = image_label(first_image + k, count, image_sizes[k], processor)
            out.append(Segment(text=label, kind="image"))
            position, k = position + count, k + 1
            continue
        kind: SegmentKind = "prompt" if labels[position] == IGNORE_INDEX else "supervised"
        end = position
        while (
            end < len(input_ids)
            and input_ids[end] != processor.image_token_id
            and (labels[end] == IGNORE_INDEX) == (kind == "prompt")
        ):
            end += 1
        out.append(Segment(text=tokens_to_text(tokens[position:end]), kind=kind))
        position = end
    return tuple(out)


def _counts_line(ids: Sequence[int], labels: Sequence[int], processor: Phi3VProcessor) -> str:
    image_tokens = sum(token == processor.image_token_id for token in ids)
    supervised = sum(label != IGNORE_INDEX for label in labels)
    return (
        f"{len(ids)} tokens ({image_tokens} image, {len(ids) - image_tokens} text), {supervised} supervised"
    )


def inspect_sample(
    plan: PlannedSample,
    processor: Phi3VProcessor,
    *,
    assistant_turns: AssistantTurns = "all",
    max_length: int | None = None,
) -> InspectedSample:
    """One planned sample rendered for reading (the same `data.render` calls as training)."""
    sample = plan.sample
    over = (
        f", OVER max_length={max_length}" if max_length is not None and plan.num_tokens > max_length else ""
    )
    if isinstance(sample, SFTSample):
        rendered = render_sft(sample, processor, plan.image_token_counts, assistant_turns=assistant_turns)
        body = segments(
            processor, rendered.input_ids, rendered.labels, plan.image_token_counts, plan.image_sizes
        )
        title = f"{sample.origin}: {_counts_line(rendered.input_ids, rendered.labels, processor)}{over}"
        return InspectedSample(
            origin=sample.origin,
            title=title,
            sections=(("conversation", body),),
            images=_fields("images", sample.images),
        )
    pair = render_preference(sample, processor, plan.image_token_counts, plan.rejected_image_token_counts)
    prompt_labels = [IGNORE_INDEX] * len(pair.prompt_ids)
    sections = [
        (
            "prompt",
            segments(processor, pair.prompt_ids, prompt_labels, plan.image_token_counts, plan.image_sizes),
        ),
        ("chosen", segments(processor, pair.chosen_ids, pair.chosen_labels, (), ())),
    ]
    images = _fields("images", sample.images)
    if sample.rejected_images is not None:
        rejected_labels = [IGNORE_INDEX] * len(pair.rejected_prompt_ids)
        sections.append(
            (
                "rejected prompt",
                segments(
                    processor,
                    pair.rejected_prompt_ids,
                    rejected_labels,
                    plan.rejected_image_token_counts,
                    plan.rejected_image_sizes,
                    first_image=len(images),
                ),
            )
        )
        images += _fields("rejected_images", sample.rejected_images)
    sections.append(("rejected", segments(processor, pair.rejected_ids, pair.rejected_labels, (), ())))
    chosen_ids, chosen_labels = pair.chosen_sequence()
    rejected_ids, rejected_labels = pair.rejected_sequence()
    title = (
        f"{sample.origin}: chosen {_counts_line(chosen_ids, chosen_labels, processor)}; rejected "
        f"{_counts_line(rejected_ids, rejected_labels, processor)}{over}"
    )
    return InspectedSample(origin=sample.origin, title=title, sections=tuple(sections), images=images)


def _fields(field: str, refs: Sequence[ImageRef]) -> tuple[tuple[str, ImageRef], ...]:
    return tuple((f"{field}[{k}]", ref) for k, ref in enumerate(refs))


# ------------------------------------------------------------------------------------------------ output


def format_text(inspected: InspectedSample) -> str:
    """The sample as plain text, supervised spans in ⟦ ⟧."""
    lines = [f"=== {inspected.title}"]
    for name, parts in inspected.sections:
        text = "".join(f"⟦{part.text}⟧" if part.kind == "supervised" else part.text for part in parts)
        lines += [f"--- {name}", text]
    return "\n".join(lines)


def _image_html(field: str, ref: ImageRef, origin: Origin, k: int) -> str:
    try:
        image = load_rgb(ref, origin, field, DEFAULT_MAX_PIXELS)
    except DataError as error:
        return f'<p class="error">{html.escape(str(error))}</p>'
    image.thumbnail((THUMBNAIL_PIXELS, THUMBNAIL_PIXELS))
    png = io.BytesIO()
    image.save(png, format="PNG")
    data = base64.b64encode(png.getvalue()).decode("ascii")
    caption = f"image {k + 1} ({field})"
    return f'<figure><img src="data:image/png;base64,{data}"><figcaption>{caption}</figcaption></figure>'


def _segments_html(parts: Sequence[Segment]) -> str:
    tags = {"prompt": "span", "supervised": "mark", "image": "b"}
    return "".join(f"<{tags[p.kind]}>{html.escape(p.text)}</{tags[p.kind]}>" for p in parts)


HTML_STYLE = """
body { font-family: sans-serif; margin: 1em; }
section { display: flex; gap: 1em; border-top: 1px solid #ccc; padding: .5em 0; }
.images { flex: 0 0 400px; } img { max-width: 384px; border: 1px solid #999; }
pre { white-space: pre-wrap; flex: 1; margin: 0; }
mark { background: #b8f0b8; } b { color: #35c; } .error { color: #c00; }
"""


def format_html(samples: Sequence[InspectedSample], title: str) -> str:
    """A self-contained page: per sample its images (base64 PNG) beside its text; supervised spans highlighted."""
    body = []
    for inspected in samples:
        images = "".join(
            _image_html(field, ref, inspected.origin, k) for k, (field, ref) in enumerate(inspected.images)
        )
        text = "".join(
            f"<h4>{html.escape(name)}</h4><pre>{_segments_html(parts)}</pre>"
            for name, parts in inspected.sections
        )
        body.append(
            f"<h3>{html.escape(inspected.title)}</h3><section><div class='images'>{images}</div>"
            f"<div>{text}</div></section>"
        )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{HTML_STYLE}</style></head><body><h1>{html.escape(title)}</h1>"
        "<p>Highlighted: supervised tokens. Blue: image slots.</p>" + "".join(body) + "</body></html>"
    )


# ------------------------------------------------------------------------------------------------ command line


def load_processor(recipe) -> Phi3VProcessor:
    """The recipe model's processor, without loading weights: the demo's `tiny` one (as training builds it), a local
    folder, or a hub id (its json files only)."""
    model = recipe.model
    if model.name_or_path == "tiny":
        from data.synthetic import synthetic_texts
        from models.phi3v.tiny import build_demo_model

        return build_demo_model(synthetic_texts(), num_crops=model.num_crops, seed=recipe.seed)[1]
    folder = Path(model.name_or_path)
    if not folder.is_dir():
        from models.phi3v.processing import hub_snapshot

        folder = hub_snapshot(model.name_or_path, model.revision, allow_patterns=["*.json"])
    return Phi3VProcessor.from_pretrained(folder, num_crops=model.num_crops)


def recipe_samples(recipe, n: int, skips) -> Iterator:
    """The first `n` samples of each training source, per stage (SFT, then DPO), read as training reads them
    (`data.loaders`: a `synthetic` source is written under its path and read in the stage's format)."""
    from data.loaders import concrete, stage_sources
    from data.sources import iter_samples

    for stage in ("sft", "dpo"):
        for source in stage_sources(recipe.data.train, stage):
            rows = iter_samples(concrete(source, stage), on_bad_sample="skip", skip_counter=skips)
            yield from itertools.islice(rows, n)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data.inspect", description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe", help="the YAML recipe")
    parser.add_argument(
        "overrides", nargs="*", help="recipe overrides, key=value (e.g. data.max_length=2048)"
    )
    parser.add_argument("--n", type=int, default=3, help="samples to show per source and stage (default 3)")
    parser.add_argument("--html", type=Path, help="also write an HTML page with the images to this path")
    args = parser.parse_intermixed_args(argv)

    from config import load_recipe
    from data.sources import SkipCounter

    recipe = load_recipe(args.recipe, args.overrides)
    processor = load_processor(recipe)
    skips, shown = SkipCounter(), []
    for sample in recipe_samples(recipe, args.n, skips):
        try:
            plan = plan_sample(sample, processor, max_image_pixels=recipe.data.max_image_pixels)
            inspected = inspect_sample(
                plan,
                processor,
                assistant_turns=recipe.data.assistant_turns,
                max_length=recipe.data.max_length,
            )
        except DataError as error:
            print(f"=== {sample.origin}: cannot be used: {error}\n")
            continue
        print(format_text(inspected) + "\n")
        shown.append(inspected)
    if args.html:
        args.html.write_text(format_html(shown, f"{args.recipe}: {len(shown)} samples"), encoding="utf-8")
        print(f"wrote {args.html}")
    print(f"skipped rows: {skips.summary()}")
    return 0


if __name__ == "__main__":
    from runtime.user_errors import run_main

    run_main("python -m data.inspect", main)
