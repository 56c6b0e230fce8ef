"""Sequence parallelism at the model: N ranks over gloo give one process's logits, losses and gradients.

Each case runs in 2 (or 4) spawned CPU processes. Every rank builds the same tiny model and batch, computes the
reference on its own (one whole forward, no group), then the same loss under `SequenceParallel.splitting()`; the
gradients of the ranks summed over the group must equal the reference's (what DDP's all-reduce then averages)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from data.collate import SFTCollator
from models.phi3v import Phi3VForCausalLM, Phi3VImageProcessor, Phi3VProcessor
from models.phi3v.modeling import enable_sequence_parallel
from models.phi3v.sequence_parallel import SequenceParallel, pad_mask
from models.phi3v.tiny import build_tiny_tokenizer, tiny_config
from tests.conftest import TINY_TEXTS, chat, deterministic_init_, drawn_image

IGNORE = -100


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build(attn: str, layers: int = 2, heads: int = 4):
    tokenizer = build_tiny_tokenizer(TINY_TEXTS)
    processor = Phi3VProcessor(Phi3VImageProcessor(num_crops=4, crop_size=32, patch_size=8), tokenizer)
    config = tiny_config(tokenizer, num_hidden_layers=layers, num_attention_heads=heads)
    config._attn_implementation = attn
    model = Phi3VForCausalLM(config)
    deterministic_init_(model, seed=3)
    return model, processor


def batch_for(processor, case: str) -> dict:
    """A right-padded SFT batch (the project's collator) with the answers supervised. 'long' crosses the
    4096-position RoPE switch; 'one_image' has 2 tower rows (a 1x1-crop image's global view and crop)."""
    if case == "text":
        specs = [
            ("What colour is the shape?", [], "red"),
            ("How many shapes are there? " * 3, [], "two blue"),
        ]
    elif case == "one_image":
        specs = [
            ("What colour is the shape?", [drawn_image(30, 30)], "red"),
            ("Describe the image.", [], "a square"),
        ]
    elif case == "long":
        specs = [("Which bar is tallest? " * 700, [drawn_image(64, 48)], "the third one")]
    else:
        specs = [
            ("What colour is the shape?", [drawn_image(64, 48)], "red circle"),
            ("Describe the image. " * 3, [drawn_image(96, 40, seed=1)], "two blue squares"),
            ("How many shapes are there?", [], "three"),
        ]
    rows = []
    for question, images, answer in specs:
        text = chat(processor, question, num_images=len(images), answer=answer)
        enc = processor(text=text, images=images or None, return_tensors="pt")
        ids = enc["input_ids"][0].tolist()
        prompt = len(processor.tokenizer(chat(processor, question, len(images)))["input_ids"])
        row = {"input_ids": ids, "labels": [IGNORE] * prompt + ids[prompt:]}
        if images:
            row.update(pixel_values=enc["pixel_values"], image_sizes=enc["image_sizes"])
        rows.append(row)
    batch = SFTCollator(processor.tokenizer.pad_token_id)(rows)
    batch.pop("num_supervised_tokens")
    return batch


def sft_loss(model, batch: dict, sp: SequenceParallel | None) -> torch.Tensor:
    keep = F.pad(batch["labels"][:, 1:] != IGNORE, (0, 1))
    shifted = F.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    if sp is None:
        logits = model(**inputs, logits_to_keep=keep, use_cache=False).logits
        return F.cross_entropy(logits.float(), shifted[keep], reduction="sum")
    with sp.splitting():
        logits = model(**inputs, logits_to_keep=keep, use_cache=False).logits
        local = sp.local_keep(keep)
        targets = sp.chunk(F.pad(shifted, (0, sp.padded_length(keep.shape[1]) - keep.shape[1]), value=IGNORE))
        return F.cross_entropy(logits.float(), targets[local], reduction="sum")


def worker(rank: int, world: int, port: int, case: str, attn: str, out: str, checkpointing: bool) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model, processor = build(attn)
        if checkpointing:  # the backward recomputes each layer, all-to-alls included
            model.gradient_checkpointing_enable()
            model.train()
        batch = batch_for(processor, case)
        reference = sft_loss(model, batch, None)
        reference.backward()
        expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)

        sp = SequenceParallel(dist.group.WORLD, world, rank)
        enable_sequence_parallel(model, sp)
        local = sft_loss(model, batch, sp)
        local.backward()
        total = local.detach().clone()
        dist.all_reduce(total)
        torch.testing.assert_close(total, reference.detach(), rtol=1e-5, atol=1e-6)
        for name, param in model.named_parameters():
            grad = param.grad if param.grad is not None else torch.zeros_like(param)
            dist.all_reduce(grad)
            want = expected.get(name, torch.zeros_like(param))
            torch.testing.assert_close(grad, want, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
        if rank == 0:
            Path(out).write_text(f"{float(reference):.6f}")
    finally:
        dist.destroy_process_group()


def run(
    case: str, attn: str = "sdpa", world: int = 2, tmp_path: Path | None = None, checkpointing: bool = False
) -> None:
    out = tmp_path / "ok"
    mp.spawn(worker, args=(world, free_port(), case, attn, str(out), checkpointing), nprocs=world, join=True)
    assert out.exists()


@pytest.mark.parametrize(
    "case",
    [
        "images",
        pytest.param("text", marks=pytest.mark.slow),
        pytest.param("one_image", marks=pytest.mark.slow),
    ],
)
def test_two_ranks_give_one_process_loss_and_gradients(case, tmp_path):
    run(case, tmp_path=tmp_path)


@pytest.mark.slow
def test_gradient_checkpointing(tmp_path):
    run("images", tmp_path=tmp_path, checkpointing=True)


def test_eager_attention_is_refused():
    model, _ = build("eager")
    with pytest.raises(ValueError, match="needs model.attn_implementation sdpa"):
        enable_sequence_parallel(model, SequenceParallel(None, 2, 0))


def test_a_group_that_does_not_divide_the_heads_is_refused():
    model, _ = build("sdpa", heads=2)
    with pytest.raises(ValueError, match="does not divide the model's 2 attention heads"):
        enable_sequence_parallel(model, SequenceParallel(None, 4, 0))


@pytest.mark.slow
def test_four_ranks_fewer_crops_than_ranks(tmp_path):
    run("one_image", world=4, tmp_path=tmp_path)


@pytest.mark.slow
def test_a_sequence_across_the_rope_switch(tmp_path):
    """4,200+ tokens: the long RoPE factors apply on every rank because RoPE reads the global positions."""
    run("long", tmp_path=tmp_path)


def test_padded_block_mask_keeps_every_row_attending():
    mask = torch.tensor([[True, False, False], [True, True, False], [True, False, True]])[None, None]
    padded = pad_mask(mask, 2)
    assert padded.shape == (1, 1, 5, 5)
    assert torch.equal(padded[..., :3, :3], mask)
    assert not padded[..., :3, 3:].any()
    assert padded.any(dim=-1).all()
    additive = pad_mask(torch.zeros(1, 1, 3, 3), 1)
    assert additive[0, 0, 3].max() == 0 and additive[0, 0, 0, 3] < -1e30
