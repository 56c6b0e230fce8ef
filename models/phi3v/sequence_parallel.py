"""Sequence parallelism for Phi-3-V: one sequence split over a group of N ranks, after the image merge.

Every rank of a group holds the same micro-batch. A forward under `SequenceParallel.splitting()`:

1. **Crops sharded over the group** (`encode_rows`): the CLIP tower's input rows (each image's global view and its
   crops) are cut into N contiguous shares; each rank runs the tower on its share (a rank whose share is empty runs
   one blank crop times 0, so every rank runs the same modules: DDP, ZeRO-3 and FSDP need that), and the outputs are
   gathered in order. No rank runs the whole tower; the separators and the projector then run on every rank.
2. **Merge on the full sequence**: the features are written into the token embeddings of the whole sequence, so a
   split never cuts through an image slot.
3. **Split**: embeddings, RoPE tables and positions are padded to a multiple of N and each rank keeps its contiguous
   chunk. RoPE is computed from the *global* positions of the unpadded sequence, so Phi-3's long/short factor switch
   (at 4096 positions) reads the full length on every rank, exactly as with N = 1. The padding sits at the end: under
   causal attention no real token attends to it, and it is never supervised.
4. **Ulysses attention** (`ulysses`): each decoder layer's q, k, v (B, H, T/N, D) are exchanged with one all-to-all
   into (B, H/N, T, D): every rank attends over the whole sequence for H/N heads, with the same mask as N = 1, then a
   second all-to-all brings the output back to (B, T/N, H, D). Norms, MLPs and projections run on the local chunk.
5. The decoder returns the local chunk's hidden states; `local_keep` cuts a (B, T) mask of the positions whose
   logits a loss needs to the same chunk.

The attention hook is registered in transformers' attention interface under the existing names (`sdpa`,
`flash_attention_2`): the wrapper calls the original function unchanged unless the layer was called with the
`sequence_parallel` keyword, which only `decoder_forward` passes. A gradient-checkpointed layer replays its call
with the same keywords, so the recomputation runs the same collectives on every rank.
(docs/distributed.md#sequence-parallelism)
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.distributed as dist
import torch.nn.functional as F
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS


class SequenceParallel:
    """A sequence-parallel group: its process group, size and this rank's place in it. `splitting()` turns the split
    on for the forwards inside it (training passes); elsewhere (validation, generation) the model runs whole."""

    def __init__(self, group, size: int, rank: int):
        self.group, self.size, self.rank = group, size, rank
        self.active = False
        register_attention_hooks()

    @contextlib.contextmanager
    def splitting(self):
        previous, self.active = self.active, True
        try:
            yield self
        finally:
            self.active = previous

    @property
    def is_owner(self) -> bool:
        """The group's first rank: the one that reports a loss computed whole on every rank of the group."""
        return self.rank == 0

    def padded_length(self, length: int) -> int:
        return -(-length // self.size) * self.size

    def chunk(self, tensor: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's contiguous chunk of a tensor whose `dim` has the padded length."""
        step = tensor.shape[dim] // self.size
        return tensor.narrow(dim, self.rank * step, step)

    def local_keep(self, keep: torch.Tensor) -> torch.Tensor:
        """(B, T) bool -> (B, T_padded / N): the chunk of the kept positions this rank computes."""
        pad = self.padded_length(keep.shape[1]) - keep.shape[1]
        return self.chunk(F.pad(keep, (0, pad), value=False))

    def local_rows(self, keep: torch.Tensor) -> torch.Tensor:
        """For each kept position of `keep` (B, T) (row-major), its row in this rank's logits (those of
        `local_keep(keep)`, row-major), or -1 where another rank of the group computes it."""
        padded = F.pad(keep, (0, self.padded_length(keep.shape[1]) - keep.shape[1]), value=False)
        mine = torch.zeros_like(padded)
        self.chunk(mine).copy_(self.chunk(padded))
        rows = torch.full(padded.shape, -1, dtype=torch.long, device=keep.device)
        rows[mine] = torch.arange(int(mine.sum()), device=keep.device)
        return rows[padded]

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The tensor summed over the group, on every rank; its gradient is summed over the group too, so a loss
        computed whole on every rank from it must count on one rank only (`is_owner`)."""
        return AllReduceSum.apply(tensor, self.group)


def decoder_forward(
    decoder,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    sp: SequenceParallel,
    **kwargs,
) -> BaseModelOutputWithPast:
    """Phi3Model.forward's decoder on this rank's chunk of the full sequence `inputs_embeds` (B, T, hidden), with
    Ulysses attention; returns the chunk's final hidden states (B, T_padded / N, hidden). The mask is built for the
    full (padded) sequence, as N = 1 builds it: attention sees the whole sequence."""
    rows, length, _ = inputs_embeds.shape
    config = decoder.config
    if position_ids is None:
        position_ids = torch.arange(length, device=inputs_embeds.device).unsqueeze(0).expand(rows, -1)
    cos, sin = decoder.rotary_emb(
        inputs_embeds, position_ids
    )  # the global positions: the 4096 switch as N = 1
    pad = sp.padded_length(length) - length
    if pad:
        inputs_embeds = F.pad(inputs_embeds, (0, 0, 0, pad))
        cos, sin = (torch.cat([t, t[:, -1:].expand(-1, pad, -1)], 1) for t in (cos, sin))
        position_ids = torch.cat(
            [position_ids, position_ids[:, -1:] + torch.arange(1, pad + 1, device=position_ids.device)], 1
        )
        attention_mask = pad_mask(attention_mask, pad)
    mask_function = create_causal_mask if config.sliding_window is None else create_sliding_window_causal_mask
    mask = mask_function(
        config=config,
        inputs_embeds=inputs_embeds,
        attention_mask=attention_mask,
        cache=None,
        position_ids=position_ids,
    )
    hidden = sp.chunk(inputs_embeds)
    position_embeddings = (sp.chunk(cos), sp.chunk(sin))
    local_positions = sp.chunk(position_ids)
    for layer in decoder.layers[: config.num_hidden_layers]:
        hidden = layer(
            hidden,
            attention_mask=mask,
            position_ids=local_positions,
            position_embeddings=position_embeddings,
            sequence_parallel=sp,
            **kwargs,
        )
    return BaseModelOutputWithPast(last_hidden_state=decoder.norm(hidden))


def pad_mask(mask: torch.Tensor | None, pad: int) -> torch.Tensor | None:
    """The attention mask of a sequence extended by `pad` positions at the end. A 2-D padding mask marks them as
    tokens (causal attention keeps every real token from seeing them; a mask of ones stays one that SDPA may skip);
    a 4-D mask (DPO's block layout) lets them see every earlier position, so no row is empty."""
    if mask is None:
        return None
    if mask.dim() == 2:
        return F.pad(mask, (0, pad), value=1)
    rows, heads, length, _ = mask.shape
    total = length + pad
    causal = torch.ones(total, total, dtype=torch.bool, device=mask.device).tril()
    if mask.dtype == torch.bool:
        out = causal.expand(rows, heads, total, total).clone()
        out[..., :length, :length] = mask
        out[..., :length, length:] = False
        return out
    out = torch.zeros(rows, heads, total, total, dtype=mask.dtype, device=mask.device)
    out.masked_fill_(~causal, torch.finfo(mask.dtype).min)
    out[..., :length, :length] = mask
    return out


def heads_to_sequence(x: torch.Tensor, sp: SequenceParallel) -> torch.Tensor:
    """(B, H, T/N, D) on each rank -> (B, H/N, T, D): this rank's heads over the whole sequence."""
    rows, heads, chunk, dim = x.shape
    x = x.reshape(rows, sp.size, heads // sp.size, chunk, dim).transpose(0, 1).contiguous()
    x = AllToAll.apply(x, sp.group)  # [j] = rank j's chunk of this rank's heads
    return x.permute(1, 2, 0, 3, 4).reshape(rows, heads // sp.size, sp.size * chunk, dim)


def sequence_to_heads(x: torch.Tensor, sp: SequenceParallel) -> torch.Tensor:
    """(B, T, H/N, D) attention output -> (B, T/N, H, D): every head of this rank's chunk."""
    rows, length, heads, dim = x.shape
    chunk = length // sp.size
    x = x.reshape(rows, sp.size, chunk, heads, dim).transpose(0, 1).contiguous()
    x = AllToAll.apply(x, sp.group)  # [j] = rank j's heads of this rank's chunk
    return x.permute(1, 2, 0, 3, 4).reshape(rows, chunk, sp.size * heads, dim)


def ulysses(base):
    """An attention function that runs `base` whole when called without `sequence_parallel`, and as Ulysses
    all-to-all attention with it."""

    @functools.wraps(base)
    def attention(module, query, key, value, attention_mask, *args, sequence_parallel=None, **kwargs):
        if (
            sequence_parallel is None
        ):  # not `active`: a checkpointed layer recomputes after splitting() has ended
            return base(module, query, key, value, attention_mask, *args, **kwargs)
        sp = sequence_parallel
        query, key, value = (heads_to_sequence(t, sp) for t in (query, key, value))
        kwargs.pop("position_ids", None)  # local positions; the full-sequence mask already holds the layout
        output, _ = base(module, query, key, value, attention_mask, *args, **kwargs)
        return sequence_to_heads(output, sp), None

    attention.is_ulysses = True
    return attention


# Not "eager": it is no registered function but each model file's own default (CLIP's differs from Phi3's), and it
# materialises T x T scores, which long sequences are the reason to split.
SPLIT_ATTENTION = ("sdpa", "flash_attention_2")


def register_attention_hooks() -> None:
    """Wrap the registered attention functions once per process (module docstring)."""
    for name in SPLIT_ATTENTION:
        current = ALL_ATTENTION_FUNCTIONS.get(name)
        if current is not None and not getattr(current, "is_ulysses", False):
            ALL_ATTENTION_FUNCTIONS.register(name, ulysses(current))


def encode_rows(trunk, rows: torch.Tensor, sp: SequenceParallel) -> torch.Tensor:
    """`trunk(rows)` for all (R, ...) rows, each rank running about R/N of them: rank r takes a contiguous share,
    the shares are gathered in order. A rank whose share is empty runs one blank row times 0 (same modules on
    every rank)."""
    counts = [len(range(r, rows.shape[0], sp.size)) for r in range(sp.size)]
    start = sum(counts[: sp.rank])
    mine = rows[start : start + counts[sp.rank]]
    if mine.shape[0] == 0:
        out = trunk(torch.zeros_like(rows[:1]))
        out = out[:0] + 0.0 * out.sum()
    else:
        out = trunk(mine)
    return GatherRows.apply(out, counts, sp.group)


class AllToAll(torch.autograd.Function):
    """all_to_all_single over dim 0 (N equal parts); its own adjoint."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        x = x.contiguous()
        out = torch.empty_like(x)
        dist.all_to_all_single(out, x, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        out = torch.empty_like(grad)
        dist.all_to_all_single(out, grad, group=ctx.group)
        return out, None


class AllReduceSum(torch.autograd.Function):
    """Sum over the group; the gradient is summed over the group as well (each rank's input feeds every rank)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        out = x.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class GatherRows(torch.autograd.Function):
    """Each rank's (counts[r], ...) rows -> all rows in rank order, on every rank. Backward: the gradient of every
    row summed over the group (every rank's loss reads every row), this rank's rows kept."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, counts: list[int], group) -> torch.Tensor:
        ctx.counts, ctx.group = counts, group
        most = max(counts)
        padded = x.new_zeros(most, *x.shape[1:])
        padded[: x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in counts]
        dist.all_gather(parts, padded.contiguous(), group=group)
        return torch.cat([part[:n] for part, n in zip(parts, counts)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        rank = dist.get_rank(group=ctx.group)
        start = sum(ctx.counts[:rank])
        return grad[start : start + ctx.counts[rank]], None, None
