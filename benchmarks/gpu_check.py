"""One-command GPU check: what a lent GPU must tell us, in one run of at most 8 minutes on one H100/H200.

    python benchmarks/gpu_check.py                      # CUDA: full size (4.1B, random weights), writes the results
    python benchmarks/gpu_check.py --smoke              # the same code at tiny size on the CPU, in about a minute
    python benchmarks/gpu_check.py --only sft,dpo       # some pieces only

Every piece builds the real Phi-3-vision-128k-instruct geometry (`models.phi3v.sizes.full_size_config`: hidden
3072, 32 layers, vocab 32,064, CLIP ViT-L/14-336) with random weights drawn by the model's own initialiser, directly
in bf16 on the device (no download), and reuses benchmarks/train_step.py's batches, steps and FLOP model
(`step_flops`, checked against torch's FlopCounterMode in tests/train/test_train_step.py). A batch is one ChartQA-sized
chart per sample at num_crops 16 plus 256 text tokens (the last 32 supervised). The pieces:

1. `sft`: LoRA r 64 SFT steps (tower frozen, projector full, gradient checkpointing on, as recipes/chartqa.yaml)
   at micro-batch 1 and 4, with sdpa and with flash_attention_2 when flash-attn imports: samples/s, all-tokens/s
   (padding included), MFU (model FLOPs / step time / the device's bf16 dense peak), peak memory (CUDA max
   allocated). Goal, written next to the figure: LoRA SFT >= 43% MFU on one H200.
2. `attention`: flash_attention_2 vs sdpa logits of the same model on the same padded batch (2 rows of different
   lengths), bf16, at the real (non-padding) positions: max and mean absolute difference, top-1 agreement. Without
   flash-attn (the smoke run), eager vs sdpa, so that the comparison code runs anyway.
3. `dpo`: DPO pairs/s with the shared-prompt layout (`data.collate.DPOCollator`, prompt + chosen + rejected in one
   row; sdpa, which takes its block mask) at micro-batch 1 and 4; MFU counts the standard 2-row layout's model
   FLOPs, so a layout that computes the prompt once shows above the 2-row work it replaces.
4. `qlora`: one QLoRA step (nf4 decoder linears with double quantisation, bf16 compute, LoRA r 64) and its peak
   memory, micro-batch 1 (bitsandbytes needed; reported as skipped without it).
5. `long`: one SFT step on a single 32K-token sample (one image + text to 32,768 tokens; gradient checkpointing on,
   flash_attention_2 when present, else sdpa): peak memory and seconds. (Sequence parallel 1 vs 2 needs two GPUs
   and the sequence-parallel training path; not part of this one-GPU check.)
6. `liger`: the micro-batch 4 sdpa SFT step with and without liger-kernel's Phi-3 kernels (when it imports; its
   patches are class-level and never undone, so this piece runs last).
7. `precision`: logits of the full-size random model in fp32 vs the same weights cast to bf16, one batch: max and
   mean absolute difference, relative to the fp32 logits' spread, and top-1 agreement.

Each piece is guarded: a failure (an unavailable kernel, out of memory) is recorded with its message and the next
piece runs. A time budget (`--budget`, 480 s) is checked before each piece; a piece that would start after it is
recorded as skipped. Results: `gpu_check.json` (every number, the machine, the versions) and `gpu_check.md` (the
table) under `--out` (default `benchmarks/results/`).

`--smoke` runs the same pieces on the CPU at `train_step.tiny_size_config` (the real layout, vocabulary and crop
geometry; widths of 64), one crop per image, 64 text tokens and a 1,024-token "long" sample: it checks that the
check runs, not the GPU's speed (tests/benchmarks/test_gpu_check.py runs it; tests marked `gpu` run the pieces at small size
where CUDA exists).
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import platform
import sys
import time
import traceback
from argparse import Namespace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks import train_step  # noqa: E402

PIECES = ("sft", "attention", "dpo", "qlora", "long", "precision", "liger")
MFU_GOAL = 0.43
LONG_TOKENS = 32_768
SMOKE_LONG_TOKENS = 1_024


def has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def settings(smoke: bool, device: str, out: Path, budget: float) -> Namespace:
    """The train_step arguments of every piece: full size on the device, or the smoke run's tiny CPU size."""
    return Namespace(
        size="tiny" if smoke else "full",
        model="phi3v",
        device=device,
        seed=0,
        lora_r=64,
        images=1,
        num_crops=1 if smoke else 16,
        text_tokens=64 if smoke else 256,
        answer_tokens=16 if smoke else 32,
        warmup=0 if smoke else 2,
        steps=1 if smoke else 5,
        smoke=smoke,
        out=out,
        budget=budget,
    )


def free(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def variant_row(result: dict) -> dict:
    keep = (
        "stage",
        "attn",
        "gc",
        "micro",
        "liger",
        "seq",
        "tokens",
        "s_step",
        "samples_s",
        "tokens_s",
        "tflops",
        "mfu",
        "peak_gb",
        "memory_kind",
        "loss",
    )
    return {key: result[key] for key in keep}


# ------------------------------------------------------------------------------------------------ pieces


def piece_sft(args: Namespace, peak: float | None) -> dict:
    attns = ["sdpa"] + (["flash_attention_2"] if has("flash_attn") and args.device == "cuda" else [])
    rows = [
        variant_row(train_step.run_variant(args, "sft", attn, True, False, micro, False, peak))
        for attn in attns
        for micro in (1, 4)
    ]
    best = max((r["mfu"] for r in rows if r["mfu"] is not None), default=None)
    return {
        "rows": rows,
        "best_mfu": best,
        "goal_mfu": MFU_GOAL,
        "flash_attn": "flash_attention_2" in attns or "not importable (sdpa only)",
    }


def _logits(model, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        out = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            pixel_values=batch["pixel_values"],
            image_sizes=batch["image_sizes"],
            use_cache=False,
        )
    return out.logits.float()


def _set_attention(model, name: str) -> None:
    if hasattr(model, "set_attn_implementation"):
        try:
            model.set_attn_implementation(name)
            return
        except (ValueError, AttributeError, TypeError):
            pass
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_attn_implementation"):
            config._attn_implementation = name


def compare(reference: torch.Tensor, other: torch.Tensor, mask: torch.Tensor) -> dict:
    """Differences at the masked (real) positions: max / mean absolute, relative to the reference's std, top-1."""
    a, b = reference[mask.bool()], other[mask.bool()]
    diff = (a - b).abs()
    return {
        "max_abs": float(diff.max()),
        "mean_abs": float(diff.mean()),
        "reference_std": float(a.std()),
        "max_rel_to_std": float(diff.max() / a.std()),
        "top1_agree": float((a.argmax(-1) == b.argmax(-1)).float().mean()),
        "positions": int(mask.sum()),
    }


def _two_row_batch(args: Namespace, model_config) -> dict:
    from models.phi3v import Phi3VImageProcessor

    processor = Phi3VImageProcessor(num_crops=args.num_crops)
    rows = [
        train_step.make_sample(
            processor, i, args.images, args.text_tokens + 40 * i, args.answer_tokens, args.seed
        )
        for i in range(2)
    ]
    batch = train_step.sft_batch(rows, packing=False)
    return train_step.to_device({k: v for k, v in batch.items() if k != "_rows"}, args.device)


def piece_attention(args: Namespace, peak: float | None) -> dict:
    other = "flash_attention_2" if has("flash_attn") and args.device == "cuda" else "eager"
    config = train_step.make_config(args.size, args.model, "sdpa")
    model = train_step.build_model(config, args.device, torch.bfloat16, seed=args.seed).eval()
    batch = _two_row_batch(args, config)
    sdpa = _logits(model, batch)
    _set_attention(model, other)
    theirs = _logits(model, batch)
    result = {"compared": f"{other} vs sdpa", **compare(sdpa, theirs, batch["attention_mask"])}
    del model, sdpa, theirs
    return result


def piece_dpo(args: Namespace, peak: float | None) -> dict:
    rows = [
        variant_row(
            train_step.run_variant(args, "dpo", "sdpa", True, False, micro, False, peak, share_prompt=True)
        )
        for micro in (1, 4)
    ]
    return {"rows": rows, "layout": "shared prompt (prompt + chosen + rejected in one row), sdpa block mask"}


def piece_qlora(args: Namespace, peak: float | None) -> dict:
    if not has("bitsandbytes"):
        return {"skipped": "bitsandbytes is not installed"}
    row = variant_row(
        train_step.run_variant(args, "sft", "sdpa", True, False, 1, False, peak, quantization="nf4")
    )
    return {"rows": [row], "quantization": "nf4 + double quant, bf16 compute"}


def piece_long(args: Namespace, peak: float | None) -> dict:
    tokens = SMOKE_LONG_TOKENS if args.smoke else LONG_TOKENS
    attn = "flash_attention_2" if has("flash_attn") and args.device == "cuda" else "sdpa"
    from models.phi3v import Phi3VImageProcessor

    # make_sample's first sample shows CHART_SIZES[0]: <s>, its slots and text_tokens - 1 text ids make `tokens`.
    image_tokens = Phi3VImageProcessor(num_crops=args.num_crops).num_image_tokens(*train_step.CHART_SIZES[0])
    text = tokens - image_tokens
    long_args = Namespace(**{**vars(args), "text_tokens": text, "warmup": 0, "steps": 1})
    row = variant_row(train_step.run_variant(long_args, "sft", attn, True, False, 1, False, peak))
    return {"rows": [row], "target_tokens": tokens, "sequence_parallel": "not run: one GPU"}


def piece_liger(args: Namespace, peak: float | None) -> dict:
    if not (has("liger_kernel") and args.device == "cuda"):
        return {"skipped": "liger-kernel is not importable or no CUDA device (it runs Triton kernels)"}
    rows = [
        variant_row(train_step.run_variant(args, "sft", "sdpa", True, False, 4, liger, peak))
        for liger in (False, True)
    ]
    return {"rows": rows, "speedup": rows[0]["s_step"] / rows[1]["s_step"]}


def piece_precision(args: Namespace, peak: float | None) -> dict:
    config = train_step.make_config(args.size, args.model, "sdpa")
    model = train_step.build_model(config, args.device, torch.float32, seed=args.seed).eval()
    batch = _two_row_batch(args, config)
    fp32 = _logits(model, batch)
    model.to(torch.bfloat16)
    bf16 = _logits(model, batch)
    result = {
        "compared": "bf16 weights vs the same weights in fp32",
        **compare(fp32, bf16, batch["attention_mask"]),
    }
    del model, fp32, bf16
    return result


RUNNERS = {
    "sft": piece_sft,
    "attention": piece_attention,
    "dpo": piece_dpo,
    "qlora": piece_qlora,
    "long": piece_long,
    "precision": piece_precision,
    "liger": piece_liger,
}


# ------------------------------------------------------------------------------------------------ report


def machine(device: str) -> dict:
    versions = {}
    for name in ("torch", "transformers", "peft", "flash_attn", "liger_kernel", "bitsandbytes"):
        try:
            versions[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001 - absent or broken: say so
            versions[name] = None
    return {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "load_average": os.getloadavg(),
        "versions": versions,
    }


def fmt(value, spec: str = ".3g") -> str:
    return "-" if value is None else format(value, spec)


def markdown(report: dict) -> str:
    lines = [
        f"# GPU check, {report['started']}",
        "",
        f"command: `{report['command']}`  ",
        f"machine: {report['machine']['device']}, {report['machine']['platform']}; versions "
        f"{report['machine']['versions']}  ",
        f"size: {report['size']}; peak {fmt(report['peak_tflops'])} TFLOP/s "
        f"({report['peak_source']}); total {report['seconds']:.0f} s",
        "",
        "| piece | attn | micro | seq | s/step | samples/s | tokens/s | MFU | peak GB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, piece in report["pieces"].items():
        for row in piece.get("rows", []):
            mfu = "-" if row["mfu"] is None else f"{100 * row['mfu']:.1f}%"
            label = name + (" +liger" if row["liger"] else "")
            lines.append(
                f"| {label} | {row['attn']} | {row['micro']} | {row['seq']} | {row['s_step']:.3f} | "
                f"{row['samples_s']:.3g} | {row['tokens_s']:.4g} | {mfu} | {row['peak_gb']:.2f} |"
            )
    lines += ["", "| piece | result |", "|---|---|"]
    for name, piece in report["pieces"].items():
        if "error" in piece or "skipped" in piece:
            lines.append(
                f"| {name} | {'FAILED: ' + piece['error'] if 'error' in piece else 'skipped: ' + piece['skipped']} |"
            )
        elif "max_abs" in piece:
            lines.append(
                f"| {name} | {piece['compared']}: max abs {piece['max_abs']:.3g}, mean abs "
                f"{piece['mean_abs']:.3g} (logit std {piece['reference_std']:.3g}), top-1 agreement "
                f"{100 * piece['top1_agree']:.2f}% over {piece['positions']} positions |"
            )
    sft = report["pieces"].get("sft", {})
    if "best_mfu" in sft:
        best = "-" if sft["best_mfu"] is None else f"{100 * sft['best_mfu']:.1f}%"
        lines.append(f"| sft goal | LoRA SFT >= {100 * MFU_GOAL:.0f}% MFU on one H200: best {best} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--smoke", action="store_true", help="tiny size on the CPU: checks that the check runs"
    )
    parser.add_argument("--only", default=",".join(PIECES), help=f"comma list of pieces: {', '.join(PIECES)}")
    parser.add_argument(
        "--budget", type=float, default=480.0, help="seconds; a piece is not started after it"
    )
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--peak-tflops", type=float, default=None)
    options = parser.parse_args(argv)
    unknown = sorted(set(options.only.split(",")) - set(PIECES))
    if unknown:
        parser.error(f"unknown piece(s) {unknown}; choose from {', '.join(PIECES)}")
    device = "cpu" if options.smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device: run with --smoke for the CPU check of the code path")
    args = settings(options.smoke, device, options.out, options.budget)
    if options.smoke:
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1") or 1))
    peak, peak_source = train_step.detect_peak(device, options.peak_tflops)
    started = time.perf_counter()
    report = {
        "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": "python benchmarks/gpu_check.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": machine(device),
        "size": "tiny (smoke, CPU)" if options.smoke else "full (4.1B, bf16)",
        "peak_tflops": peak,
        "peak_source": peak_source,
        "pieces": {},
    }
    chosen = [p for p in PIECES if p in options.only.split(",")]  # liger last: its patches are never undone
    for name in chosen:
        elapsed = time.perf_counter() - started
        if elapsed > options.budget:
            report["pieces"][name] = {
                "skipped": f"time budget of {options.budget:.0f} s spent ({elapsed:.0f} s)"
            }
            continue
        piece_started = time.perf_counter()
        try:
            result = RUNNERS[name](args, peak)
        except Exception as error:  # noqa: BLE001 - one piece's failure must not stop the others
            result = {
                "error": f"{type(error).__name__}: {str(error).splitlines()[0][:300] if str(error) else ''}",
                "traceback": traceback.format_exc(limit=6),
            }
        result["seconds"] = round(time.perf_counter() - piece_started, 1)
        report["pieces"][name] = result
        status = result.get("error") or result.get("skipped") or "ok"
        print(f"{name}: {status} ({result['seconds']:.0f} s)", flush=True)
        free(device)
    report["seconds"] = time.perf_counter() - started
    options.out.mkdir(parents=True, exist_ok=True)
    stem = "gpu_check_smoke" if options.smoke else "gpu_check"
    (options.out / f"{stem}.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    (options.out / f"{stem}.md").write_text(markdown(report))
    print(markdown(report))
    return report


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
