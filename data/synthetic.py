"""A small, deterministic chart-and-shape dataset written in real on-disk formats (jsonl + PNG), for the demo and tests.

    paths = write_synthetic(Path("runs/.cache/synthetic"), seed=0, n_train=512, n_eval=64,
                            n_pref_train=256, n_pref_eval=32)

Layout under `root` (image paths in the rows are relative to `root`):

    sft_train.jsonl, sft_eval.jsonl     TRL conversational rows {"messages": [...], "images": ["images/00012.png"]}
    pref_train.jsonl, pref_eval.jsonl   TRL preference rows {"prompt": [...], "chosen": [...], "rejected": [...],
                                        "images": [...]}
    images/NNNNN.png                    one PNG per image row, numbered across all four files
    manifest.json                       the generator version and arguments; written last

Tasks are questions about a drawn picture with a one-word answer from a small closed vocabulary, so that a tiny
model (2-layer LM, small CLIP on 32-64 px crops) goes from chance to clearly better within minutes on a CPU:
the colour of a single shape, its kind, the number of shapes (1-4), the colour of the tallest bar of a bar chart,
and a number (0-20) printed large. Every tenth row is text-only and every tenth is a two-turn conversation with a
system turn, so the pipeline meets those shapes too.

One systematic error is planted, for the preference stage to fix: in `sft_train` half of the answers "purple" to the
colour question are labelled "blue" (an annotator who confuses the two: `CONFUSION`, `CONFUSION_RATE`), while the
held-out splits are right and every preference pair whose answer is purple rejects "blue". SFT learns the confusion
from its data; DPO's pairs teach it away, so the demo's DPO stage can raise the held-out score over SFT's, as
preference tuning should.

Determinism: each split draws from its own `random.Random` seeded by (seed, split name), the bitmap font is the
one embedded in Pillow, and no image repeats anywhere in the dataset (a repeat is redrawn), so the held-out splits
never share an image with the training ones. The same arguments give byte-identical files.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

GENERATOR_VERSION = 2
"""Bump when the drawing or the row layout changes, so that existing cached datasets are regenerated."""

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (235, 200, 0),
    "purple": (140, 40, 170),
}
SHAPES = ("circle", "square", "triangle")
COUNT_WORDS = ("one", "two", "three", "four")
CONFUSION = (
    "purple",
    "blue",
)  # (the right colour, what sft_train's annotator sometimes wrote: module docstring)
CONFUSION_RATE = 0.5
NUMBERS = tuple(str(n) for n in range(21))

QUESTIONS: dict[str, str] = {
    "colour": "What colour is the shape?",
    "shape": "What shape is shown?",
    "count": "How many shapes are there?",
    "tallest": "Which bar is the tallest?",
    "number": "What number is shown?",
}
TEXT_QUESTION = "Which word is a colour: {first} or {second}?"
SYSTEM_PROMPT = "You are a helpful assistant. Answer with one word."

ANSWERS: dict[str, tuple[str, ...]] = {
    "colour": tuple(COLOURS),
    "shape": SHAPES,
    "count": COUNT_WORDS,
    "tallest": tuple(COLOURS),
    "number": NUMBERS,
    "text": tuple(COLOURS),
}
"""Every task's closed answer vocabulary; "text" is the text-only question."""

IMAGE_TASKS = tuple(QUESTIONS)
ROLES = ("system", "user", "assistant")
DEFAULT_IMAGE_SIZES = ((64, 64), (96, 64), (64, 96))
"""(width, height) pairs; each image picks one, so landscape, portrait and square aspect ratios all occur."""

_MIN_SIDE, _MAX_SIDE = 32, 1024
_WHITE, _BLACK = (255, 255, 255), (0, 0, 0)
_MAX_REDRAWS = 1000
_TEXT_QUESTION_PATTERN = re.compile(r"Which word is a colour: (\w+) or (\w+)\?")
_SPLITS = ("sft_train", "sft_eval", "pref_train", "pref_eval")


@dataclass(frozen=True, kw_only=True, slots=True)
class SyntheticPaths:
    root: Path
    sft_train: Path
    sft_eval: Path
    pref_train: Path
    pref_eval: Path
    images: Path
    manifest: Path

    @classmethod
    def under(cls, root: Path) -> SyntheticPaths:
        return cls(
            root=root,
            sft_train=root / "sft_train.jsonl",
            sft_eval=root / "sft_eval.jsonl",
            pref_train=root / "pref_train.jsonl",
            pref_eval=root / "pref_eval.jsonl",
            images=root / "images",
            manifest=root / "manifest.json",
        )


# The demo's dataset (recipes/demo.yaml): 1,536 SFT conversations and 768 preference pairs to train on, 128 of each
# held out.
DEMO_COUNTS = {"n_train": 1536, "n_eval": 128, "n_pref_train": 768, "n_pref_eval": 128}


def write_synthetic(
    root: Path,
    *,
    seed: int = 0,
    n_train: int,
    n_eval: int,
    n_pref_train: int,
    n_pref_eval: int,
    image_sizes: tuple[tuple[int, int], ...] = DEFAULT_IMAGE_SIZES,
) -> SyntheticPaths:
    """Write the dataset under `root` unless a complete one with the same arguments is already there.

    A different or missing manifest regenerates everything: the files are built in a sibling temporary directory
    and moved into place, so a reader never sees a half-written dataset. A `root` holding files that this function
    did not write is refused rather than replaced.
    """
    manifest = _manifest(
        seed=seed, counts=(n_train, n_eval, n_pref_train, n_pref_eval), image_sizes=image_sizes
    )
    root = Path(root).absolute()  # "." and "data/." become named directories that can be staged and replaced
    paths = SyntheticPaths.under(root)
    if _is_complete(paths, manifest):
        return paths
    _refuse_foreign_directory(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        _write_all(SyntheticPaths.under(staging), manifest)
        _install(staging, paths, manifest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return paths


def synthetic_texts() -> tuple[str, ...]:
    """Every text string the generator can write (questions, answers, system prompt, role names), sorted.

    Enough to train the tiny demo tokenizer so that no synthetic row meets an unknown word.
    """
    texts = {*QUESTIONS.values(), SYSTEM_PROMPT, *ROLES}
    texts.update(answer for vocabulary in ANSWERS.values() for answer in vocabulary)
    texts.update(
        _text_question(colour, shape, colour_first)
        for colour in COLOURS
        for shape in SHAPES
        for colour_first in (True, False)
    )
    return tuple(sorted(texts))


def question_task(question: str) -> str:
    """The task ("colour", "shape", "count", "tallest", "number" or "text") that a generated question belongs to."""
    for task, text in QUESTIONS.items():
        if question == text:
            return task
    if _TEXT_QUESTION_PATTERN.fullmatch(question):
        return "text"
    raise ValueError(
        f"{question!r} is not a question write_synthetic generates; known: {sorted(QUESTIONS.values())} "
        f"and {TEXT_QUESTION!r}"
    )


# ---- arguments and the manifest ---------------------------------------------------------------------------------


def _manifest(
    *, seed: int, counts: tuple[int, ...], image_sizes: tuple[tuple[int, int], ...]
) -> dict[str, Any]:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    for name, count in zip(("n_train", "n_eval", "n_pref_train", "n_pref_eval"), counts, strict=True):
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ValueError(f"{name} must be an int >= 0 (a row count), got {count!r}")
    _check_image_sizes(image_sizes)
    return {
        "generator": "data.synthetic",
        "version": GENERATOR_VERSION,
        "seed": seed,
        "rows": dict(zip(_SPLITS, counts, strict=True)),
        "image_sizes": [list(size) for size in image_sizes],
    }


def _check_image_sizes(image_sizes: tuple[tuple[int, int], ...]) -> None:
    if not image_sizes:
        raise ValueError("image_sizes must hold at least one (width, height) pair")
    for size in image_sizes:
        if len(size) != 2 or not all(
            isinstance(side, int) and _MIN_SIDE <= side <= _MAX_SIDE for side in size
        ):
            raise ValueError(
                f"image_sizes entry {size!r} must be (width, height) ints in {_MIN_SIDE}..{_MAX_SIDE} "
                f"pixels: smaller images cannot hold four shapes or a two-digit number legibly"
            )


def _is_complete(paths: SyntheticPaths, manifest: dict[str, Any]) -> bool:
    if not paths.manifest.is_file():
        return False
    try:
        written = json.loads(paths.manifest.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    files_present = all(
        path.is_file() for path in (paths.sft_train, paths.sft_eval, paths.pref_train, paths.pref_eval)
    )
    return written == manifest and files_present and paths.images.is_dir()


def _refuse_foreign_directory(root: Path) -> None:
    if root.exists() and not root.is_dir():
        raise ValueError(
            f"synthetic dataset root {root} exists and is not a directory. Fix: pass a directory path."
        )
    if root.is_dir() and any(root.iterdir()) and not _written_by_us(root / "manifest.json"):
        raise ValueError(
            f"synthetic dataset root {root} holds files that write_synthetic did not write (no "
            "manifest.json of ours); refusing to replace them. Fix: pass an empty or new directory."
        )


def _written_by_us(manifest_path: Path) -> bool:
    try:
        return json.loads(manifest_path.read_text(encoding="utf-8")).get("generator") == "data.synthetic"
    except (OSError, ValueError, AttributeError):
        return False


def _install(staging: Path, paths: SyntheticPaths, manifest: dict[str, Any]) -> None:
    """Move the built dataset to `paths.root`. Concurrent writers with the same arguments build identical bytes,
    so whichever installs first wins and the others keep its copy."""
    if paths.root.exists():
        if _is_complete(paths, manifest):
            return
        shutil.rmtree(paths.root)
    try:
        staging.rename(paths.root)
    except OSError:
        if not _is_complete(paths, manifest):
            raise


# ---- writing the splits ------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _QA:
    question: str
    answer: str
    wrong_answer: str
    """A plausible wrong answer (another word of the task's vocabulary; for the text-only question, its other
    word): the rejected completion of a preference row."""


@dataclass(frozen=True, slots=True)
class _Example:
    image: Image.Image | None
    exchanges: tuple[_QA, ...]
    """Asked in order; more than one makes a multi-turn conversation."""
    system: str | None = None


def _write_all(paths: SyntheticPaths, manifest: dict[str, Any]) -> None:
    paths.images.mkdir(parents=True)
    sizes = tuple(tuple(size) for size in manifest["image_sizes"])
    writer = _ImageWriter(paths.images, paths.root)
    for split in _SPLITS:
        rng = random.Random(f"data.synthetic/{manifest['seed']}/{split}")
        examples = [_example(kind, rng, sizes, writer.is_new) for kind in _row_kinds(manifest["rows"][split])]
        if split == "sft_train":  # its own draws: the other rows stay as the split's generator drew them
            confusion = random.Random(f"data.synthetic/{manifest['seed']}/confusion")
            examples = [_confused(e) if confusion.random() < CONFUSION_RATE else e for e in examples]
        to_row = _sft_row if split.startswith("sft") else _preference_row
        rows = [to_row(example, writer.save(example.image)) for example in examples]
        _write_jsonl(getattr(paths, split), rows)
    _write_json(paths.manifest, manifest)


class _ImageWriter:
    """Numbers and saves images across all splits, and remembers their pixels so that none repeats."""

    def __init__(self, images_dir: Path, root: Path):
        self._images_dir = images_dir
        self._root = root
        self._count = 0
        self._seen: set[bytes] = set()

    def is_new(self, image: Image.Image) -> bool:
        digest = hashlib.sha256(repr(image.size).encode() + image.tobytes()).digest()
        if digest in self._seen:
            return False
        self._seen.add(digest)
        return True

    def save(self, image: Image.Image | None) -> list[str]:
        """The row's `images` list: the relative path of the saved PNG, or empty for a text-only row."""
        if image is None:
            return []
        path = self._images_dir / f"{self._count:05d}.png"
        self._count += 1
        image.save(path, format="PNG")
        return [path.relative_to(self._root).as_posix()]


def _row_kinds(num_rows: int) -> list[str]:
    """Row i's kind: every tenth (i % 10 == 4) text-only, every tenth (i % 10 == 9) a dialogue, else the image
    tasks in turn, so that any split of 6 rows or more covers every image task."""
    kinds, num_image_rows = [], 0
    for index in range(num_rows):
        if index % 10 == 4:
            kinds.append("text")
        elif index % 10 == 9:
            kinds.append("dialogue")
        else:
            kinds.append(IMAGE_TASKS[num_image_rows % len(IMAGE_TASKS)])
            num_image_rows += 1
    return kinds


def _example(
    kind: str, rng: random.Random, sizes: tuple[tuple[int, int], ...], is_new: Callable[[Image.Image], bool]
) -> _Example:
    if kind == "text":
        return _text_example(rng)
    draw = _dialogue_example if kind == "dialogue" else _DRAWERS[kind]
    for _ in range(_MAX_REDRAWS):
        example = draw(rng, rng.choice(sizes))
        if is_new(example.image):
            return example
    raise RuntimeError(
        f"drew {_MAX_REDRAWS} '{kind}' images that all repeat earlier ones: the task's picture "
        "space is too small for this many rows; enlarge image_sizes or lower the row counts"
    )


def _sft_row(example: _Example, images: list[str]) -> dict[str, Any]:
    messages = _system_messages(example)
    for index, exchange in enumerate(example.exchanges):
        messages.append(_user_message(exchange.question, with_image=index == 0 and example.image is not None))
        messages.append(_assistant_message(exchange.answer))
    return {"messages": messages, "images": images}


def _preference_row(example: _Example, images: list[str]) -> dict[str, Any]:
    prompt = _system_messages(example)
    *earlier, last = example.exchanges
    for index, exchange in enumerate(earlier):
        prompt.append(_user_message(exchange.question, with_image=index == 0 and example.image is not None))
        prompt.append(_assistant_message(exchange.answer))
    prompt.append(_user_message(last.question, with_image=not earlier and example.image is not None))
    return {
        "prompt": prompt,
        "chosen": [_assistant_message(last.answer)],
        "rejected": [_assistant_message(last.wrong_answer)],
        "images": images,
    }


def _system_messages(example: _Example) -> list[dict[str, Any]]:
    if example.system is None:
        return []
    return [{"role": "system", "content": [{"type": "text", "text": example.system}]}]


def _user_message(question: str, *, with_image: bool) -> dict[str, Any]:
    image_parts = [{"type": "image"}] if with_image else []
    return {"role": "user", "content": [*image_parts, {"type": "text", "text": question}]}


def _assistant_message(answer: str) -> dict[str, Any]:
    return {"role": "assistant", "content": [{"type": "text", "text": answer}]}


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    with path.open("w", encoding="utf-8", newline="\n") as file:
        for row in rows:
            file.write(json.dumps(row, ensure_ascii=False) + "\n")


def _write_json(path: Path, value: dict[str, Any]) -> None:
    path.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n", encoding="utf-8")


# ---- the tasks ---------------------------------------------------------------------------------------------------


def _text_question(colour: str, shape: str, colour_first: bool) -> str:
    first, second = (colour, shape) if colour_first else (shape, colour)
    return TEXT_QUESTION.format(first=first, second=second)


def _text_example(rng: random.Random) -> _Example:
    colour, shape = rng.choice(tuple(COLOURS)), rng.choice(SHAPES)
    question = _text_question(colour, shape, colour_first=rng.random() < 0.5)
    return _Example(image=None, exchanges=(_QA(question, colour, wrong_answer=shape),))


def _colour_example(rng: random.Random, size: tuple[int, int]) -> _Example:
    image, colour, _ = _single_shape_image(rng, size)
    return _Example(image=image, exchanges=(_colour_pair(rng, colour),))


def _shape_example(rng: random.Random, size: tuple[int, int]) -> _Example:
    image, _, shape = _single_shape_image(rng, size)
    return _Example(image=image, exchanges=(_QA(QUESTIONS["shape"], shape, _other(rng, SHAPES, shape)),))


def _dialogue_example(rng: random.Random, size: tuple[int, int]) -> _Example:
    image, colour, shape = _single_shape_image(rng, size)
    exchanges = (_QA(QUESTIONS["shape"], shape, _other(rng, SHAPES, shape)), _colour_pair(rng, colour))
    return _Example(image=image, exchanges=exchanges, system=SYSTEM_PROMPT)


def _count_example(rng: random.Random, size: tuple[int, int]) -> _Example:
    count = rng.randint(1, len(COUNT_WORDS))
    image = Image.new("RGB", size, _WHITE)
    draw = ImageDraw.Draw(image)
    width, height = size
    cell_width, cell_height = width // 2, height // 2
    # One shape per quadrant of a 2x2 grid: shapes never overlap, so the count is unambiguous.
    for cell in rng.sample(range(4), count):
        left, top = (cell % 2) * cell_width, (cell // 2) * cell_height
        side = rng.randint(int(0.45 * min(cell_width, cell_height)), int(0.8 * min(cell_width, cell_height)))
        x, y = left + rng.randint(1, cell_width - side - 1), top + rng.randint(1, cell_height - side - 1)
        _draw_shape(draw, rng.choice(SHAPES), (x, y, x + side, y + side), COLOURS[rng.choice(tuple(COLOURS))])
    # An off-by-one count is the plausible mistake.
    wrong = rng.choice([n for n in (count - 1, count + 1) if 1 <= n <= len(COUNT_WORDS)])
    answer = _QA(QUESTIONS["count"], COUNT_WORDS[count - 1], COUNT_WORDS[wrong - 1])
    return _Example(image=image, exchanges=(answer,))


def _confused(example: _Example) -> _Example:
    """An example whose colour answers of CONFUSION[0] say CONFUSION[1] (other examples unchanged)."""
    right, written = CONFUSION
    exchanges = tuple(
        dataclasses.replace(qa, answer=written)
        if qa.question == QUESTIONS["colour"] and qa.answer == right
        else qa
        for qa in example.exchanges
    )
    return dataclasses.replace(example, exchanges=exchanges)


def _colour_pair(rng: random.Random, colour: str) -> _QA:
    """The colour question's answer and rejected answer: the planted confusion for CONFUSION[0], another colour
    otherwise (drawn either way, so that the rows after it are drawn alike)."""
    other = _other(rng, ANSWERS["colour"], colour)
    return _QA(QUESTIONS["colour"], colour, CONFUSION[1] if colour == CONFUSION[0] else other)


def _tallest_example(rng: random.Random, size: tuple[int, int]) -> _Example:
    num_bars = rng.randint(3, 4)
    colours = rng.sample(tuple(COLOURS), num_bars)
    tallest = rng.randrange(num_bars)
    width, height = size
    margin = 4
    plot_height, slot_width = height - 2 * margin, (width - 2 * margin) // num_bars
    bar_width = max(2, int(0.7 * slot_width))
    image = Image.new("RGB", size, _WHITE)
    draw = ImageDraw.Draw(image)
    baseline = height - margin
    for index, colour in enumerate(colours):
        # The tallest bar is >= 80 % of the plot height, every other one <= 65 %: the answer is unambiguous.
        fraction = rng.uniform(0.8, 1.0) if index == tallest else rng.uniform(0.25, 0.65)
        left = margin + index * slot_width + (slot_width - bar_width) // 2
        draw.rectangle(
            (left, baseline - int(fraction * plot_height), left + bar_width - 1, baseline - 1),
            fill=COLOURS[colour],
        )
    draw.line((margin, baseline, width - margin, baseline), fill=_BLACK)
    # The plausible mistake is another bar's colour.
    wrong = rng.choice([colour for index, colour in enumerate(colours) if index != tallest])
    return _Example(image=image, exchanges=(_QA(QUESTIONS["tallest"], colours[tallest], wrong),))


def _number_example(rng: random.Random, size: tuple[int, int]) -> _Example:
    number = rng.choice(NUMBERS)
    glyphs = _digit_glyphs(number)
    width, height = size
    largest_scale = min((width - 4) // glyphs.width, (height - 4) // glyphs.height)
    scale = rng.randint(max(1, largest_scale - 2), largest_scale)
    mask = glyphs.resize((glyphs.width * scale, glyphs.height * scale), Image.Resampling.NEAREST)
    image = Image.new("RGB", size, _WHITE)
    position = (rng.randint(2, width - mask.width - 2), rng.randint(2, height - mask.height - 2))
    ImageDraw.Draw(image).bitmap(position, mask, fill=_BLACK)
    # The plausible mistake is a nearby number.
    nearby = [
        str(n) for n in range(int(number) - 3, int(number) + 4) if str(n) in NUMBERS and str(n) != number
    ]
    return _Example(image=image, exchanges=(_QA(QUESTIONS["number"], number, rng.choice(nearby)),))


_DRAWERS: dict[str, Callable[[random.Random, tuple[int, int]], _Example]] = {
    "colour": _colour_example,
    "shape": _shape_example,
    "count": _count_example,
    "tallest": _tallest_example,
    "number": _number_example,
}


def _single_shape_image(rng: random.Random, size: tuple[int, int]) -> tuple[Image.Image, str, str]:
    colour, shape = rng.choice(tuple(COLOURS)), rng.choice(SHAPES)
    width, height = size
    side = rng.randint(int(0.4 * min(size)), int(0.7 * min(size)))
    x, y = rng.randint(2, width - side - 2), rng.randint(2, height - side - 2)
    image = Image.new("RGB", size, _WHITE)
    _draw_shape(ImageDraw.Draw(image), shape, (x, y, x + side, y + side), COLOURS[colour])
    return image, colour, shape


def _draw_shape(
    draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill: tuple[int, int, int]
) -> None:
    left, top, right, bottom = box
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(left, bottom), ((left + right) // 2, top), (right, bottom)], fill=fill)


def _digit_glyphs(text: str) -> Image.Image:
    """`text` in Pillow's embedded bitmap font (5x7 px digits), cropped to its ink: an 'L' mask, 255 = ink.

    The bitmap font rather than `ImageFont.load_default()`'s FreeType one: its glyph pixels are part of Pillow's
    source, so the drawing does not change with the FreeType build.
    """
    font = ImageFont.load_default_imagefont()
    _, _, text_width, text_height = font.getbbox(text)
    canvas = Image.new("L", (text_width, text_height), 0)
    ImageDraw.Draw(canvas).text((0, 0), text, fill=255, font=font)
    return canvas.crop(canvas.getbbox())


def _other(rng: random.Random, vocabulary: tuple[str, ...], answer: str) -> str:
    return rng.choice([word for word in vocabulary if word != answer])
