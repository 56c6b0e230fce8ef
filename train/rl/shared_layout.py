"""GRPO's prefix-sharing layout for the loss pass: one row per prompt, `prompt + completion 1 + ... + completion G`,
under a block mask where each completion sees the prompt and itself only (`train.core.losses.prefix_sharing_mask`, the
mask DPO's shared layout uses for its two completions). The prompt (most of its tokens are image slots) then goes
through the language model once per pass instead of G times; its gradient is exact (every completion reads the same
prompt activations, and the backward sums what flows into them from all G).

Positions: the prompt's tokens 0..p-1, each completion's tokens p, p+1, ... (where its row in the G-row layout has
them, left padding aside). Padding after the last completion is its own segment (it sees the prompt and padding;
no completion sees it). Logits are computed at the positions whose next token is a completion token of the same
segment, and once at the prompt's last token, whose logits give every completion's first token: `token_index` maps
each completion token (row-major over the G-row layout's completion mask) to its logit row.
"""

from __future__ import annotations

import torch

from data.collate import SEGMENT_PAD, SEGMENT_PROMPT

FIRST_COMPLETION_SEGMENT = SEGMENT_PAD + 1  # completion k of a prompt is segment FIRST_COMPLETION_SEGMENT + k


def shared_layout(
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    pad_token_id: int,
) -> dict[str, torch.Tensor]:
    """The B-row layout of B prompts (left-padded, (B, P)) and their B x G completions ((N, C), right-padded)."""
    prompts, rows = prompt_ids.shape[0], completion_ids.shape[0]
    group = rows // prompts
    prompt_lengths = prompt_mask.sum(1).tolist()
    completion_lengths = completion_mask.sum(1).tolist()
    width = max(
        prompt_lengths[b] + sum(completion_lengths[b * group : (b + 1) * group]) for b in range(prompts)
    )
    ids = torch.full((prompts, width), pad_token_id, dtype=prompt_ids.dtype)
    segments = torch.full((prompts, width), SEGMENT_PAD, dtype=torch.long)
    positions = torch.zeros((prompts, width), dtype=torch.long)
    keep = torch.zeros((prompts, width), dtype=torch.bool)
    wanted: list[
        tuple[int, int]
    ] = []  # (row, position of the logits) per completion token, in row-major order
    for b in range(prompts):
        p = prompt_lengths[b]
        ids[b, :p] = prompt_ids[b][prompt_mask[b].bool()]
        segments[b, :p] = SEGMENT_PROMPT
        positions[b, :p] = torch.arange(p)
        keep[b, p - 1] = True
        start = p
        for k in range(group):
            n = b * group + k
            m = completion_lengths[n]
            ids[b, start : start + m] = completion_ids[n][completion_mask[n].bool()]
            segments[b, start : start + m] = FIRST_COMPLETION_SEGMENT + k
            positions[b, start : start + m] = p + torch.arange(m)
            keep[b, start : start + m - 1] = True
            wanted += [(b, p - 1 if j == 0 else start + j - 1) for j in range(m)]
            start += m
    flat = keep.flatten().cumsum(0) - 1  # the logit row of each kept (row, position), row-major
    token_index = torch.tensor([int(flat[b * width + position]) for b, position in wanted], dtype=torch.long)
    return {
        "shared_input_ids": ids,
        "shared_segments": segments,
        "shared_position_ids": positions,
        "shared_keep": keep,
        "shared_token_index": token_index,
    }
