"""Full-size training-step harness: N steps of LoRA SFT and DPO on the real Phi-3-V geometry, random weights.

    python benchmarks/train_step.py --size full --device cpu --steps 1   # one bf16 LoRA SFT step, GC on, 377 tokens
    python benchmarks/train_step.py --size full --device cuda --steps 10 --micro-batch 1,4 \\
        --attn sdpa,flash_attention_2 --gc 1,0 --packing 0,1 --liger 0,1 --stages sft,dpo

The model: `models.phi3v.sizes.full_size_config` (`--model phi3v`: Phi-3-vision-128k-instruct, one ChartQA-sized
image per sample at num_crops 16; `--model phi35v`: Phi-3.5-vision, `--images` 4 images per sample at num_crops 4),
4,146,621,440 parameters, built directly in bf16 (torch's default dtype is bf16 while the modules are created, so
no fp32 copy ever exists) on the target device, weights drawn by the model's own initialiser. `--size small` keeps
every width and cuts the decoder to 2 layers and CLIP to 3 (for tests). Training is what a recipe with
`model.language: lora, vision: frozen, projector: full` does: `train.core.trainable.configure_trainable` (LoRA r 64 on
qkv/o/gate_up/down, fp32 masters), AdamW, bf16 autocast, the project's losses (`train.core.losses.sft_loss_sum`,
`train.preference.stage_loss.DPOLoss` with one vision pass per pair and the adapter-disabled reference).

On CPU the defaults shrink the batch to one short sequence (`--num-crops 1`: 313 image tokens, 64 text tokens,
SFT only), so that one full-size step runs in minutes within 24 GB.

Batches (built in-process, no tokenizer): per sample `--images` chart-like pictures drawn with PIL at ChartQA sizes
(800x600 .. 1000x700), cut by the real `Phi3VImageProcessor` (uint8 crops), their `<|image|>` slots, and
`--text-tokens` (256) random text ids of which the last `--answer-tokens` (32) are supervised. DPO: the same prompt
with two `--answer-tokens` completions. `--packing 1` packs the micro-batch into one row (`PackedSFTCollator`'s
layout, position ids restarting, no attention mask; SFT only).

FLOP model (`step_flops`; checked against torch.utils.flop_counter.FlopCounterMode in tests/train/test_train_step.py:
exactly equal for the forward and for a full fine-tune's forward + backward, with eager attention: on CPU,
FlopCounterMode counts SDPA as 0, torch 2.13 having no formula for _scaled_dot_product_flash_attention_for_cpu).
Counted: matmuls, convolutions and attention (what FlopCounterMode counts); not norms, activations, softmax.
With d = hidden 3072, P = decoder linear parameters (32 x 113,246,208 = 3,623,878,656), V = 32064, L = 32 layers:
  LM forward      = 2 P T  +  4 d L sum_rows(T_row^2)  +  2 d V K
                    T: tokens computed (padding included; a pack: its tokens), T_row: each sequence's length (a
                    pack: each sample's; attention counted over the full square, as FlopCounterMode counts SDPA),
                    K: the supervised (row, position) pairs, the only ones that get logits (train/core/losses.py).
                    SFT and DPO with SDPA (with or without gradient checkpointing, under DDP too) execute less
                    than this on a padded batch: their losses skip the padding and run the last layer at the K
                    pairs only (models/phi3v/supervised_forward.py); the count stays the model's, as MFU's
                    convention has it.
  CLIP forward    = per view (crops + one global view per image): 2 * 3*14*14 * 1024 * 576 (patch conv)
                    + 23 layers x (2 * 12,582,912 * 577 + 4 * 1024 * 577^2)   (only layer -2's stack runs)
  projector fwd   = 2 * (4096 * 3072 + 3072 * 3072) * image tokens (separators included: they are projected too)
  training (model FLOPs, the MFU convention): 3 x (LM + projector forward) + 1 x CLIP forward (frozen, no
                    backward); LoRA's own matmuls (r << d) are ignored. The executed work of LoRA differs: frozen
                    weights get no weight gradient (about 2 P T less), gradient checkpointing recomputes the forward
                    (2 P T more); MFU here is model FLOPs / time / peak, as PaLM defines it.
  DPO             = the policy's training FLOPs over the 2B rows + one reference forward of the LM (the vision
                    features are shared: one CLIP pass).
Peak: `--peak-tflops`, else detected from the CUDA device name (H100 / H200: 989 bf16 dense; A100: 312);
on CPU MFU is printed only with `--peak-tflops`. Memory: CUDA max allocated per variant; on CPU the process's peak
RSS (a lifetime high-water mark).
"""

from __future__ import annotations

import argparse
import gc
import itertools
import os
import platform
import resource
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from config.schema import DpoSection, LoraSection, ModelSection  # noqa: E402
from data.collate import supervised_token_count  # noqa: E402
from data.render import IGNORE_INDEX  # noqa: E402
from models.phi3v import Phi3VForCausalLM, Phi3VImageProcessor  # noqa: E402
from models.phi3v.sizes import full_size_config  # noqa: E402

IMAGE_TOKEN = 32044
CHART_SIZES = [(800, 600), (850, 600), (1000, 700), (900, 560), (640, 480)]
PEAKS_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0}  # bf16 dense tensor-core peaks


# ----------------------------------------------------------------------------------------------- model


def build_model(config, device: str, dtype: torch.dtype, seed: int = 0) -> Phi3VForCausalLM:
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Phi3VForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model


def small_config(name: str, attn: str):
    config = full_size_config(name, num_hidden_layers=2)
    config.img_processor = {**config.img_processor, "vision_config": {"num_hidden_layers": 3}}
    config._attn_implementation = attn
    return config


def tiny_size_config(name: str):
    """The real layout and vocabulary, the real CLIP crop geometry (336 px, patch 14: the same image tokens), tiny
    widths: what `benchmarks/gpu_check.py --smoke` runs on a CPU in seconds."""
    hidden, heads = 64, 4
    config = full_size_config(
        name,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        rope_scaling={
            "type": "su",
            "short_factor": [1.0] * (hidden // heads // 2),
            "long_factor": [1.0] * (hidden // heads // 2),
        },
    )
    config.img_processor = {
        **config.img_processor,
        "image_dim_out": 64,
        "vision_config": {
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 3,
            "num_attention_heads": 2,
        },
    }
    return config


def make_config(size: str, name: str, attn: str):
    if size == "tiny":
        config = tiny_size_config(name)
    else:
        config = full_size_config(name) if size == "full" else small_config(name, attn)
    config._attn_implementation = attn
    return config


# ----------------------------------------------------------------------------------------------- data


def chart(width: int, height: int, seed: int) -> Image.Image:
    """A bar chart of random bars, axes and labels-ish strokes: ChartQA-like content at a ChartQA-like size."""
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    bars = int(rng.integers(3, 9))
    left, bottom = width // 10, height - height // 8
    draw.line([(left, height // 12), (left, bottom), (width - width // 20, bottom)], fill=(0, 0, 0), width=2)
    step = (width - left - width // 20) // bars
    for b in range(bars):
        top = int(bottom - rng.uniform(0.1, 0.8) * (bottom - height // 12))
        colour = tuple(int(c) for c in rng.integers(0, 230, 3))
        draw.rectangle(
            [left + b * step + step // 5, top, left + (b + 1) * step - step // 5, bottom], fill=colour
        )
        draw.text((left + b * step + step // 4, bottom + 5), f"{b}", fill=(0, 0, 0))
    return image


def make_sample(
    processor,
    index: int,
    images: int,
    text_tokens: int,
    answer_tokens: int,
    seed: int,
    image_token: int = IMAGE_TOKEN,
    vocab: int = 32000,
) -> dict:
    """One SFT row: [<s>, images' slots, text], the last `answer_tokens` supervised; uint8 crops and canvas sizes."""
    rng = np.random.default_rng(seed + index)
    pictures = [
        chart(*CHART_SIZES[(index + i) % len(CHART_SIZES)], seed=seed + 100 * index + i)
        for i in range(images)
    ]
    out = processor(pictures, do_normalize=False)
    ids = [1]
    for count in out["num_img_tokens"]:
        ids += [image_token] * count
    ids += rng.integers(3, vocab, text_tokens - 1).tolist()
    labels = [-100] * (len(ids) - answer_tokens) + ids[-answer_tokens:]
    return {
        "input_ids": ids,
        "labels": labels,
        "pixel_values": out["pixel_values"],
        "image_sizes": out["image_sizes"],
        "answer": rng.integers(3, vocab, answer_tokens).tolist(),
        "num_img_tokens": tuple(int(n) for n in out["num_img_tokens"]),
    }


def sft_batch(rows: list[dict], packing: bool, pad: int = 32000) -> dict:
    images = {
        "pixel_values": torch.cat([r["pixel_values"] for r in rows]),
        "image_sizes": torch.cat([r["image_sizes"] for r in rows]),
    }
    if packing:  # PackedSFTCollator's layout
        ids = [t for r in rows for t in r["input_ids"]]
        labels = [t for r in rows for t in [-100, *r["labels"][1:]]]
        positions = [p for r in rows for p in range(len(r["input_ids"]))]
        labels_t = torch.tensor([labels])
        return {
            "input_ids": torch.tensor([ids]),
            "labels": labels_t,
            "position_ids": torch.tensor([positions]),
            "num_supervised_tokens": supervised_token_count(labels_t),
            "use_cache": False,
            **images,
            "_rows": [len(r["input_ids"]) for r in rows],
        }
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad)
    labels = torch.full((len(rows), width), -100)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(r["input_ids"]), torch.tensor(r["labels"]), 1
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "labels": labels,
        "num_supervised_tokens": supervised_token_count(labels),
        **images,
        "_rows": [width] * len(rows),
    }


def dpo_batch(rows: list[dict], pad: int = 32000) -> dict:
    """DPOCollator's layout: rows 0..B-1 prompt + chosen, B..2B-1 prompt + rejected; each image carried once."""
    chosen = [(r["input_ids"], r["labels"]) for r in rows]
    rejected = []
    for r in rows:
        prompt = r["input_ids"][: len(r["input_ids"]) - len(r["answer"])]
        rejected.append((prompt + r["answer"], [-100] * len(prompt) + r["answer"]))
    seqs = chosen + rejected
    width = max(len(s[0]) for s in seqs)
    ids = torch.full((len(seqs), width), pad)
    labels = torch.full((len(seqs), width), -100)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, (s, lab) in enumerate(seqs):
        ids[i, : len(s)], labels[i, : len(s)], mask[i, : len(s)] = torch.tensor(s), torch.tensor(lab), 1
    per_row, start = [], 0
    for r in rows:
        per_row.append(list(range(start, start + r["image_sizes"].shape[0])))
        start += r["image_sizes"].shape[0]
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "labels": labels,
        "pixel_values": torch.cat([r["pixel_values"] for r in rows]),
        "image_sizes": torch.cat([r["image_sizes"] for r in rows]),
        "sequence_images": per_row + per_row,
        "_rows": [width] * len(seqs),
    }


def shared_dpo_batch(rows: list[dict], pad: int = 32000) -> dict:
    """The DPOCollator batch of the same pairs as `dpo_batch` (chosen: the row's answer; rejected: its `answer`),
    with the prefix-sharing layout (`shared_*` keys: prompt + chosen + rejected in one row) that DPOLoss runs under
    sdpa and eager attention."""
    from data.collate import DPOCollator
    from data.render import RenderedPair

    items = []
    for r in rows:
        prompt = r["input_ids"][: len(r["input_ids"]) - len(r["answer"])]
        chosen = r["input_ids"][len(prompt) :]
        pair = RenderedPair(
            prompt_ids=prompt,
            chosen_ids=chosen,
            chosen_labels=chosen,
            rejected_prompt_ids=prompt,
            rejected_ids=r["answer"],
            rejected_labels=r["answer"],
            image_token_counts=r["num_img_tokens"],
            rejected_image_token_counts=r["num_img_tokens"],
            has_rejected_images=False,
        )
        items.append(
            {
                "pair": pair,
                "pixel_values": r["pixel_values"],
                "image_sizes": r["image_sizes"],
                "rejected_pixel_values": None,
                "rejected_image_sizes": None,
            }
        )
    batch = DPOCollator(pad_token_id=pad, share_prompt=True)(items)
    batch["_rows"] = [int(batch["input_ids"].shape[1])] * (
        2 * len(rows)
    )  # the FLOP model counts the 2B-row layout
    return batch


# ----------------------------------------------------------------------------------------------- FLOPs


def vision_forward_flops(config, views: int) -> int:
    v = config.vision_config
    patches = (v.image_size // v.patch_size) ** 2
    tokens = patches + 1
    layer_params = 4 * v.hidden_size * v.hidden_size + 2 * v.hidden_size * v.intermediate_size
    layers_run = v.num_hidden_layers + config.vision_layer_idx + 1  # layer -2: all but the last
    conv = 2 * 3 * v.patch_size * v.patch_size * v.hidden_size * patches
    return views * (conv + layers_run * (2 * layer_params * tokens + 4 * v.hidden_size * tokens * tokens))


def projector_forward_flops(config, merged_vectors: int) -> int:
    dim = 4 * config.vision_config.hidden_size
    return 2 * (dim * config.hidden_size + config.hidden_size * config.hidden_size) * merged_vectors


def lm_forward_flops(config, tokens: int, row_lengths: list[int], logits_rows: int) -> int:
    d, i, L = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    kv = config.num_key_value_heads * (d // config.num_attention_heads)
    layer_params = d * (d + 2 * kv) + d * d + 2 * d * i + i * d  # qkv, o, gate_up, down
    attention = 4 * d * L * sum(t * t for t in row_lengths)
    return 2 * layer_params * L * tokens + attention + 2 * d * config.vocab_size * logits_rows


def batch_counts(batch: dict, crop: int = 336, patch: int = 14) -> dict:
    """Tokens, sequence lengths, logits rows, CLIP views and projected image vectors of a batch."""
    # train/core/losses.py computes logits only at the supervised (row, position) pairs.
    supervised = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    grids = [(int(h) // crop, int(w) // crop) for h, w in batch["image_sizes"].tolist()]
    g = crop // patch // 2
    return {
        "tokens": batch["input_ids"].numel(),
        "rows": batch["_rows"],
        "logits_rows": supervised,
        "views": sum(r * c + 1 for r, c in grids),
        "merged": sum(
            (r * c + 1) * g * g + 1 + (r + 1) * g for r, c in grids
        ),  # projector rows = image tokens
        "images": len(grids),
    }


def step_flops(config, counts: dict, stage: str) -> dict:
    """Model FLOPs of one micro-batch: forward parts and the training total (see the module docstring)."""
    lm = lm_forward_flops(config, counts["tokens"], counts["rows"], counts["logits_rows"])
    clip = vision_forward_flops(config, counts["views"])
    proj = projector_forward_flops(config, counts["merged"])
    train = 3 * (lm + proj) + clip
    if stage == "dpo":
        train += lm  # the reference forward (adapter disabled); vision features shared
    return {"lm_forward": lm, "clip_forward": clip, "projector_forward": proj, "train": train}


# ----------------------------------------------------------------------------------------------- running


@contextmanager
def peak_memory(device: str):
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    out = {}
    yield out
    if device == "cuda":
        torch.cuda.synchronize()
        out["peak_gb"] = torch.cuda.max_memory_allocated() / 2**30
        out["kind"] = "CUDA max allocated"
    else:
        out["peak_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        out["kind"] = "peak RSS (process lifetime)"


def detect_peak(device: str, given: float | None) -> tuple[float | None, str]:
    if given:
        return given, "given"
    if device == "cuda":
        name = torch.cuda.get_device_name()
        for key, peak in PEAKS_TFLOPS.items():
            if key in name:
                return peak, f"{name} bf16 dense"
        return None, f"{name}: unknown peak, pass --peak-tflops"
    return None, "CPU: pass --peak-tflops for MFU"


def to_device(batch: dict, device: str) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def run_variant(
    args,
    stage: str,
    attn: str,
    gc_on: bool,
    packing: bool,
    micro: int,
    liger: bool,
    peak,
    *,
    share_prompt: bool = False,
    quantization: str = "none",
) -> dict:
    """`share_prompt` (DPO): the prefix-sharing batch (`shared_dpo_batch`); `quantization` ('nf4', 'fp4', 'int8'):
    the decoder linears quantised as a QLoRA recipe does (models.quantization.apply_quantization)."""
    from models.quantization import apply_quantization
    from train.core.device import apply_liger
    from train.core.losses import sft_loss_sum
    from train.core.trainable import configure_trainable, upcast_trainable_
    from train.preference.stage_loss import DPOLoss

    apply_liger(liger)
    config = make_config(args.size, args.model, attn)
    started = time.perf_counter()
    model = build_model(config, args.device, torch.bfloat16, seed=args.seed)
    build_s = time.perf_counter() - started
    section = ModelSection(
        name_or_path="tiny",
        language="lora",
        vision="frozen",
        projector="full",
        gradient_checkpointing=gc_on,
        attn_implementation=attn,
        quantization=quantization,
        dtype="bfloat16",
    )
    model = apply_quantization(model, section)
    model = configure_trainable(
        model, section, LoraSection(r=args.lora_r, alpha=2 * args.lora_r, dropout=0.0), seed=args.seed
    )
    upcast_trainable_(model)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=False)
    processor = Phi3VImageProcessor(num_crops=args.num_crops)
    samples = [
        make_sample(processor, i, args.images, args.text_tokens, args.answer_tokens, args.seed)
        for i in range(micro)
    ]
    batch = (
        sft_batch(samples, packing)
        if stage == "sft"
        else shared_dpo_batch(samples)
        if share_prompt
        else dpo_batch(samples)
    )
    counts = batch_counts(batch)
    flops = step_flops(config, counts, stage)
    loss_fn = (
        sft_loss_sum
        if stage == "sft"
        else DPOLoss(
            SimpleNamespace(dpo=DpoSection(), seed=args.seed),
            SimpleNamespace(unwrap_model=lambda m: m),
            share_features=True,
        )
    )
    device_batch = to_device({k: v for k, v in batch.items() if k != "_rows"}, args.device)
    autocast = torch.autocast(device_type=args.device, dtype=torch.bfloat16)
    times = []
    with peak_memory(args.device) as memory:
        for step in range(args.warmup + args.steps):
            if args.device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            with autocast:
                loss, _ = loss_fn(model, device_batch)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if args.device == "cuda":
                torch.cuda.synchronize()
            if step >= args.warmup:
                times.append(time.perf_counter() - t0)
    seconds = float(np.median(times))
    achieved = flops["train"] / seconds / 1e12
    pairs_or_samples = micro
    result = dict(
        stage=stage,
        attn=attn,
        gc=gc_on,
        packing=packing,
        micro=micro,
        liger=liger,
        seq=max(counts["rows"]),
        tokens=counts["tokens"],
        s_step=seconds,
        samples_s=pairs_or_samples / seconds,
        tokens_s=counts["tokens"] / seconds,
        tflops=achieved,
        mfu=(achieved / peak) if peak else None,
        peak_gb=memory["peak_gb"],
        memory_kind=memory["kind"],
        build_s=build_s,
        loss=float(loss.detach()),
        flops=flops["train"],
    )
    del model, optimizer, device_batch, loss
    gc.collect()
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return result


def parse_list(text: str, kind=str) -> list:
    return [kind(x) for x in text.split(",") if x != ""]


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--size",
        choices=["full", "small", "tiny"],
        default="full",
        help="small: full widths, 2 decoder and 3 CLIP layers; tiny: tiny widths (tiny_size_config)",
    )
    parser.add_argument("--model", choices=["phi3v", "phi35v"], default="phi3v")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument(
        "--warmup", type=int, default=None, help="untimed steps first; default 2 on CUDA, 0 on CPU"
    )
    parser.add_argument("--stages", default=None, help="default sft,dpo on CUDA, sft on CPU")
    parser.add_argument("--attn", default="sdpa", help="comma list: sdpa,flash_attention_2")
    parser.add_argument("--gc", default="1", help="gradient checkpointing, comma list of 1/0")
    parser.add_argument("--packing", default="0", help="comma list of 1/0 (SFT only)")
    parser.add_argument("--micro-batch", default="1", help="comma list of micro-batch sizes")
    parser.add_argument("--liger", default="0", help="comma list of 1/0 (CUDA + liger-kernel)")
    parser.add_argument(
        "--images", type=int, default=None, help="images per sample; default 1 (phi3v), 4 (phi35v)"
    )
    parser.add_argument(
        "--num-crops", type=int, default=None, help="default 16 (phi3v), 4 (phi35v); 1 on CPU"
    )
    parser.add_argument("--text-tokens", type=int, default=None, help="default 256 on CUDA, 64 on CPU")
    parser.add_argument("--answer-tokens", type=int, default=None, help="default 32 on CUDA, 16 on CPU")
    parser.add_argument("--lora-r", type=int, default=64)
    parser.add_argument("--peak-tflops", type=float, default=None)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads on CPU; default: $OMP_NUM_THREADS"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.images = args.images or (1 if args.model == "phi3v" else 4)
    cpu = args.device == "cpu"  # CPU defaults: one short step that fits a 24 GB machine in minutes
    args.num_crops = args.num_crops or (1 if cpu else 16 if args.model == "phi3v" else 4)
    args.stages = args.stages or ("sft" if cpu else "sft,dpo")
    args.text_tokens = args.text_tokens or (64 if cpu else 256)
    args.answer_tokens = args.answer_tokens or (16 if cpu else 32)
    args.warmup = args.warmup if args.warmup is not None else (2 if args.device == "cuda" else 0)
    if args.threads:
        torch.set_num_threads(args.threads)
    peak, peak_source = detect_peak(args.device, args.peak_tflops)
    versions = {m: __import__(m).__version__ for m in ("torch", "transformers", "peft")}
    print(f"# train_step, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(f"command: python {' '.join(sys.argv)}")
    print(
        f"machine: {platform.platform()}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, device "
        f"{torch.cuda.get_device_name() if args.device == 'cuda' else 'cpu'}; load average "
        f"{'/'.join(f'{x:.2f}' for x in os.getloadavg())}; {versions}"
    )
    print(
        f"model: {args.model} {args.size}, LoRA r {args.lora_r} on the LM, tower frozen, projector full, bf16 "
        f"weights + autocast; {args.images} image(s)/sample at num_crops {args.num_crops}, {args.text_tokens} text "
        f"tokens ({args.answer_tokens} supervised); {args.warmup} warm-up + {args.steps} timed step(s), median; "
        f"peak {peak or 'n/a'} TFLOP/s ({peak_source})"
    )
    header = (
        f"{'stage':<5} {'attn':<17} {'gc':>2} {'pack':>4} {'mb':>3} {'liger':>5} {'seq':>5} {'s/step':>8} "
        f"{'samples/s':>9} {'tokens/s':>9} {'TFLOP/s':>8} {'MFU':>6} {'peak GB':>8} {'loss sum':>8}"
    )
    print(header, flush=True)
    results = []
    variants = list(
        itertools.product(
            parse_list(args.stages),
            parse_list(args.attn),
            parse_list(args.gc, int),
            parse_list(args.packing, int),
            parse_list(args.micro_batch, int),
            parse_list(args.liger, int),
        )
    )
    variants.sort(
        key=lambda v: v[5]
    )  # liger's patches are class-level and never undone: its variants run last
    for stage, attn, gc_on, packing, micro, liger in variants:
        if stage == "dpo" and packing:
            continue  # no packed DPO layout
        try:
            r = run_variant(args, stage, attn, bool(gc_on), bool(packing), micro, bool(liger), peak)
        except (RuntimeError, ValueError) as error:  # an unavailable kernel, out of memory: report, go on
            print(
                f"{stage:<5} {attn:<17} {gc_on:>2} {packing:>4} {micro:>3} {liger:>5}  failed: "
                f"{str(error).splitlines()[0][:150]}",
                flush=True,
            )
            if args.device == "cuda":
                torch.cuda.empty_cache()
            continue
        results.append(r)
        mfu = f"{100 * r['mfu']:5.1f}%" if r["mfu"] is not None else "   n/a"
        print(
            f"{stage:<5} {attn:<17} {int(r['gc']):>2} {int(r['packing']):>4} {micro:>3} {int(r['liger']):>5} "
            f"{r['seq']:>5} {r['s_step']:>8.3f} {r['samples_s']:>9.3g} {r['tokens_s']:>9.4g} {r['tflops']:>8.3g} "
            f"{mfu:>6} {r['peak_gb']:>8.2f} {r['loss']:>8.4f}",
            flush=True,
        )
    if results:
        print(
            f"samples/s: SFT samples or DPO pairs; seq: longest row (a pack: its length); model build "
            f"{results[0]['build_s']:.0f} s; memory: {results[0]['memory_kind']}"
        )
    return results


if __name__ == "__main__":
    main()
