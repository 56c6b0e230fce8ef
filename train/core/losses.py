"""What the training stages' losses share: SFT's summed token cross-entropy, and the completion log-probs the
preference stages score (DPO's stage loss is train/preference/stage_loss.py, GRPO's train/rl/step.py).

Each returns the SUM of its per-unit losses (units: supervised tokens for SFT, pairs for DPO) and the loop divides
by the units of the whole optimizer step (train/core/loop.py). Logits are computed only at the (row, position) pairs whose
next token is supervised: transformers' `logits_to_keep` given as a (B, T) boolean mask returns them flattened,
(N, vocab), so neither a 2,500-token image nor another row's supervised positions cost a vocabulary projection.

The prefix-sharing mask (`prefix_sharing_mask`) serves both preference stages: DPO's pair and GRPO's group of
completions share one prompt row.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F

from data.render import IGNORE_INDEX
from models.phi3v.sequence_parallel import SequenceParallel
from models.phi3v.supervised_forward import supervised_logits

MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids", "pixel_values", "image_sizes")


def model_inputs(batch: dict) -> dict:
    return {k: batch[k] for k in MODEL_INPUTS if k in batch}


def supervised_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """((B, T) bool: positions t whose next token labels[t + 1] is supervised, (N,) those tokens, row-major)."""
    supervised = labels[:, 1:] != IGNORE_INDEX
    return F.pad(supervised, (0, 1)), labels[:, 1:][supervised]


def sft_loss_sum(model, batch: dict, sp: SequenceParallel | None = None) -> tuple[torch.Tensor, dict]:
    """Summed cross-entropy over supervised tokens; logits only at their (row, position) pairs, (N, vocab), computed
    on the real tokens only where `supervised_logits` can (models/phi3v/supervised_forward.py). Under sequence
    parallelism, the sum over this rank's chunk of the sequence (the group's chunks add up to the whole)."""
    keep, targets = supervised_positions(batch["labels"])
    if sp is None:
        logits = supervised_logits(model, model_inputs(batch), keep)  # (N, V)
        return F.cross_entropy(logits.float(), targets, reduction="sum"), {}
    with sp.splitting():
        logits = model(
            **model_inputs(batch), logits_to_keep=keep, use_cache=False
        ).logits  # this chunk's (n, V)
    local = sp.local_rows(keep) >= 0
    return F.cross_entropy(logits.float(), targets[local], reduction="sum"), {}


def supervised_tokens(batch: dict, sp: SequenceParallel | None = None) -> int:
    """The supervised tokens of a batch; under sequence parallelism those of this rank's chunk (the loop adds every
    rank's count, and a group's chunks add up to its batch's)."""
    if sp is None:
        return int(batch["num_supervised_tokens"])
    return int((sp.local_rows(supervised_positions(batch["labels"])[0]) >= 0).sum())


def token_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) per row of (N, V) logits, in float32."""
    logits = logits.float()
    return logits.gather(1, targets.unsqueeze(1)).squeeze(1) - logits.logsumexp(dim=1)


def kept_token_logps(
    logits: torch.Tensor,
    keep: torch.Tensor,
    token_index: torch.Tensor | None,
    targets: torch.Tensor,
    sp: SequenceParallel | None,
) -> torch.Tensor:
    """log p(targets[i]) whose logits sit at kept position `token_index[i]` of `keep` (row-major; None: position i,
    one target per kept position, and no copy of the (N, vocab) logits). `logits` are the model's for `keep`; under
    sequence parallelism those of this rank's chunk: each rank scores the targets it holds and the group sums them,
    so every rank gets every target's log-prob."""
    if sp is None:
        return token_logps(logits if token_index is None else logits[token_index], targets)
    rows = sp.local_rows(keep)
    rows = rows if token_index is None else rows[token_index]
    here = (rows >= 0).nonzero().squeeze(1)
    values = torch.zeros(targets.shape[0], dtype=torch.float32, device=logits.device)
    values = values.index_put((here,), token_logps(logits[rows[here]], targets[here]))
    return sp.sum(values)


def splitting(sp: SequenceParallel | None):
    return sp.splitting() if sp is not None else nullcontext()


def completion_logps(
    model, batch: dict, image_kwargs: dict, sp: SequenceParallel | None = None, real_tokens: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-probs, token counts) of each of the 2B rows' supervised tokens, on the 2B-row layout; only the
    supervised (row, position) pairs get logits, from the decoder on the real tokens where it can
    (models/phi3v/supervised_forward.py; `real_tokens=False`: the model's forward)."""
    keep, targets = supervised_positions(batch["labels"])
    # use_cache=False: no cache in training, and with packed position_ids a cache would let samples see each other.
    with splitting(sp):
        logits = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            logits_to_keep=keep,
            use_cache=False,
            real_tokens=real_tokens,
            **image_kwargs,
        ).logits  # (N, V)
    rows = keep.nonzero()[:, 0]
    logps = kept_token_logps(logits, keep, None, targets, sp)
    sums = torch.zeros(keep.shape[0], dtype=torch.float32, device=logits.device)
    return sums.index_add(0, rows, logps), keep.sum(dim=1)


def unwrapped(model):
    """The module inside DDP / DeepSpeed wrappers (their forward must still be the one called)."""
    while hasattr(model, "module"):
        model = model.module
    return model


def attn_implementation(model) -> str:
    return getattr(unwrapped(model).config, "_attn_implementation", "sdpa")


def prefix_sharing_mask(segments: torch.Tensor, attn_implementation: str, dtype: torch.dtype) -> torch.Tensor:
    """(B, 1, L, L) attention mask of the prefix-sharing layout (data.collate.shared_layout): query q sees key
    k <= q when k is in the prompt or in q's own segment. Padding sees the prompt and padding, so that no row is
    empty (an empty row gives NaN under SDPA, and NaN x 0 in the backward). Boolean (True = attend) for SDPA, additive
    for eager."""
    from data.collate import SEGMENT_PROMPT

    length = segments.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=segments.device).tril()
    query, key = segments[:, :, None], segments[:, None, :]
    allowed = (causal & ((key == SEGMENT_PROMPT) | (key == query)))[:, None]
    if attn_implementation == "eager":
        return torch.zeros(allowed.shape, dtype=dtype, device=segments.device).masked_fill(
            ~allowed, torch.finfo(dtype).min
        )
    return allowed
