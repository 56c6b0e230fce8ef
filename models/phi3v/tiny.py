"""Tiny Phi-3-V-shaped models and tokenizers, built in-process, for the demo and the tests (nothing is downloaded).

The tokenizer mirrors the real one's structure (docs/phi3v.md#tokenizer-ids-and-chat-template): a byte-fallback BPE with the same normaliser
(prepend "▁", spaces -> "▁"), the same `<s>` post-processor and decoder, the Phi-3 chat and image special tokens
with the real flags (`<|assistant|>` and `<|image|>` swallow the whitespace after them), and the hub chat template.
Only the vocabulary is small, trained on the texts the caller gives. Code must therefore read special ids from
the tokenizer: they are not 32007/32044 here.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from .configuration import Phi3VConfig

# The demo's tiny Phi-3-V: the real layout with small widths; CLIP on 32 px crops of 8 px patches.
# initializer_range 0.1, not 0.02: with a frozen random lm_head and final norm (LoRA trains neither), logits can
# only spread by about |norm(h)| * |lm_head row| = sqrt(128) * std * sqrt(128); at 0.02 that caps the gap between
# the answer and the rest near 2.6 nats, and the loss cannot fall below ~4.
DEMO_MODEL = dict(
    hidden_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    vision_hidden_size=64,
    vision_layers=3,
    crop_size=32,
    patch_size=8,
    initializer_range=0.1,
)

CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|' + message['role'] + '|>' + '\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt and messages[-1]['role'] != 'assistant' %}{{- '<|assistant|>\n' -}}"
    "{% endif %}"
)
# (content, rstrip, special) as in the hub tokenizer.json.
BASE_TOKENS = [("<unk>", False, True), ("<s>", False, True), ("</s>", True, False)]
CHAT_TOKENS = [
    ("<|endoftext|>", False, True),
    ("<|assistant|>", True, True),
    ("<|system|>", False, True),
    ("<|end|>", False, True),
    ("<|user|>", False, True),
    ("<|image|>", True, True),
]


def _added_token(token_id: int, content: str, rstrip: bool, special: bool) -> dict:
    return {
        "id": token_id,
        "content": content,
        "single_word": False,
        "lstrip": False,
        "rstrip": rstrip,
        "normalized": False,
        "special": special,
    }


def build_tiny_tokenizer(texts: Iterable[str], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Train a small byte-fallback BPE on `texts` and dress it as the Phi-3 tokenizer. Deterministic for a given
    multiset of texts (they are sorted first)."""
    trainer_tok = Tokenizer(models.BPE(unk_token="<unk>"))
    trainer_tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    # Training splits words before "▁" so merges stay inside words; the final tokenizer, like the real one, has no
    # pre-tokenizer and applies those merges to the whole normalised string.
    trainer_tok.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[t for t, _, _ in BASE_TOKENS], show_progress=False
    )
    trainer_tok.train_from_iterator(sorted(set(texts)), trainer=trainer)
    spec = json.loads(trainer_tok.to_str())

    learned = sorted(spec["model"]["vocab"].items(), key=lambda kv: kv[1])[len(BASE_TOKENS) :]
    vocab = {t: i for i, (t, _, _) in enumerate(BASE_TOKENS)}
    for byte in range(256):
        vocab[f"<0x{byte:02X}>"] = len(vocab)
    for token, _ in learned:
        vocab.setdefault(token, len(vocab))
    added = [_added_token(i, *t) for i, t in enumerate(BASE_TOKENS)]
    added += [_added_token(len(vocab) + k, *t) for k, t in enumerate(CHAT_TOKENS)]

    spec["model"].update(vocab=vocab, byte_fallback=True, fuse_unk=True)
    spec["pre_tokenizer"] = None
    spec["added_tokens"] = added
    spec["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [
            {"SpecialToken": {"id": "<s>", "type_id": 0}},
            {"Sequence": {"id": "A", "type_id": 0}},
            {"SpecialToken": {"id": "<s>", "type_id": 1}},
            {"Sequence": {"id": "B", "type_id": 1}},
        ],
        "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}},
    }
    spec["decoder"] = {
        "type": "Sequence",
        "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0},
        ],
    }
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
        bos_token="<s>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        unk_token="<unk>",
        chat_template=CHAT_TEMPLATE,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )


def tiny_config(
    tokenizer: PreTrainedTokenizerFast,
    *,
    hidden_size: int = 64,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    intermediate_size: int | None = None,
    vision_hidden_size: int = 32,
    vision_layers: int = 3,
    crop_size: int = 32,
    patch_size: int = 8,
    initializer_range: float = 0.02,
) -> Phi3VConfig:
    """A Phi-3-V-shaped config: the real module layout, long/short RoPE switch and HD image path, tiny widths.

    The CLIP crop and patch sizes may be smaller than 336/14 (tests run fast); the token-count formula scales
    with them (`num_image_tokens(..., crop_size, patch_size)`).
    """
    half_head = hidden_size // num_attention_heads // 2
    vocab_size = -(-len(tokenizer) // 64) * 64  # the hub pads 32045 tokens to 32064 rows; pad likewise
    return Phi3VConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 2 * hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        initializer_range=initializer_range,
        max_position_embeddings=131072,
        original_max_position_embeddings=4096,
        rope_scaling={
            "type": "su",
            "short_factor": [1.0 + 0.01 * i for i in range(half_head)],
            "long_factor": [1.0 + 0.5 * i for i in range(half_head)],
        },
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|end|>"),
        pad_token_id=tokenizer.pad_token_id,
        image_token_id=tokenizer.convert_tokens_to_ids("<|image|>"),
        end_token_ids=[tokenizer.convert_tokens_to_ids(t) for t in ("<|end|>", "<|endoftext|>")],
        img_processor={
            "image_dim_out": vision_hidden_size,
            "num_img_tokens": (crop_size // patch_size // 2) ** 2,
            "vision_config": {
                "hidden_size": vision_hidden_size,
                "intermediate_size": 2 * vision_hidden_size,
                "num_hidden_layers": vision_layers,
                "num_attention_heads": 2,
                "image_size": crop_size,
                "patch_size": patch_size,
            },
        },
    )


def build_demo_model(texts: Iterable[str], *, num_crops: int, seed: int):
    """(model, processor) of the demo's tiny Phi-3-V: a tokenizer trained on `texts` (the synthetic data's), weights
    drawn from `seed`, DEMO_MODEL's widths and crop geometry."""
    from .image_processing import Phi3VImageProcessor
    from .modeling import Phi3VForCausalLM
    from .processing import Phi3VProcessor

    dims = dict(DEMO_MODEL)
    crop_size, patch_size = dims.pop("crop_size"), dims.pop("patch_size")
    tokenizer = build_tiny_tokenizer(texts)
    torch.manual_seed(seed)
    model = Phi3VForCausalLM(tiny_config(tokenizer, crop_size=crop_size, patch_size=patch_size, **dims))
    image_processor = Phi3VImageProcessor(num_crops=num_crops, crop_size=crop_size, patch_size=patch_size)
    return model, Phi3VProcessor(image_processor, tokenizer)
