"""A synthetic multi-page document task, for long-context runs (sequence parallelism) on a CPU.

    paths = write_multipage(Path("runs/.data/multipage"), pages=150)

Each sample is a document of `pages` pages, page k written as the line `Page k:` followed by its picture (one shape
in one colour on a white page), and one question about one page: `What colour is the shape on page k?`, answered
with the colour's name. The answer sits on one page among many, so the model must find it across the whole
sequence. With the demo's tiny model (32-pixel crops, num_crops 4) a 64 x 64 page takes 27 image tokens and its
line 5-7 tokens: 150 pages are ~5,000 tokens, past Phi-3's 4096-position RoPE switch. At the real model's width a
page of a 40-page report at num_crops 16 takes ~2,500 tokens: the same task at 40 pages is ~100K tokens.

The files have data.synthetic's layout (`sft_train.jsonl`, `sft_eval.jsonl` in TRL's conversational format,
`pref_train.jsonl`, `pref_eval.jsonl` with a wrong colour as the rejected answer, `images/`, `manifest.json`
written last), so a recipe reads it as a `synthetic` source with `config: multipage` and the `synthetic` eval task
scores it. The pages come from a pool of one picture per (colour, shape): documents differ in their page order.
The same arguments give byte-identical files.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from data.synthetic import COLOURS, SHAPES, SyntheticPaths

MULTIPAGE_VERSION = 1
PAGE_SIZE = (64, 64)
QUESTION = "What colour is the shape on page {page}?"
_QUESTION_PATTERN = re.compile(r"What colour is the shape on page \d+\?")
# The demo-sized dataset of recipes/multipage_demo.yaml: enough rows for a few steps and a scored eval.
MULTIPAGE_COUNTS = {"n_train": 64, "n_eval": 8, "n_pref_train": 32, "n_pref_eval": 8}


def write_multipage(
    root: Path,
    *,
    pages: int = 150,
    seed: int = 0,
    n_train: int = MULTIPAGE_COUNTS["n_train"],
    n_eval: int = MULTIPAGE_COUNTS["n_eval"],
    n_pref_train: int = MULTIPAGE_COUNTS["n_pref_train"],
    n_pref_eval: int = MULTIPAGE_COUNTS["n_pref_eval"],
) -> SyntheticPaths:
    """Write the dataset under `root` unless a complete one with the same arguments is there; built in a sibling
    temporary directory and moved into place, so a reader never sees half of it. A directory holding other files
    is refused rather than replaced."""
    if pages < 1:
        raise ValueError(f"a multi-page document needs at least one page, got pages={pages}")
    manifest = {
        "generator": "data.synthetic",
        "variant": "multipage",
        "version": MULTIPAGE_VERSION,
        "seed": seed,
        "pages": pages,
        "rows": {
            "sft_train": n_train,
            "sft_eval": n_eval,
            "pref_train": n_pref_train,
            "pref_eval": n_pref_eval,
        },
    }
    root = Path(root).absolute()
    paths = SyntheticPaths.under(root)
    if _read(paths.manifest) == manifest:
        return paths
    if (
        root.is_dir()
        and any(root.iterdir())
        and (_read(paths.manifest) or {}).get("generator") != "data.synthetic"
    ):
        raise ValueError(
            f"multi-page dataset root {root} holds files that this generator did not write (no "
            "manifest.json of ours); refusing to replace them. Fix: pass an empty or new directory."
        )
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        _write_all(SyntheticPaths.under(staging), manifest)
        if root.exists():
            shutil.rmtree(root)
        staging.rename(root)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return paths


def is_multipage_question(text: str) -> bool:
    """Whether a user turn's text (its pages' lines, then the question) ends with this task's question."""
    return bool(_QUESTION_PATTERN.search(text)) and text.rstrip().endswith("?")


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _write_all(paths: SyntheticPaths, manifest: dict[str, Any]) -> None:
    paths.images.mkdir(parents=True)
    pool = [(colour, shape) for colour in COLOURS for shape in SHAPES]
    for index, (colour, shape) in enumerate(pool):
        _page_picture(colour, shape).save(paths.images / f"page-{index:02d}.png")
    for split, count in manifest["rows"].items():
        rng = random.Random(f"data.multipage/{manifest['seed']}/{split}")
        rows = [_row(rng, pool, manifest["pages"], preference=split.startswith("pref")) for _ in range(count)]
        getattr(paths, split).write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    paths.manifest.write_text(json.dumps(manifest, indent=1), encoding="utf-8")


def _page_picture(colour: str, shape: str) -> Image.Image:
    image = Image.new("RGB", PAGE_SIZE, (255, 255, 255))
    draw = ImageDraw.Draw(image)
    box = (14, 14, 50, 50)
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(32, 12), (52, 50), (12, 50)], fill=fill)
    return image


def _row(rng: random.Random, pool: list[tuple[str, str]], pages: int, *, preference: bool) -> dict[str, Any]:
    document = [rng.randrange(len(pool)) for _ in range(pages)]
    asked = rng.randrange(pages)
    answer = pool[document[asked]][0]
    content: list[dict[str, str]] = []
    for page in range(pages):
        content += [{"type": "text", "text": f"Page {page + 1}:"}, {"type": "image"}]
    content.append({"type": "text", "text": QUESTION.format(page=asked + 1)})
    images = [f"images/page-{index:02d}.png" for index in document]
    prompt = [{"role": "user", "content": content}]
    if not preference:
        return {
            "messages": [*prompt, {"role": "assistant", "content": [{"type": "text", "text": answer}]}],
            "images": images,
        }
    wrong = rng.choice([colour for colour in COLOURS if colour != answer])
    return {
        "prompt": prompt,
        "chosen": [{"role": "assistant", "content": [{"type": "text", "text": answer}]}],
        "rejected": [{"role": "assistant", "content": [{"type": "text", "text": wrong}]}],
        "images": images,
    }
