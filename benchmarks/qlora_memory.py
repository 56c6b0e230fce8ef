"""LoRA vs QLoRA vs QLoRA + 8-bit AdamW: measured on the tiny model on CPU, and the bytes of the full-size model.

    python benchmarks/qlora_memory.py                      # 3 rounds x 3 modes, 5 warm-up + 20 timed SFT steps
    python benchmarks/qlora_memory.py --rounds 1 --steps 5 # a quick look
    python benchmarks/qlora_memory.py --bytes-only         # the full-size table only (seconds)
    python benchmarks/qlora_memory.py --mode qlora --workdir DIR ...   # one mode (what the parent runs)

1. Measured, tiny model (recipes/demo.yaml: the demo's tiny Phi-3-V, its LoRA r=32 on the language model, the
   projector in full, fp32, micro-batch 16 of synthetic chart questions). Modes: `lora` (model.quantization none,
   torch AdamW), `qlora` (nf4, double quantisation, torch AdamW), `qlora_8bit` (nf4, bitsandbytes AdamW8bit). The
   parent saves the tiny base and the synthetic data once, then runs each mode in a fresh subprocess, round-robin,
   `--rounds` times, so that modes share no allocator or high-water mark and a burst of load from other programs
   hits one run rather than one mode. Each child builds what the SFT stage builds (train.core.model_loading.load_model's
   quantisation, train.core.trainable.configure_trainable, train.core.optim.make_optimizer with the recipe's groups), fetches
   its batches first, then times forward + backward + clip + optimizer step; torch threads 1 (`--threads`). Reported
   per mode: the median over rounds of each round's median step time, and of the peak RSS (VmHWM of the whole
   process), with the min-max over rounds; paired per round against `lora` (the step-time ratio and the RSS
   difference of the runs of one round, median and min-max over rounds); the bytes of the weights and of the optimizer state as held in memory;
   and the first and last loss (the same data in every mode). The tiny model's language linears hold 1.3 MB in
   fp32, so its RSS barely moves: the tiny model shows that QLoRA trains and what it costs in time on CPU; the bytes
   table below shows what it saves.
2. Computed, full size: Phi-3-vision-128k-instruct built on the meta device from its config.json
   (`../shared/phi3v/hub/Phi-3-vision-128k-instruct`, or `$PHI3V_HUB_DIR`; else the facts of docs/phi3v.md), its own
   parameters counted per part, and the bytes each mode holds: 16-bit weights; NF4/FP4 = 4 bits a weight + one
   absmax per 64 weights (fp32, or with double quantisation 8-bit + one fp32 per 256 absmaxes, + the 256-entry
   code); int8 = 1 byte a weight + one fp32 scale per output row. The same formula is checked here against
   bitsandbytes' real layers on the tiny model. Training state for chartqa_qlora.yaml's LoRA r=64 (+ the projector
   in full): fp32 parameters and gradients, AdamW 8 bytes a parameter vs 8-bit AdamW 2 (+ one fp32 absmax per 256).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

MODES = {
    "lora": ["model.quantization=none", "train.optimizer=adamw"],
    "qlora": ["model.quantization=nf4", "model.double_quant=true", "train.optimizer=adamw"],
    "qlora_8bit": ["model.quantization=nf4", "model.double_quant=true", "train.optimizer=adamw_8bit"],
}
HUB_CONFIG = (
    Path(os.environ.get("PHI3V_HUB_DIR", REPO.parent / "shared" / "phi3v" / "hub"))
    / "Phi-3-vision-128k-instruct"
    / "config.json"
)
GB = 1e9


# ------------------------------------------------------------------------------------------------ one mode


def status_kb(key: str) -> int:
    match = re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    return int(match.group(1)) if match else 0


def optimizer_bytes(optimizer) -> int:
    return sum(
        v.numel() * v.element_size()
        for state in optimizer.state.values()
        for v in state.values()
        if isinstance(v, torch.Tensor)
    )


def run_mode(mode: str, workdir: Path, steps: int, warmup: int, batch_size: int) -> dict:
    from config import load_recipe
    from data.loaders import load_samples, loader_factory, plan
    from data.sources import SkipCounter
    from models.quantization import language_linears, weight_bytes
    from train.core import optim
    from train.core.losses import sft_loss_sum
    from train.core.model_loading import load_model
    from train.core.trainable import configure_trainable, parameter_groups, upcast_trainable_

    overrides = [
        f"output_dir={workdir / 'run'}",
        f"data.train.0.path={workdir / 'synthetic'}",
        f"data.eval.0.path={workdir / 'synthetic'}",
        f"train.micro_batch_size={batch_size}",
        *MODES[mode],
    ]
    recipe = load_recipe(REPO / "recipes" / "demo.yaml", overrides)

    class OneProcess:  # what load_model asks of an accelerator
        is_main_process = True

        @staticmethod
        def main_process_first():
            import contextlib

            return contextlib.nullcontext()

    model, processor, _ = load_model(
        recipe.model, workdir / "run", seed=recipe.seed, accelerator=OneProcess()
    )
    samples = load_samples(
        recipe.data.train,
        "sft",
        recipe.data,
        seed=0,
        skips=SkipCounter(),
        main_first=OneProcess.main_process_first,
    )
    planned = plan(samples, processor, recipe.data, SkipCounter())
    make_loader, _ = loader_factory(
        planned,
        processor,
        recipe.data,
        stage="sft",
        micro_batch_size=batch_size,
        seed=0,
        num_replicas=1,
        rank=0,
    )
    loader = iter(make_loader(0))
    batches = [next(loader) for _ in range(warmup + steps)]
    weights = weight_bytes(model)
    linear_bytes = weights["quantized"] or sum(
        m.weight.numel() * m.weight.element_size() for _, m in language_linears(model)
    )
    model = configure_trainable(model, recipe.model, recipe.lora, seed=recipe.seed)
    upcast_trainable_(model)
    model.train()
    optimizer = optim.make_optimizer(parameter_groups(model, recipe.train), recipe.train)
    trained = [p for p in model.parameters() if p.requires_grad]
    setup_peak_kb = status_kb("VmHWM")
    times, losses = [], []
    for index, batch in enumerate(batches):
        started = time.perf_counter()
        loss_sum, _ = sft_loss_sum(model, batch)
        loss = loss_sum / int(batch["num_supervised_tokens"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, recipe.train.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if index >= warmup:
            times.append(time.perf_counter() - started)
        losses.append(float(loss))
    return {
        "mode": mode,
        "step_s": statistics.median(times),
        "peak_rss_mb": status_kb("VmHWM") / 1024,
        "setup_peak_rss_mb": setup_peak_kb / 1024,
        "weights": {"linears": linear_bytes, "other": weights["total"] - linear_bytes},
        "optimizer_state_bytes": optimizer_bytes(optimizer),
        "trained_params": sum(p.numel() for p in trained),
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "steps": steps,
        "batch_size": batch_size,
    }


# ------------------------------------------------------------------------------------------------ full size


def fourbit_bytes(numel: int, double_quant: bool, blocksize: int = 64, nested_blocksize: int = 256) -> int:
    """Bytes bitsandbytes holds for a 4-bit weight: packed codes, absmax per block (and its own quantisation)."""
    blocks = -(-numel // blocksize)
    codes = -(-numel // 2)
    if not double_quant:
        return codes + 4 * blocks + 4 * 16  # fp32 absmax; the 16-entry NF4/FP4 code
    nested = -(-blocks // nested_blocksize)
    return codes + blocks + 4 * nested + 4 * 256 + 4 + 4 * 16  # uint8 absmax, fp32 absmax2, 256 code, offset


def int8_bytes(out_features: int, in_features: int) -> int:
    return out_features * in_features + 4 * out_features  # int8 codes + fp32 row scales


def full_size_config():
    from models.phi3v.configuration import Phi3VConfig

    if HUB_CONFIG.is_file():
        return Phi3VConfig.from_pretrained(str(HUB_CONFIG.parent)), str(HUB_CONFIG)
    # docs/phi3v.md: Phi-3-mini's decoder (32 layers, 3072 wide, MLP 8192, vocab 32064) + CLIP ViT-L/14 at 336.
    return Phi3VConfig(
        vocab_size=32064,
        hidden_size=3072,
        intermediate_size=8192,
        num_hidden_layers=32,
        num_attention_heads=32,
    ), "docs/phi3v.md facts (no hub config.json found)"


def full_size_table(lora_r: int = 64) -> tuple[list[tuple[str, float, float, float]], dict, str]:
    """Rows (mode, language-linear GB, other GB, total GB) and the parameter counts, of the full-size model."""
    from models.phi3v import Phi3VForCausalLM
    from models.quantization import language_linears

    config, source = full_size_config()
    with torch.device("meta"):
        model = Phi3VForCausalLM(config)
    linears = language_linears(model)
    linear_params = sum(m.weight.numel() for _, m in linears)
    total_params = sum(p.numel() for p in model.parameters())
    other = (total_params - linear_params) * 2  # bf16
    rows = [("bf16 (LoRA)", linear_params * 2 / GB, other / GB, (linear_params * 2 + other) / GB)]
    for label, size in (
        ("nf4 / fp4", sum(fourbit_bytes(m.weight.numel(), False) for _, m in linears)),
        ("nf4 / fp4 + double quant", sum(fourbit_bytes(m.weight.numel(), True) for _, m in linears)),
        ("int8", sum(int8_bytes(m.out_features, m.in_features) for _, m in linears)),
    ):
        rows.append((label, size / GB, other / GB, (size + other) / GB))
    lora = sum(
        lora_r * (m.in_features + m.out_features)
        for name, m in linears
        if name.rsplit(".", 1)[-1] in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
    )
    projector = sum(p.numel() for n, p in model.named_parameters() if "img_projection" in n)
    counts = {
        "total": total_params,
        "language_linears": linear_params,
        "vision_and_projector": sum(
            p.numel() for n, p in model.named_parameters() if "vision_embed_tokens" in n
        ),
        "lora_r64": lora,
        "projector": projector,
    }
    return rows, counts, source


def check_formula_on_tiny() -> None:
    """The byte formula equals what bitsandbytes' real layers hold (tiny model)."""
    from config import load_recipe
    from models.quantization import language_linears, quantize_language_model_, weight_bytes
    from train.core.model_loading import build_tiny

    recipe = load_recipe(REPO / "recipes" / "demo.yaml")
    for quantization, double_quant in (("nf4", False), ("nf4", True), ("int8", False)):
        model, _ = build_tiny(recipe.model, seed=0)
        shapes = [(m.out_features, m.in_features) for _, m in language_linears(model)]
        quantize_language_model_(model, quantization, double_quant=double_quant, compute_dtype=torch.float32)
        if quantization == "int8":
            expected = sum(int8_bytes(o, i) for o, i in shapes)
        else:
            expected = sum(fourbit_bytes(o * i, double_quant) for o, i in shapes)
        measured = weight_bytes(model)["quantized"]
        assert measured == expected, (quantization, double_quant, measured, expected)


def print_full_size(lora_r: int = 64) -> None:
    check_formula_on_tiny()
    rows, counts, source = full_size_table(lora_r)
    print(f"full size: Phi3VForCausalLM on the meta device from {source}")
    print(
        f"parameters: {counts['total'] / 1e9:.3f} B; language linears {counts['language_linears'] / 1e9:.3f} B; "
        f"CLIP + projector {counts['vision_and_projector'] / 1e9:.3f} B; embeddings, lm_head, norms the rest"
    )
    print(f"{'weights':<26}{'LM linears GB':>14}{'rest (bf16) GB':>16}{'total GB':>10}")
    for label, linear, other, total in rows:
        print(f"{label:<26}{linear:>14.2f}{other:>16.2f}{total:>10.2f}")
    trained = counts["lora_r64"] + counts["projector"]
    fp32 = trained * 4
    adam = trained * 8
    adam8 = trained * 2 + 2 * 4 * -(-trained // 256)
    print(
        f"training state, LoRA r={lora_r} ({counts['lora_r64'] / 1e6:.1f} M) + projector in full "
        f"({counts['projector'] / 1e6:.1f} M): fp32 params {fp32 / GB:.2f} GB + grads {fp32 / GB:.2f} GB + "
        f"AdamW {adam / GB:.2f} GB | 8-bit AdamW {adam8 / GB:.2f} GB"
    )


# ------------------------------------------------------------------------------------------------ the parent


def spawn(mode: str, workdir: Path, args) -> dict:
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--mode",
        mode,
        "--workdir",
        str(workdir),
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--batch-size",
        str(args.batch_size),
        "--threads",
        str(args.threads),
    ]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(args.threads),
        "HF_HUB_OFFLINE": "1",
        "WANDB_MODE": "disabled",
        "TOKENIZERS_PARALLELISM": "false",
    }
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{mode} failed:\n{(done.stdout + done.stderr)[-4000:]}")
    return json.loads((workdir / f"{mode}.json").read_text())


def spread(values: list[float], fmt: str) -> str:
    return f"{format(statistics.median(values), fmt)} ({format(min(values), fmt)}-{format(max(values), fmt)})"


def header(args) -> None:
    now = datetime.datetime.now(datetime.timezone.utc)
    packages = ("torch", "transformers", "peft", "accelerate", "bitsandbytes")
    print(f"# qlora memory benchmark, {now:%Y-%m-%d %H:%M} UTC")
    print(f"command: {' '.join([sys.executable, *sys.argv])}  (cwd {os.getcwd()})")
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(
        f"machine: {platform.platform()}, {platform.machine()}, {os.cpu_count()} CPUs ({usable} usable); "
        f"python {platform.python_version()}, " + ", ".join(f"{p} {metadata.version(p)}" for p in packages)
    )
    print(f"load average at start (1/5/15 min): {'/'.join(f'{x:.2f}' for x in os.getloadavg())}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--bytes-only", action="store_true")
    parser.add_argument("--mode", choices=sorted(MODES))
    parser.add_argument("--workdir", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.mode:  # a child
        result = run_mode(args.mode, args.workdir, args.steps, args.warmup, args.batch_size)
        (args.workdir / f"{args.mode}.json").write_text(json.dumps(result))
        return
    header(args)
    if not args.bytes_only:
        from data.synthetic import DEMO_COUNTS, write_synthetic

        with tempfile.TemporaryDirectory(prefix="qlora-bench-") as tmp:
            workdir = Path(tmp)
            write_synthetic(workdir / "synthetic", seed=0, **DEMO_COUNTS)
            spawn(
                "lora", workdir, argparse.Namespace(**{**vars(args), "steps": 1, "warmup": 0})
            )  # builds base/
            runs: dict[str, list[dict]] = {mode: [] for mode in MODES}
            for round_ in range(args.rounds):
                for mode in MODES:
                    runs[mode].append(spawn(mode, workdir, args))
                print(
                    f"round {round_ + 1}: "
                    + ", ".join(f"{m} {runs[m][-1]['step_s'] * 1000:.0f} ms/step" for m in MODES),
                    flush=True,
                )
        print(
            f"\ntiny model (recipes/demo.yaml), SFT micro-batch {args.batch_size}, {args.warmup} warm-up + "
            f"{args.steps} timed steps, {args.threads} thread(s), {args.rounds} rounds; median (min-max) over rounds"
        )
        print(
            f"{'mode':<12}{'ms/step':>20}{'peak RSS MB':>22}{'LM linears KB':>15}{'other KB':>10}"
            f"{'optim state KB':>16}{'loss first->last':>20}"
        )
        for mode, results in runs.items():
            r = results[0]
            print(
                f"{mode:<12}{spread([x['step_s'] * 1000 for x in results], '.0f'):>20}"
                f"{spread([x['peak_rss_mb'] for x in results], '.0f'):>22}"
                f"{r['weights']['linears'] / 1024:>15.0f}"
                f"{r['weights']['other'] / 1024:>10.0f}{r['optimizer_state_bytes'] / 1024:>16.0f}"
                f"{r['first_loss']:>12.3f}->{r['last_loss']:.3f}"
            )
        print("paired, per round, against lora in the same round: median (min-max) of the ratio")
        for mode in [m for m in MODES if m != "lora"]:
            step = [x["step_s"] / y["step_s"] for x, y in zip(runs[mode], runs["lora"])]
            rss = [x["peak_rss_mb"] - y["peak_rss_mb"] for x, y in zip(runs[mode], runs["lora"])]
            print(f"  {mode:<12} step time x{spread(step, '.2f')}   peak RSS {spread(rss, '+.0f')} MB")
        print()
    print_full_size()


if __name__ == "__main__":
    main()
