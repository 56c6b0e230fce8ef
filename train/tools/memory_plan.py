"""A memory planner: bytes per GPU of a recipe's training under DDP, DeepSpeed ZeRO-2 / ZeRO-3 and FSDP2.

    python -m train.memory RECIPE [key=value ...] --gpus 8 [--gpu-memory 80] [--supervised 0.25]

Parameter counts come from the model built on the meta device (real sizes: `models.phi3v.sizes.full_size_config`
and CLIP ViT-L/14-336; the demo's `tiny` model is built for real), with the recipe's LoRA and full parts applied
by `train.core.trainable.configure_trainable`, so the trainable count is exactly what a run trains. Per GPU, with P
parameters of which T train (F = P - T frozen), N GPUs, w bytes per weight of `model.dtype`:

    strategy  parameters                  gradients                     optimizer (AdamW)
    DDP       w F + 4 T (fp32 masters)     4 T + 4 T (DDP's buckets)      8 T (fp32 moments)
    ZeRO-2    w P (all in 16 bit)          (w + 4) T / N                  12 T / N (fp32 masters + moments)
    ZeRO-3    w P / N + 2 L                4 T / N + 2 L                  12 T / N
    FSDP2     (w F + 4 T) / N + 2 (R + 2U)  4 T / N + 2 U                 8 T / N

L is DeepSpeed's "largest layer" (the most parameters one module holds directly: the embedding or lm_head, 98.5M),
U the largest FSDP wrap unit (a decoder layer, 113M) and R the root unit (what no decoder or CLIP layer holds:
embeddings, lm_head, the projector), gathered in 16 bit while they compute (two units with prefetch). With T = P and
w = 2, ZeRO-2 is DeepSpeed's own 2P + 18P/N and ZeRO-3 its 4L + 18P/N
(`estimate_zero{2,3}_model_states_mem_needs_all_cold`; tests/train/test_memory.py checks both on the real model).

Activations (per GPU, one micro-batch of `train.micro_batch_size` samples of `data.max_length` tokens, each with one
image of `model.num_crops` crops plus the global view; a worst case, as recipes are planned to fit it): a decoder
layer keeps, per token, a (10 h + 4 i) bytes in activation precision a (its input and normed input twice, q, k, v
and the rotated q, k, the attention output, the gate/up output, SiLU and product: with flash / memory-efficient
attention, no S x S scores), plus 8 h for the fp32 RMSNorm internals under bf16 autocast and the LoRA dropout copies
when dropout > 0; the backward of a layer adds gradients about one layer's activations large. With gradient
checkpointing a layer keeps only its input (a h per token), and the layer being back-propagated is recomputed. A trained CLIP tower keeps a (8 h_v + 2 i_v) per crop token per layer (577 tokens a crop); a
frozen one keeps nothing. The trained projector keeps its input and hidden per image token. Logits exist only for
supervised positions (`logits_to_keep`): `--supervised` of each sample (default 0.25), each V (a + 8) bytes with the
fp32 upcast and its gradient.

Under sequence parallelism (`train.sequence_parallel: N`, docs/distributed.md#sequence-parallelism) a rank keeps the
activations of T/N tokens, the logits of 1/N of the supervised positions and a trained tower's activations for 1/N
of the crops. What it adds: the Ulysses all-to-all buffers (q, k, v and the attention output, sent and received:
8 h a bytes per local token, for one layer at a time with checkpointing, for every layer without), the whole
sequence's embeddings during the image merge (T h a, before the split), and the gathered tower output and the
projector on every image token (the projector runs whole on each rank). `--sequence-parallel` tries each group size
and the report names the smallest that fits.

Checked on the demo's tiny model on CPU (fp32, LoRA, no checkpointing, 40 x 256 tokens; tests/train/test_memory.py
asserts within 35%): estimate 287 MiB against a measured peak RSS growth of 254 MiB for one forward + backward,
+13%. Not modelled: allocator caching and fragmentation, the attention kernels' workspaces, NCCL buckets. "Fits" leaves 10% of the GPU for the CUDA
context, NCCL buffers and fragmentation.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch

from config import Recipe, load_recipe
from config.checks import attention_heads

GiB = 1024**3
STRATEGIES = ("ddp", "zero2", "zero3", "fsdp2")
HEADROOM = 0.9  # of the GPU's memory: the rest is the CUDA context, NCCL buffers, fragmentation
WRAP_UNITS = ("Phi3DecoderLayer", "CLIPEncoderLayer")


@dataclass(frozen=True)
class ModelCounts:
    total: int
    trainable: int
    largest_layer: int  # DeepSpeed's definition: the most parameters one module holds directly
    largest_unit: int  # the largest FSDP wrap unit (a decoder or CLIP encoder layer)
    root_unit: int  # parameters outside every wrap unit
    hidden: int
    intermediate: int
    layers: int
    vocab: int
    vision_hidden: int
    vision_intermediate: int
    vision_layers_run: int
    crop_tokens: int  # CLIP tokens per crop (patches + class token)
    image_dim: int  # the projector's input width
    lora_dropout_inputs: int  # widths of the language-model inputs that go through LoRA dropout, per layer
    heads: int = 32  # attention heads: the sequence-parallel group sizes divide them

    @property
    def frozen(self) -> int:
        return self.total - self.trainable


def build_model(recipe: Recipe):
    """The recipe's model with its trainable parts: the real layout on the meta device, or the demo's tiny one."""
    from models.phi3v import Phi3VForCausalLM
    from models.phi3v.sizes import full_size_config
    from train.core.model_loading import build_tiny
    from train.core.trainable import configure_trainable

    if recipe.model.name_or_path == "tiny":
        model, _ = build_tiny(recipe.model, recipe.seed)
    else:
        with torch.device("meta"):
            model = Phi3VForCausalLM(
                full_size_config("phi35v" if "3.5" in recipe.model.name_or_path else "phi3v")
            )
    return configure_trainable(model, recipe.model, recipe.lora, seed=recipe.seed)


def count(model, recipe: Recipe) -> ModelCounts:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    largest_layer = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    units = [m for m in model.modules() if type(m).__name__ in WRAP_UNITS]
    unit_sizes = [sum(p.numel() for p in m.parameters()) for m in units]
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = base.config
    vision = config.vision_config
    lora_inputs = 0
    if recipe.model.language == "lora" and recipe.lora.dropout > 0:
        widths = {
            "qkv_proj": config.hidden_size,
            "o_proj": config.hidden_size,
            "gate_up_proj": config.hidden_size,
            "down_proj": config.intermediate_size,
        }
        lora_inputs = sum(widths.get(t, 0) for t in recipe.lora.target_modules)
    return ModelCounts(
        total=total,
        trainable=trainable,
        largest_layer=largest_layer,
        largest_unit=max(unit_sizes),
        root_unit=total - sum(unit_sizes),
        hidden=config.hidden_size,
        intermediate=config.intermediate_size,
        layers=config.num_hidden_layers,
        vocab=config.vocab_size,
        vision_hidden=vision.hidden_size,
        vision_intermediate=vision.intermediate_size,
        vision_layers_run=base.model.vision_embed_tokens.img_processor.vision_model.num_layers_run,
        crop_tokens=(vision.image_size // vision.patch_size) ** 2 + 1,
        image_dim=4 * config.img_processor["image_dim_out"],
        lora_dropout_inputs=lora_inputs,
        heads=config.num_attention_heads,
    )


def weight_bytes(recipe: Recipe) -> int:
    return {"bfloat16": 2, "float16": 2, "float32": 4}[recipe.model.dtype]


def model_states(counts: ModelCounts, strategy: str, gpus: int, w: int) -> dict[str, float]:
    """Bytes per GPU of parameters, gradients and optimizer state (the table in the module docstring)."""
    P, T, F, N = counts.total, counts.trainable, counts.frozen, gpus
    L, U, R = counts.largest_layer, counts.largest_unit, counts.root_unit
    if strategy == "ddp":
        return {"parameters": w * F + 4 * T, "gradients": 8 * T, "optimizer": 8 * T}
    if strategy == "zero2":
        return {"parameters": w * P, "gradients": (w + 4) * T / N, "optimizer": 12 * T / N}
    if strategy == "zero3":
        return {"parameters": w * P / N + 2 * L, "gradients": 4 * T / N + 2 * L, "optimizer": 12 * T / N}
    if strategy == "fsdp2":
        return {
            "parameters": (w * F + 4 * T) / N + 2 * (R + 2 * U),
            "gradients": 4 * T / N + 2 * U,
            "optimizer": 8 * T / N,
        }
    raise ValueError(f"unknown strategy {strategy!r}; one of {STRATEGIES}")


def activation_bytes(
    counts: ModelCounts,
    recipe: Recipe,
    *,
    checkpointing: bool,
    supervised: float = 0.25,
    sequence_parallel: int | None = None,
) -> dict:
    """Bytes of activations kept for the backward of one micro-batch, per rank (the module docstring has the model);
    `sequence_parallel`: the group size (default the recipe's)."""
    n = sequence_parallel or recipe.train.sequence_parallel
    a = 2 if recipe.train.precision == "bf16" else 4
    h, i = counts.hidden, counts.intermediate
    whole = recipe.train.micro_batch_size * recipe.data.max_length
    tokens = -(-whole // n)  # this rank's chunk
    all_crops = recipe.train.micro_batch_size * (recipe.model.num_crops + 1)
    crops = -(-all_crops // n)
    per_token_layer = a * (10 * h + 4 * i) + (8 * h if a == 2 else 0)
    per_token_layer += (a + 1) * counts.lora_dropout_inputs  # dropout output and mask of each LoRA input
    layer = tokens * per_token_layer
    # The backward of a layer holds gradients about as large as its activations (+1 layer); with checkpointing the
    # layer being back-propagated is recomputed first (+1 more).
    language = tokens * a * h * counts.layers + 2 * layer if checkpointing else layer * (counts.layers + 1)
    vision = 0
    if recipe.model.vision != "frozen":
        hv, iv = counts.vision_hidden, counts.vision_intermediate
        vision_layer = crops * counts.crop_tokens * a * (8 * hv + 2 * iv)
        vision_input = crops * counts.crop_tokens * a * hv
        vision = (
            vision_input * counts.vision_layers_run + 2 * vision_layer
            if checkpointing
            else vision_layer * (counts.vision_layers_run + 1)
        )
    image_tokens = all_crops * (counts.crop_tokens - 1) // 4  # 2x2 patch merge before the projector
    projector = image_tokens * a * (counts.image_dim + 2 * h) if recipe.model.projector == "full" else 0
    logits = int(tokens * supervised) * counts.vocab * (a + 8)
    split = 0
    if n > 1:  # all-to-all buffers, the whole sequence's embeddings at the merge, the gathered tower output
        split = tokens * 8 * h * a * (1 if checkpointing else counts.layers) + whole * h * a
        split += all_crops * (counts.crop_tokens - 1) * counts.vision_hidden * a
    return {
        "language": language,
        "vision": vision,
        "projector": projector,
        "logits": logits,
        "split": split,
        "total": language + vision + projector + logits + split,
    }


def plan(
    recipe: Recipe,
    gpus: int,
    gpu_memory_gb: float,
    supervised: float = 0.25,
    counts: ModelCounts | None = None,
    sequence_parallel: int | None = None,
):
    """{strategy: {parameters, gradients, optimizer, activations (ckpt / no ckpt), totals, fits}} in bytes."""
    counts = counts or count(build_model(recipe), recipe)
    w = weight_bytes(recipe)
    acts = {
        ckpt: activation_bytes(
            counts, recipe, checkpointing=ckpt, supervised=supervised, sequence_parallel=sequence_parallel
        )["total"]
        for ckpt in (True, False)
    }
    budget = HEADROOM * gpu_memory_gb * 1e9
    rows = {}
    for strategy in STRATEGIES:
        states = model_states(counts, strategy, gpus, w)
        base = sum(states.values())
        rows[strategy] = {
            **states,
            "activations_ckpt": acts[True],
            "activations_no_ckpt": acts[False],
            "total_ckpt": base + acts[True],
            "total_no_ckpt": base + acts[False],
            "fits_ckpt": base + acts[True] <= budget,
            "fits_no_ckpt": base + acts[False] <= budget,
        }
    return counts, rows


def group_sizes(gpus: int, heads: int) -> list[int]:
    """The sequence-parallel group sizes a job of `gpus` can use: divisors of both the GPUs and the heads."""
    return [n for n in range(1, gpus + 1) if gpus % n == 0 and heads % n == 0]


def smallest_groups(
    recipe: Recipe, counts: ModelCounts, gpus: int, gpu_memory_gb: float, supervised: float, heads: int
) -> dict[str, int | None]:
    """{strategy: the smallest sequence-parallel group with which a micro-batch fits with checkpointing, or None}."""
    best: dict[str, int | None] = dict.fromkeys(STRATEGIES)
    for n in group_sizes(gpus, heads):
        _, rows = plan(recipe, gpus, gpu_memory_gb, supervised, counts=counts, sequence_parallel=n)
        for strategy, row in rows.items():
            if best[strategy] is None and row["fits_ckpt"]:
                best[strategy] = n
    return best


def report(
    recipe: Recipe, recipe_path: str, gpus: int, gpu_memory_gb: float, supervised: float = 0.25
) -> str:
    counts, rows = plan(recipe, gpus, gpu_memory_gb, supervised)
    m = recipe.model
    n = recipe.train.sequence_parallel
    lines = [
        f"{recipe_path}: {m.name_or_path}, {counts.total:,} parameters, {counts.trainable:,} trained "
        f"(language {m.language}, vision {m.vision}, projector {m.projector}"
        + (f", LoRA r={recipe.lora.r}" if "lora" in (m.language, m.vision) else "")
        + ")",
        f"{gpus} GPUs x {gpu_memory_gb:g} GB; weights {m.dtype}, compute {recipe.train.precision}; micro-batch "
        f"{recipe.train.micro_batch_size} x {recipe.data.max_length} tokens, {m.num_crops}+1 crops an image, "
        f"{supervised:.0%} of tokens supervised; fits = total <= {HEADROOM:.0%} of the GPU"
        + (f"; sequence parallel {n}: {-(-recipe.data.max_length // n):,} tokens a rank" if n > 1 else ""),
        "",
        f"{'GiB per GPU':<12}{'params':>8}{'grads':>8}{'optim':>8}{'act ckpt':>10}{'total':>8}{'fits':>6}"
        f"{'act no-ckpt':>13}{'total':>8}{'fits':>6}",
    ]
    for strategy, r in rows.items():

        def gib(key: str, r: dict = r) -> str:
            return f"{r[key] / GiB:.1f}"

        lines.append(
            f"{strategy:<12}{gib('parameters'):>8}{gib('gradients'):>8}{gib('optimizer'):>8}"
            f"{gib('activations_ckpt'):>10}{gib('total_ckpt'):>8}{'yes' if r['fits_ckpt'] else 'no':>6}"
            f"{gib('activations_no_ckpt'):>13}{gib('total_no_ckpt'):>8}"
            f"{'yes' if r['fits_no_ckpt'] else 'no':>6}"
        )
    heads = attention_heads(recipe.model) or counts.heads
    best = smallest_groups(recipe, counts, gpus, gpu_memory_gb, supervised, heads)
    lines += [
        "",
        f"train.sequence_parallel that fits (gradient checkpointing on; group sizes dividing {gpus} GPUs "
        f"and {heads} heads):",
    ]
    for strategy, size in best.items():
        advice = (
            f"{size}" + (" (the recipe's)" if size == n else "")
            if size
            else "none: lower data.max_length or train.micro_batch_size, or add GPUs"
        )
        lines.append(f"  {strategy:<8}{advice}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m train.memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe")
    parser.add_argument("overrides", nargs="*", help="key=value recipe overrides")
    parser.add_argument("--gpus", type=int, required=True, help="GPUs in the job (all nodes)")
    parser.add_argument("--gpu-memory", type=float, default=80.0, help="GB per GPU (default 80)")
    parser.add_argument(
        "--supervised", type=float, default=0.25, help="fraction of tokens supervised (logits)"
    )
    args = parser.parse_args(argv)
    recipe = load_recipe(args.recipe, args.overrides)
    print(report(recipe, args.recipe, args.gpus, args.gpu_memory, args.supervised))
