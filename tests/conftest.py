"""Shared fixtures: a tiny Phi-3-V-shaped model and processor built in-process, the real hub files when present, the
synthetic dataset (once per session) and the repository root.

The tests mirror the packages (tests/models/ tests models/, tests/data/ tests data/, ...); tests/whole_run/ holds the
tests that run whole stages or launches (every test there carries the `whole_run` marker: `-m "not whole_run"`
leaves them out), and the house rules that span every package are at this level (test_layers.py, test_fuzz.py)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

# One intra-op thread for the test process (and, inherited, for what it launches) unless the caller set a count:
# on a shared 2-core machine, two processes at two threads each oversubscribe (train/core/device.py set_threads).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from models.phi3v import Phi3VForCausalLM, Phi3VImageProcessor, Phi3VProcessor
from models.phi3v.tiny import build_tiny_tokenizer, tiny_config

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

REPO = Path(__file__).resolve().parents[1]  # the repository root: every test module imports this one
HUB_DIR = Path(os.environ.get("PHI3V_HUB_DIR", REPO.parent / "shared" / "phi3v" / "hub"))
PHI3V_HUB = HUB_DIR / "Phi-3-vision-128k-instruct"
PHI35V_HUB = HUB_DIR / "Phi-3.5-vision-instruct"
WHOLE_RUNS = Path(__file__).resolve().parent / "whole_run"


@pytest.hookimpl(tryfirst=True)  # before `-m` selects on the markers
def pytest_collection_modifyitems(items):
    for item in items:
        if WHOLE_RUNS in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.whole_run)


TINY_TEXTS = [
    "What colour is the shape?",
    "How many shapes are there?",
    "Which bar is tallest?",
    "Describe the image.",
    "red",
    "green",
    "blue",
    "yellow",
    "one",
    "two",
    "three",
    "four",
    "circle",
    "square",
    "triangle",
    "You are a helpful assistant.",
    "The answer is",
    "Compare the two images.",
]


def needs_hub(path: Path):
    """Skip (with the reason) where the real hub files are absent: a user's fresh clone has no ../shared."""
    return pytest.mark.skipif(
        not path.is_dir(), reason=f"real hub files not found at {path} (set PHI3V_HUB_DIR)"
    )


def deterministic_init_(model: torch.nn.Module, seed: int = 0, std: float = 0.05) -> None:
    """Fill every parameter from a generator seeded by (seed, parameter name), so values do not depend on
    construction order or on torch's global RNG: golden numbers stay put when the module tree changes order."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
            gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
            values = torch.randn(param.shape, generator=gen, dtype=torch.float32) * std
            if name.endswith(
                (
                    "norm.weight",
                    "layernorm.weight",
                    "layer_norm1.weight",
                    "layer_norm2.weight",
                    "layrnorm.weight",
                )
            ):
                values += 1.0
            param.copy_(values.to(param.dtype))


@pytest.fixture(scope="session")
def synthetic(tmp_path_factory):
    """The demo's synthetic dataset (data/synthetic.py, the demo's counts), written once per test session; tests
    read it and write nothing into it."""
    from data.synthetic import DEMO_COUNTS, write_synthetic

    root = tmp_path_factory.mktemp("synthetic")
    write_synthetic(root, seed=0, **DEMO_COUNTS)
    return root


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tiny_tokenizer(TINY_TEXTS)


@pytest.fixture(scope="session")
def tiny_processor(tiny_tokenizer):
    return Phi3VProcessor(Phi3VImageProcessor(num_crops=4, crop_size=32, patch_size=8), tiny_tokenizer)


@pytest.fixture()
def tiny_model(tiny_tokenizer):
    model = Phi3VForCausalLM(tiny_config(tiny_tokenizer))
    deterministic_init_(model)
    return model.eval()


def drawn_image(width: int, height: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    """A deterministic picture: a colour gradient with a few shapes, so crops differ from one another."""
    xs = np.arange(width) * 255 // max(width - 1, 1)
    ys = np.arange(height) * 255 // max(height - 1, 1)
    rgb = np.zeros((height, width, 3), dtype=np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = xs[None, :], ys[:, None], (seed * 67) % 256
    image = Image.fromarray(rgb, "RGB")
    draw = ImageDraw.Draw(image)
    draw.ellipse([width // 4, height // 4, width // 2, height // 2], fill=(250, 30, 30))
    draw.rectangle([width // 2, height // 2, 3 * width // 4, 7 * height // 8], fill=(30, 30, 250))
    return image.convert(mode)


def chat(processor, question: str, num_images: int = 1, answer: str | None = None) -> str:
    content = [{"type": "image"}] * num_images + [{"type": "text", "text": question}]
    messages = [{"role": "user", "content": content}]
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    return processor.apply_chat_template(messages, add_generation_prompt=answer is None)
