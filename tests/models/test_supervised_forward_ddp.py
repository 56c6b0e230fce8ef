"""The SFT loss's real-token forward (models/phi3v/supervised_forward.py) under DDP: 2 CPU processes over gloo, each
with its share of a batch, give the loss and the gradients of one process's full forward on the whole batch.

The path runs inside the model's forward (`real_tokens=True`), so DDP's forward prepares its reducer and the
gradients are all-reduced as in any step. Each rank builds the same tiny model and LoRA (B drawn non-zero, so the
adapter matters), computes the reference on its own (the model's forward on the whole batch, no DDP), then its share
through `DistributedDataParallel(model)` and `train.core.losses.sft_loss_sum`, scaled as train/core/loop.py scales it (world
size / the step's supervised tokens: DDP averages). Rank 1's share is text-only: its forward runs the blank vision
term, so DDP sees every parameter used. Checked on each rank: the first decoder layer saw only the share's real
tokens (twice under checkpointing: the recomputation), the summed losses equal the reference, and the all-reduced
gradients equal the reference's."""

from __future__ import annotations

import gc
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from data.collate import SFTCollator
from models.phi3v import Phi3VForCausalLM, Phi3VImageProcessor, Phi3VProcessor
from models.phi3v.tiny import build_tiny_tokenizer, tiny_config
from tests.conftest import TINY_TEXTS, deterministic_init_
from tests.models.test_sequence_parallel import free_port
from tests.models.test_supervised_forward import FirstLayerRows, lora_model, rows
from train.core.losses import model_inputs, sft_loss_sum, supervised_positions

SHARES = ([0, 1, 3], [2])  # rows(...)'s row 2 is the text-only one


def worker(rank: int, world: int, port: int, checkpointing: bool, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        tokenizer = build_tiny_tokenizer(TINY_TEXTS)
        processor = Phi3VProcessor(Phi3VImageProcessor(num_crops=4, crop_size=32, patch_size=8), tokenizer)
        tiny = Phi3VForCausalLM(tiny_config(tokenizer))
        deterministic_init_(tiny)
        model = lora_model(tiny, checkpointing)
        collate = SFTCollator(pad_token_id=tokenizer.pad_token_id)
        every = rows(processor)
        whole = collate(every)
        units = int(whole["num_supervised_tokens"])

        keep, targets = supervised_positions(whole["labels"])
        logits = model(**model_inputs(whole), logits_to_keep=keep, use_cache=False).logits
        reference = torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
        (reference / units).backward()
        expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        model.zero_grad(set_to_none=True)

        ddp = torch.nn.parallel.DistributedDataParallel(model)
        share = collate([every[i] for i in SHARES[rank]])
        assert ("pixel_values" in share) == (rank == 0)
        first_layer = FirstLayerRows(model)
        local, _ = sft_loss_sum(ddp, share)
        (local * world / units).backward()
        assert first_layer.take() == [int(share["attention_mask"].sum())] * (2 if checkpointing else 1)
        total = local.detach().clone()
        dist.all_reduce(total)
        torch.testing.assert_close(total, reference.detach(), rtol=1e-5, atol=1e-5)
        for name, param in model.named_parameters():
            if param.requires_grad:
                torch.testing.assert_close(
                    param.grad, expected[name], rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}"
                )
        if rank == 0:
            Path(out).write_text(f"{float(reference):.6f}")
        # The DDP reducer holds the process group: freed after destroy_process_group (when this frame is torn
        # down), it would run the group's destructor, which joins gloo's worker threads while holding the GIL that
        # a worker needs to free a finished all-reduce's tensors (a hang seen in CI). Free it first, in order.
        del ddp
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("checkpointing", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_two_ddp_ranks_give_one_process_loss_and_gradients(checkpointing, tmp_path):
    out = tmp_path / "ok"
    mp.spawn(worker, args=(2, free_port(), checkpointing, str(out)), nprocs=2, join=True)
    assert out.exists()
