"""Next-token logits at chosen positions of a padded batch, computing only what those logits depend on.

`Phi3VForCausalLM(..., logits_to_keep=keep)` runs every decoder layer at every (row, position) of the padded batch
and projects only the kept positions onto the vocabulary. For a loss on a few supervised tokens most of that work is
not needed (docs/architecture.md#sft-and-dpo-forward-on-real-tokens):

- padding: with right padding and causal attention no real token ever attends a pad position, so the pad positions
  change nothing; the per-token layers (norms, projections, MLP) run on the real tokens only, gathered into one
  (tokens, hidden) matrix, and only attention sees them laid out as (rows, padded length) again;
- the last decoder layer: its keys and values are needed at every real token, but its queries, attention output,
  MLP and the final norm only at the kept positions, whose logits are all that leave the model.

Two layouts take it: a right-padded batch under causal attention (SFT's `sft_loss_sum`, DPO's 2B-row
`completion_logps`: `real_tokens=True`), and DPO's prefix-sharing layout (`shared_completion_logps`,
data.collate.shared_layout), whose rows carry a (B, 1, T, T) boolean block mask and their own position ids: there
`real_tokens` is the (B, T) mask of the real tokens, attention runs under the block mask on the padded layout, and
the last layer's kept queries read their rows of it (the mask keeps every real query off the padding, as
train.core.losses.prefix_sharing_mask does).

The result equals the full forward's `logits_to_keep` logits up to float rounding (tests/models/test_supervised_forward.py,
tests/train/test_dpo_shared_prompt.py), and so do the gradients. (Dropout, e.g. LoRA's, draws its masks for the positions computed: the same distribution,
not the same random numbers as the full forward.)

The path runs inside the model's own forward: `supervised_logits` calls `model(..., real_tokens=True)` through
whatever wraps it (PeftModel, DDP, the DeepSpeed engine), and `Phi3VForCausalLM.forward` hands the call to
`real_token_logits`. So DDP's forward still prepares its reducer (the gradients are all-reduced as usual) and a
text-only batch on one of several ranks still runs the blank vision term (`Phi3VModel.embed_inputs`). The decoder's
layers are called through their modules' parts (LoRA layers included, since peft replaces the Linear modules in
place); under gradient checkpointing each layer's part is checkpointed as transformers' GradientCheckpointingLayer
checkpoints the layer (its `_gradient_checkpointing_func`, when the layer's `gradient_checkpointing` is set and it
trains with gradients enabled), so the backward recomputes it on the real tokens. It applies with SDPA (eager and
flash-attention-2 run the model's forward), a right-padded 2-D mask or the block-mask layout above, no packing
(`position_ids` on a 2-D mask), no cache, no sequence parallelism and plain parameters; under FSDP2 or ZeRO-3, whose
hooks gather a layer's parameters only when the layer module itself is called, and anywhere else, the model's own
forward runs.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from transformers.models.phi3.modeling_phi3 import apply_rotary_pos_emb

IMAGE_KEYS = ("pixel_values", "image_sizes", "image_features", "sequence_images")


def supervised_logits(model, inputs: dict, keep: torch.Tensor) -> torch.Tensor:
    """(N, vocab) logits at the positions `keep` (B, T) marks, row-major: `model(**inputs, logits_to_keep=keep)`'s
    logits, from the real-token path where the model's forward can take it (module docstring)."""
    return model(**inputs, logits_to_keep=keep, use_cache=False, real_tokens=True).logits


def real_token_logits(base: Any, inputs: dict, keep, real_tokens) -> torch.Tensor | None:
    """What `Phi3VForCausalLM.forward(**inputs, logits_to_keep=keep)` returns as logits, from the real tokens; None
    where the model's own forward must run. `inputs`: the forward's arguments other than logits_to_keep.
    `real_tokens`: True for a right-padded batch under causal attention (the 2-D attention mask says which tokens are
    real), or a (B, T) bool tensor of the real tokens of a batch whose `attention_mask` is a (B, 1, T, T) boolean
    block mask and whose `position_ids` are given (DPO's prefix-sharing layout, data.collate.shared_layout): the
    mask must keep every real query off the padding, as train.core.losses.prefix_sharing_mask does."""
    if not takes_real_tokens(base, inputs, keep, real_tokens):
        return None
    if isinstance(real_tokens, torch.Tensor):
        if not bool(
            ~(keep & ~real_tokens).any() & keep.any()
        ):  # kept positions are real tokens; one host sync
            return None
        return kept_logits(base, inputs, keep, real_tokens, inputs["attention_mask"], inputs["position_ids"])
    if not right_padded_keep(inputs["attention_mask"], keep):
        return None
    return kept_logits(base, inputs, keep, inputs["attention_mask"].bool())


# Arguments the path accepts: any other one a caller sets (not None or False: use_cache=True, labels, a cache,
# inputs_embeds, output_hidden_states ...) sends the call to the model's own forward.
ACCEPTED = {"input_ids", "attention_mask", *IMAGE_KEYS}


def takes_real_tokens(base: Any, inputs: dict, keep, real_tokens) -> bool:
    """Whether the call's arguments and the model's set-up allow the path (module docstring); no host sync."""
    blocked = isinstance(real_tokens, torch.Tensor)
    given = {k for k, v in inputs.items() if v is not None and v is not False}
    accepted = ACCEPTED | ({"position_ids"} if blocked else set())
    if given - accepted or not {"input_ids", "attention_mask"} <= given:
        return False
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    if not (isinstance(keep, torch.Tensor) and keep.dtype == torch.bool and keep.shape == ids.shape):
        return False
    rows, length = ids.shape
    if blocked:
        shapes_fit = (
            real_tokens.dtype == torch.bool
            and real_tokens.shape == ids.shape
            and mask.dtype == torch.bool
            and mask.shape == (rows, 1, length, length)
            and "position_ids" in given
            and inputs["position_ids"].shape == ids.shape
        )
    else:
        shapes_fit = mask.shape == ids.shape
    config, decoder = base.config, base.model
    return (
        shapes_fit
        and config._attn_implementation == "sdpa"
        and not decoder.splits_sequence(None, False)
        and not (config.sliding_window is not None and length > config.sliding_window)
        and plain_parameters(decoder)
    )


def plain_parameters(decoder) -> bool:
    """False under FSDP2 (each layer a `fully_shard`ed FSDPModule) or DeepSpeed ZeRO-3 (parameters with a `ds_id`):
    their hooks gather a layer's parameters when the layer module is called, which this path does not do."""
    from torch.distributed.fsdp import FSDPModule

    layer = decoder.layers[0]
    return not isinstance(layer, FSDPModule) and not any(hasattr(p, "ds_id") for p in layer.parameters())


def right_padded_keep(mask: torch.Tensor, keep: torch.Tensor) -> bool:
    """Whether every row's tokens come first (right padding, no empty row), every kept position is a token, and
    at least one position is kept. One host sync for all three."""
    real = mask.bool()
    ordered = (real[:, 1:] <= real[:, :-1]).all() & real[:, 0].all()
    return bool(ordered & ~(keep & ~real).any() & keep.any())


def kept_logits(
    base: Any,
    inputs: dict,
    keep: torch.Tensor,
    real: torch.Tensor,
    block_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """The logits at `keep` from the decoder run on the `real` tokens: causal attention over a right-padded batch, or
    attention under `block_mask` (B, 1, T, T) with RoPE at `position_ids` (B, T)."""
    decoder = base.model
    rows, length = inputs["input_ids"].shape
    embeds = decoder.embed_inputs(inputs["input_ids"], **{k: inputs[k] for k in IMAGE_KEYS if k in inputs})
    layout = TokenLayout(real, keep, block_mask)
    # RoPE as Phi3Model computes it (its long/short switch reads the largest position): for this padded length, or
    # at the given positions.
    if position_ids is None:
        cos, sin = decoder.rotary_emb(embeds, torch.arange(length, device=embeds.device).unsqueeze(0))
        cos, sin = cos[0, layout.columns], sin[0, layout.columns]
    else:
        cos, sin = decoder.rotary_emb(embeds, position_ids)
        cos, sin = cos.flatten(0, 1)[layout.real], sin.flatten(0, 1)[layout.real]
    hidden = embeds.reshape(rows * length, -1)[layout.real]  # (tokens, hidden)
    *body, last = decoder.layers[: base.config.num_hidden_layers]
    for layer in body:
        hidden = run_layer(layer_on_tokens, layer, hidden, cos, sin, layout)
    hidden = run_layer(last_layer_at_kept, last, hidden, cos, sin, layout)
    return base.lm_head(decoder.norm(hidden))


def run_layer(part, layer, hidden, cos, sin, layout: TokenLayout) -> torch.Tensor:
    """`part(layer, hidden, cos, sin, layout)`, checkpointed where transformers' GradientCheckpointingLayer would
    checkpoint the layer's forward: the tensors positional (what a re-entrant checkpoint needs to pass gradients)."""
    if getattr(layer, "gradient_checkpointing", False) and layer.training and torch.is_grad_enabled():
        return layer._gradient_checkpointing_func(partial(part, layer, layout=layout), hidden, cos, sin)
    return part(layer, hidden, cos, sin, layout)


class TokenLayout:
    """Where the real tokens and the kept positions of a (B, T) batch sit, as flat indices, and the attention masks:
    causal (a right-padded batch: no mask for the body layers) or rows of a given (B, 1, T, T) block mask."""

    def __init__(self, real: torch.Tensor, keep: torch.Tensor, block_mask: torch.Tensor | None = None):
        self.rows, self.length = real.shape
        self.real = real.flatten().nonzero().squeeze(1)  # (tokens,) flat (row, position) indices, row-major
        self.columns = self.real % self.length  # each token's position
        kept = keep.flatten().nonzero().squeeze(1)  # (N,)
        rank = torch.full((self.rows * self.length,), -1, dtype=torch.long, device=real.device)
        rank[self.real] = torch.arange(self.real.numel(), device=real.device)
        self.kept_tokens = rank[kept]  # (N,) indices into the real tokens
        # Kept positions laid out (rows, most kept in a row): slot j of row b is b's j-th kept position.
        per_row = keep.sum(dim=1)
        self.queries = int(per_row.max()) if kept.numel() else 0
        slot = (keep.cumsum(dim=1) - 1).flatten()[kept]
        self.kept_slots = (kept // self.length) * self.queries + slot
        query_columns = torch.zeros(self.rows * self.queries, dtype=torch.long, device=real.device)
        query_columns[self.kept_slots] = (
            kept % self.length
        )  # an empty slot looks at position 0 only (no NaN row)
        self.body_mask = block_mask  # None: causal
        if block_mask is None:
            key_columns = torch.arange(self.length, device=real.device)
            self.kept_mask = (key_columns <= query_columns.view(self.rows, self.queries, 1)).unsqueeze(1)
        else:  # each kept query's row of the block mask
            index = query_columns.view(self.rows, self.queries, 1).expand(-1, -1, self.length)
            self.kept_mask = block_mask[:, 0].gather(1, index).unsqueeze(1)

    def padded(self, tokens: torch.Tensor) -> torch.Tensor:
        """(tokens, heads, d) -> (B, heads, T, d), zeros at the pad positions."""
        out = tokens.new_zeros(self.rows * self.length, *tokens.shape[1:]).index_copy(0, self.real, tokens)
        return out.view(self.rows, self.length, *tokens.shape[1:]).transpose(1, 2)

    def unpadded(self, attended: torch.Tensor) -> torch.Tensor:
        """(B, heads, T, d) -> (tokens, heads * d)."""
        return attended.transpose(1, 2).reshape(self.rows * self.length, -1)[self.real]


def split_heads(attn, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Phi3Attention's fused qkv projection, split into (tokens, heads, d) q, k, v with RoPE applied to q and k."""
    qkv = attn.qkv_proj(hidden)
    d = attn.head_dim
    q_end = attn.config.num_attention_heads * d
    kv_end = q_end + attn.num_key_value_heads * d
    q = qkv[:, :q_end].unflatten(-1, (-1, d))
    k = qkv[:, q_end:kv_end].unflatten(-1, (-1, d))
    v = qkv[:, kv_end:].unflatten(-1, (-1, d))
    q, k = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)
    return q, k, v


def attend(attn, q, k, v, mask: torch.Tensor | None) -> torch.Tensor:
    """SDPA as transformers' sdpa_attention_forward calls it: causal without a mask, the given mask otherwise."""
    return F.scaled_dot_product_attention(
        q,
        k,
        v,
        attn_mask=mask,
        dropout_p=attn.attention_dropout if attn.training else 0.0,
        scale=attn.scaling,
        is_causal=mask is None,
        enable_gqa=attn.num_key_value_groups > 1,
    )


def mlp_block(layer, hidden: torch.Tensor) -> torch.Tensor:
    return hidden + layer.resid_mlp_dropout(layer.mlp(layer.post_attention_layernorm(hidden)))


def layer_on_tokens(layer, hidden, cos, sin, layout: TokenLayout) -> torch.Tensor:
    """Phi3DecoderLayer on the real tokens (tokens, hidden); attention on the padded layout, causal or under the
    block mask."""
    attn = layer.self_attn
    q, k, v = split_heads(attn, layer.input_layernorm(hidden), cos, sin)
    attended = attend(attn, layout.padded(q), layout.padded(k), layout.padded(v), layout.body_mask)
    hidden = hidden + layer.resid_attn_dropout(attn.o_proj(layout.unpadded(attended)))
    return mlp_block(layer, hidden)


def last_layer_at_kept(layer, hidden, cos, sin, layout: TokenLayout) -> torch.Tensor:
    """The last Phi3DecoderLayer's output at the kept positions only (N, hidden): keys and values from every real
    token, queries from the kept ones (rows x most kept per row, each seeing the positions up to its own)."""
    attn = layer.self_attn
    q, k, v = split_heads(attn, layer.input_layernorm(hidden), cos, sin)
    queries = q.new_zeros(layout.rows * layout.queries, *q.shape[1:]).index_copy(
        0, layout.kept_slots, q[layout.kept_tokens]
    )
    queries = queries.view(layout.rows, layout.queries, *q.shape[1:]).transpose(1, 2)
    attended = attend(attn, queries, layout.padded(k), layout.padded(v), layout.kept_mask)
    attended = attended.transpose(1, 2).reshape(layout.rows * layout.queries, -1)[layout.kept_slots]
    hidden = hidden[layout.kept_tokens] + layer.resid_attn_dropout(attn.o_proj(attended))
    return mlp_block(layer, hidden)
