"""Phi-3-Vision on transformers' own Phi3 decoder, in the hub checkpoint's layout.

`Phi3VForCausalLM(Phi3ForCausalLM)` whose `.model` is a `Phi3VModel(Phi3Model)` holding `vision_embed_tokens`
(CLIP tower, separators, projector). Parameter names equal the hub's `model.safetensors.index.json` keys, so
`from_pretrained` reads the unmodified hub checkpoint and `save_pretrained` writes the same layout. TRL's trainers
and PEFT see an ordinary Phi3 causal LM.

Image slots are the positive `<|image|>` id (`config.image_token_id`, 32044 on the hub); the official model's
negative ids and its in-place `input_ids` clamp (docs/phi3v.md#official-in-place-clamp) do not exist here: nothing mutates its inputs.
"""

from __future__ import annotations

import importlib.util

import torch
from torch import nn
from transformers import Phi3ForCausalLM, Phi3Model
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.models.clip.modeling_clip import CLIPVisionEmbeddings
from transformers.models.phi3.modeling_phi3 import (
    Phi3DecoderLayer,
    Phi3PreTrainedModel,
    Phi3RMSNorm,
    Phi3RotaryEmbedding,
)

from runtime.processes import several_processes

from .configuration import Phi3VConfig
from .sequence_parallel import SPLIT_ATTENTION, SequenceParallel, decoder_forward
from .supervised_forward import real_token_logits
from .vision import Phi3VImageEmbedding

ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")


class Phi3VPreTrainedModel(Phi3PreTrainedModel):
    config_class = Phi3VConfig
    config: Phi3VConfig
    _no_split_modules = ["Phi3DecoderLayer", "CLIPEncoderLayer"]

    def _init_weights(self, module):
        super()._init_weights(module)
        std = self.config.initializer_range
        # transformers' `init` functions skip tensors already loaded from a checkpoint.
        if isinstance(module, Phi3VImageEmbedding):
            # The official code starts the separators at zero; random ones make a randomly initialised model
            # sensitive to where they sit, which is what tests of a tiny model need to see.
            init.normal_(module.glb_GN, std=std)
            init.normal_(module.sub_GN, std=std)
        elif isinstance(module, CLIPVisionEmbeddings):
            init.normal_(module.class_embedding, std=module.embed_dim**-0.5)
            init.copy_(module.position_ids, torch.arange(module.num_positions).expand((1, -1)))


class Phi3VModel(Phi3VPreTrainedModel, Phi3Model):
    """The Phi3 decoder whose input embeddings carry image features at the `<|image|>` slots.

    `sequence_parallel` (set by `enable_sequence_parallel`): inside its `splitting()`, a forward without a cache
    merges the image features on the full sequence and runs the decoder on this rank's chunk of it
    (models/phi3v/sequence_parallel.py)."""

    sequence_parallel: SequenceParallel | None = None

    def __init__(self, config: Phi3VConfig):
        # Phi3Model.__init__ would initialise every weight once before the vision tower exists and once after:
        # build its four parts here instead (same names, same classes) and initialise once.
        Phi3VPreTrainedModel.__init__(self, config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([Phi3DecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = Phi3RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = Phi3RotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.vision_embed_tokens = Phi3VImageEmbedding(config)
        self.post_init()

    def embed_inputs(
        self,
        input_ids: torch.LongTensor,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        image_features: list[torch.Tensor] | torch.Tensor | None = None,
        sequence_images: list[list[int]] | None = None,
        *,
        starts_sequence: bool = True,
    ) -> torch.Tensor:
        """Token embeddings with image features written at the image slots, out of place.

        Features fill the slots in row-major (sample, position) order, images in the order given, as the official
        model does. `image_features` (one tensor per image, from `vision_embed_tokens.per_image(...)`, or all images' features in one
        tensor, from `vision_embed_tokens(...)`) skips the vision pass.
        `sequence_images[row]` lists the images (indices into the given ones) that row `row` holds, in slot order:
        a batch can then carry each image once for several rows (DPO: chosen and rejected share the prompt's image).
        An empty `image_features` says the caller ran the vision path itself and this batch has no image.
        `starts_sequence`: False for a decoding step that extends a cache (no rank runs the vision path there).
        """
        embeds = self.embed_tokens(input_ids)
        slots = input_ids == self.config.image_token_id
        if image_features is None and pixel_values is None:
            if starts_sequence and several_processes():
                return embeds + self.blank_image_term(embeds)
            return embeds
        if image_features is not None and len(image_features) == 0 and not bool(slots.any()):
            return embeds
        if image_features is None:
            encode = (
                self.vision_embed_tokens if sequence_images is None else self.vision_embed_tokens.per_image
            )
            image_features = encode(pixel_values, image_sizes)
        if isinstance(image_features, torch.Tensor):
            features = image_features
        else:
            per_image = list(image_features)
            if sequence_images is not None:
                per_image = [per_image[j] for row in sequence_images for j in row]
            features = torch.cat(per_image)
        num_slots = int(slots.sum())
        if num_slots != features.shape[0]:
            raise ValueError(
                f"input_ids hold {num_slots} image slots (id {self.config.image_token_id}) but the images give "
                f"{features.shape[0]} features: the ids and the images must come from the same processor call"
            )
        return embeds.masked_scatter(slots.unsqueeze(-1), features.to(embeds.dtype))

    def splits_sequence(self, cache=None, use_cache: bool | None = None) -> bool:
        """Whether this forward runs on a chunk of the sequence: sequence parallelism is on and splitting, and no
        cache is built or read (training and scoring passes, never generation)."""
        sp = self.sequence_parallel
        return sp is not None and sp.active and cache is None and not use_cache

    def blank_image_term(self, embeds: torch.Tensor) -> torch.Tensor:
        """0 x the features of one blank crop. A text-only batch still runs the vision path (in training, eval and a
        generation's first step alike), so that every rank runs the same modules in every forward: DDP then finds no
        unused parameter, and ZeRO-3 and FSDP, which gather each module's parameters with a collective call on all
        ranks, do not hang when one rank has no image (docs/distributed.md#one-vision-pass-per-forward-on-every-rank).
        Only run when several processes work together (`several_processes`): one process has no other rank to wait
        for, and a text-only batch then skips the CLIP pass entirely."""
        s = self.vision_embed_tokens.crop_size
        blank = torch.zeros(1, 3, s, s, dtype=torch.uint8, device=embeds.device)
        features = self.vision_embed_tokens(blank, torch.tensor([[s, s]]))
        return 0.0 * features.sum().to(embeds.dtype)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        image_features: list[torch.Tensor] | torch.Tensor | None = None,
        sequence_images: list[list[int]] | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        if inputs_embeds is None and input_ids is not None:
            starts = cache is None or cache.get_seq_length() == 0
            inputs_embeds = self.embed_inputs(
                input_ids, pixel_values, image_sizes, image_features, sequence_images, starts_sequence=starts
            )
            input_ids = None
        if self.splits_sequence(cache, use_cache):
            return decoder_forward(
                self, inputs_embeds, attention_mask, position_ids, self.sequence_parallel, **kwargs
            )
        return super().forward(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )


class Phi3VForCausalLM(Phi3VPreTrainedModel, Phi3ForCausalLM):
    """Phi-3-Vision / Phi-3.5-vision. `model(**processor(text=..., images=...))` returns logits;
    `generate(**inputs)` stops at `<|end|>` or `<|endoftext|>`."""

    def __init__(self, config: Phi3VConfig):
        # Not Phi3ForCausalLM.__init__: it would build (and initialise) a text-only Phi3Model first.
        Phi3VPreTrainedModel.__init__(self, config)
        self.model = Phi3VModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()
        # The hub's generation_config says eos 2; the model ends its turns with <|end|> (docs/phi3v.md#tokenizer-ids-and-chat-template).
        self.generation_config.eos_token_id = list(end_ids(config))
        self.generation_config.pad_token_id = config.pad_token_id

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        cache=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ):
        # Phi3ForCausalLM.forward's parameters, named (generate validates its arguments against them). Under sequence
        # parallelism the decoder returns this rank's chunk: a (B, T) mask of kept positions is cut to the same
        # chunk, and the logits are those of the chunk's kept positions (row-major).
        # `real_tokens` (True, or a (B, T) mask of the real tokens under a block mask: supervised_forward): the same
        # logits from the decoder on the real tokens only, where that path applies; inside this forward, so that
        # DDP's and peft's wrapping still hold.
        real_tokens = kwargs.pop("real_tokens", False)
        if real_tokens is not False:
            logits = real_token_logits(
                self,
                dict(
                    kwargs,
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    position_ids=position_ids,
                    cache=cache,
                    inputs_embeds=inputs_embeds,
                    labels=labels,
                    use_cache=use_cache,
                ),
                logits_to_keep,
                real_tokens,
            )
            if logits is not None:
                return CausalLMOutputWithPast(logits=logits)
        if (
            self.model.splits_sequence(cache, use_cache)
            and isinstance(logits_to_keep, torch.Tensor)
            and logits_to_keep.dtype == torch.bool
            and logits_to_keep.dim() == 2
        ):
            logits_to_keep = self.model.sequence_parallel.local_keep(logits_to_keep)
        return super().forward(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            labels=labels,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            **kwargs,
        )

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path, *args, attn_implementation: str = "sdpa", **kwargs
    ):
        """Load the hub checkpoint (a hub id or a local folder) with no remote code.

        Fails when a parameter of the model is missing from the checkpoint; unused keys (e.g. a re-saved official
        model's duplicate `vision_embed_tokens.wte`) are reported by transformers and ignored.
        """
        check_attn_implementation(attn_implementation)
        kwargs.pop("trust_remote_code", None)
        model, info = super().from_pretrained(
            pretrained_model_name_or_path,
            *args,
            attn_implementation=attn_implementation,
            output_loading_info=True,
            **kwargs,
        )
        if info["missing_keys"]:
            missing = sorted(info["missing_keys"])
            raise ValueError(
                f"{pretrained_model_name_or_path} is not a complete Phi-3-V checkpoint: {len(missing)} parameters "
                f"are missing, e.g. {missing[:5]}"
            )
        if "generation_config" not in kwargs:
            model.generation_config.eos_token_id = stop_ids(
                model.config, model.generation_config.eos_token_id
            )
        return model

    def prepare_inputs_for_generation(self, input_ids, *args, pixel_values=None, image_sizes=None, **kwargs):
        inputs = super().prepare_inputs_for_generation(input_ids, *args, **kwargs)
        # The image path runs whenever the decoder is fed the whole prompt: the first step, and again when Phi-3
        # drops its cache on crossing the 4096-token short/long RoPE switch (Phi3ForCausalLM does that).
        cache = inputs.get("cache")
        if cache is None or cache.get_seq_length() == 0:
            inputs["pixel_values"] = pixel_values
            inputs["image_sizes"] = image_sizes
        return inputs


def end_ids(config: Phi3VConfig) -> list[int]:
    """The ids a turn ends with: the config's `end_token_ids`, else the hub's <|end|> 32007 and <|endoftext|> 32000."""
    return list(config.end_token_ids or (32007, 32000))


def stop_ids(config: Phi3VConfig, loaded) -> list[int]:
    """The generation stop ids of a model read from a folder: its `generation_config.json` says eos 2 (`</s>`, the
    config's eos, which the model never ends a turn with) or nothing on the hub (docs/phi3v.md#eos-and-stop-tokens);
    then the end ids. Ids a user wrote there that already hold every end id are kept."""
    ids = [] if loaded is None else ([loaded] if isinstance(loaded, int) else list(loaded))
    ends = end_ids(config)
    if set(ends) <= set(ids):
        return ids
    if not ids or set(ids) <= {config.eos_token_id, 2}:
        return ends
    return ids


def enable_sequence_parallel(model, sp: SequenceParallel) -> None:
    """Give the Phi3VModel inside `model` (a PeftModel or Phi3VForCausalLM) its sequence-parallel group. Refuses a
    group that does not divide the attention heads (Ulysses hands each rank H/N heads)."""
    decoder = next(m for m in model.modules() if isinstance(m, Phi3VModel))
    config = decoder.config
    if config._attn_implementation not in SPLIT_ATTENTION:
        raise ValueError(
            f"train.sequence_parallel={sp.size} needs model.attn_implementation sdpa or "
            f"flash_attention_2, not {config._attn_implementation!r}"
        )
    for what, heads in (
        ("attention heads", config.num_attention_heads),
        ("key/value heads", config.num_key_value_heads),
    ):
        if heads % sp.size:
            raise ValueError(
                f"train.sequence_parallel={sp.size} does not divide the model's {heads} {what}: "
                "Ulysses attention gives each rank of the group an equal share of the heads"
            )
    decoder.sequence_parallel = sp
    decoder.vision_embed_tokens.sequence_parallel = sp


def check_attn_implementation(name: str) -> None:
    if name not in ATTN_IMPLEMENTATIONS:
        raise ValueError(f"attn_implementation must be one of {ATTN_IMPLEMENTATIONS}, got {name!r}")
    if name == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise ValueError(
            "attn_implementation='flash_attention_2' needs the flash-attn package, which is not installed: "
            "install the project's `gpu` extra (pip install -e '.[gpu]') on a CUDA machine, or use 'sdpa'"
        )
