"""Precomputed reference log-probs for DPO: one pass before training, cached on disk under a key of the starting
weights (the base, and every weight file of the SFT adapter: its LoRA and its full-trained projector), the data and
the rendering settings; reused by later runs with the same key.

Where: `<runs root>/.cache/ref_logps/<key>.safetensors` (the runs root is the run directory's parent), one row per
planned pair in planning order: [chosen, rejected] summed log-probs under the reference (the SFT policy). The run
records the key's fields in `dpo/ref_logps.json`; resuming a run whose fields no longer match (other data, another
adapter, other settings) is refused, naming the fields that changed.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from data.collate import DPOCollator, RenderedDataset
from rundir.atomic import write_json_atomically
from rundir.layout import reference_logps_file, reference_record_file
from rundir.weights import Weights, start_weights_sha256
from train.core.device import to_device
from train.preference.stage_loss import pair_logps

log = logging.getLogger(__name__)


def key_fields(start: Weights, recipe, planned) -> dict:
    digest = hashlib.sha256()
    for plan in planned:
        digest.update(f"{plan.sample.origin}|{plan.num_tokens}|{plan.image_token_counts}\n".encode())
    return {
        "base": start.base,
        "revision": start.revision,
        "weights_sha256": start_weights_sha256(start),  # every weight file: LoRA and full-trained parts alike
        "data": digest.hexdigest(),
        "pairs": len(planned),
        "dtype": recipe.model.dtype,
        "num_crops": recipe.model.num_crops,
        "max_length": recipe.data.max_length,
        "assistant_turns": recipe.data.assistant_turns,
    }


def cache_path(run_dir: Path, fields: dict) -> Path:
    key = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:24]
    return reference_logps_file(run_dir, key)


def check_run_record(run_dir: Path, fields: dict, resuming: bool) -> None:
    record = reference_record_file(run_dir)
    if resuming and record.exists():
        before = json.loads(record.read_text())
        changed = sorted(k for k in set(before) | set(fields) if before.get(k) != fields.get(k))
        if changed:
            raise ValueError(
                f"{record}: this run's reference log-probs were computed for other inputs ({', '.join(changed)} "
                f"changed since); resuming would mix two references. Start a new run directory instead"
            )
    write_json_atomically(record, fields)


@torch.no_grad()
def compute(
    model, processor, planned, data, batch_size: int, device, *, rank: int = 0, num_ranks: int = 1
) -> list[tuple[int, torch.Tensor]]:
    """(batch index, (pairs, 2) reference log-probs) of this rank's share of the batches of `planned` in planning
    order: batches rank, rank + num_ranks, ... One vision pass per batch of pairs."""
    dataset = RenderedDataset(
        planned, processor, assistant_turns=data.assistant_turns, max_image_pixels=data.max_image_pixels
    )
    batches = [list(range(i, min(i + batch_size, len(planned)))) for i in range(0, len(planned), batch_size)]
    mine = list(range(rank, len(batches), num_ranks))
    loader = DataLoader(
        dataset,
        batch_sampler=[batches[b] for b in mine],
        num_workers=data.num_workers,
        collate_fn=DPOCollator(pad_token_id=processor.tokenizer.pad_token_id),
    )
    was_training = model.training
    model.eval()
    rows = []
    for index, batch in tqdm(
        zip(mine, loader), total=len(mine), desc="reference log-probs", disable=rank != 0
    ):
        batch = to_device(batch, device)
        kwargs = {}
        if "pixel_values" in batch:
            features = model.model.vision_embed_tokens.per_image(batch["pixel_values"], batch["image_sizes"])
            kwargs = {"image_features": features, "sequence_images": batch["sequence_images"]}
        logps, _ = pair_logps(model, batch, kwargs)
        pairs = batch["input_ids"].shape[0] // 2
        rows.append((index, torch.stack([logps[:pairs], logps[pairs:]], dim=1).float().cpu()))
    model.train(was_training)
    return rows


def gathered_table(rows: list[tuple[int, torch.Tensor]], num_ranks: int) -> torch.Tensor:
    """Every rank's (batch index, rows), in batch order, as one (pairs, 2) table (on every rank)."""
    if num_ranks > 1:
        shares: list = [None] * num_ranks
        dist.all_gather_object(shares, rows)
        rows = [row for share in shares for row in share]
    return torch.cat([table for _, table in sorted(rows, key=lambda row: row[0])])


def reference_logps(
    model, processor, planned, recipe, start: Weights, run_dir: Path, accelerator
) -> torch.Tensor:
    """The table of reference log-probs for `planned`, from the cache or computed once, its batches shared out
    over the ranks (the model is whole on every rank here, before `prepare`), and cached by rank 0."""
    fields = key_fields(start, recipe, planned)
    path = cache_path(run_dir, fields)
    if accelerator.is_main_process:
        check_run_record(run_dir, fields, resuming=recipe.train.resume)
    cached = [path.exists()]
    if accelerator.num_processes > 1:  # rank 0's answer for all: they must all compute, or none
        dist.broadcast_object_list(cached, src=0)
    if cached[0]:
        log.info("reference log-probs: reusing %s", path)
    else:
        log.info(
            "reference log-probs: computing %d pairs once over %d rank(s), caching in %s",
            len(planned),
            accelerator.num_processes,
            path,
        )
        rows = compute(
            model,
            processor,
            planned,
            recipe.data,
            recipe.dpo.ref_batch_size,
            accelerator.device,
            rank=accelerator.process_index,
            num_ranks=accelerator.num_processes,
        )
        table = gathered_table(rows, accelerator.num_processes)
        if accelerator.is_main_process:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            save_file({"ref_logps": table}, str(tmp), metadata={"fields": json.dumps(fields, sort_keys=True)})
            tmp.replace(path)
    accelerator.wait_for_everyone()
    loaded = load_file(str(path))
    stored = json.loads(_metadata(path)["fields"])
    if stored != fields:
        raise ValueError(f"{path}: cached for other inputs than this run's; delete it to recompute")
    return loaded["ref_logps"]


def _metadata(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return handle.metadata()
