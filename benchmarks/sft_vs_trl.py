"""SFT steps on the same tiny Phi-3-V, the same LoRA and the same batches: our stage's step vs TRL's `SFTTrainer`.

    python benchmarks/sft_vs_trl.py                        # 3 warm-up + 20 timed steps of 16 samples, 5 runs a side
    python benchmarks/sft_vs_trl.py --steps 10 --repeats 2
    python benchmarks/sft_vs_trl.py --width real           # real widths, 2 and 3 layers: see dpo_vs_trl.py's docstring
    python benchmarks/sft_vs_trl.py --width real --processes 2      # the same, each side as 2 DDP processes (gloo)
    python benchmarks/sft_vs_trl.py --side ours --workdir DIR ...   # one side only (what the parent runs)

Built like `dpo_vs_trl.py` (whose measuring helpers it imports): the parent writes the synthetic SFT conversations
(`sft_train.jsonl`) and the demo's tiny model once, then runs each side in its own subprocess, alternating, `--repeats`
times, and reports the paired ratio of each repeat (ours / TRL, in the order they ran) as median and min-max.

Same work on both sides:
- the same saved tiny model and the same peft `LoraConfig` added after the same seed: the demo's `lora` section on
  the language model's qkv_proj, o_proj, gate_up_proj, down_proj; tower and projector frozen (the demo's SFT stage
  also trains the projector in full; here both sides train the same LoRA only). The initial trainable weights are
  fingerprinted on both sides and must be identical;
- the same batches: the first `(warmup + steps) x batch_size` conversations in file order, rendered by our
  `RenderedDataset` and padded by our `SFTCollator` on both sides (TRL with
  `dataset_kwargs={"skip_prepare_dataset": True}` and a `data_collator` that renders), so every step sees the same
  token ids, labels and uint8 crops (SFTTrainer takes a `datasets.Dataset` only: it gets one of row indices, and
  its collator renders those rows);
- the same loss: summed token cross-entropy over the supervised tokens / their count (TRL's `nll` with
  `num_items_in_batch`), AdamW at the demo's SFT learning rate (constant), clipping at 1.0, fp32, no gradient
  checkpointing. The parent asserts that both sides log the same loss at every step (`--loss-rtol`).

- ours: `train.core.loop.train_step` with `train.core.losses.sft_loss_sum`: logits only at the supervised (row, position)
  pairs, from `models.phi3v.supervised_forward` (one process, SDPA, right padding): the decoder's layers run on the
  batch's real tokens only (the padding, ~40% of these batches' positions, is never computed) and the last layer's
  queries, attention output, MLP and final norm only at the supervised positions. Same logits and gradients as the
  full forward (tests/models/test_supervised_forward.py); LM tokens/step shows the positions it computes. No CLIP pass for
  a text-only batch in one process;
- TRL: `trl.SFTTrainer(model, args=SFTConfig(...), train_dataset=rows, data_collator=..., peft_config=LoraConfig)`:
  its fused log-prob head over every position, plus its entropy and token-accuracy metrics.

`--width real` and `--processes 2` are dpo_vs_trl.py's (the model, LoRA r 64, gradient checkpointing on both sides,
2 samples a step, the projection to 32 layers; each rank its share of the batches, TRL's loss averaged over the ranks
as its DDP gradient is). At real width ours takes the real-token path under gradient checkpointing and under DDP.

Timed span per step: forward, backward, clipping, optimizer step (TRL: `on_step_begin` to `on_step_end`); fetching
and collating the batch is timed apart (data ms/step), and both sides fetch it the same way (the same rows, the same
collator, no worker processes). Columns as in dpo_vs_trl.py.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(
    0, str(REPO)
)  # this checkout's packages, also when another checkout is installed in editable mode
sys.path.insert(0, str(REPO / "benchmarks"))

import torch  # noqa: E402
from dpo_vs_trl import (  # noqa: E402
    REAL_DEPTHS,
    SEED,
    StepMeter,
    TrlStepRecorder,
    add_width_arguments,
    configure_width,
    depths,
    fill_width_defaults,
    load_base,
    load_demo_recipe,
    lora_config,
    model_description,
    paired_ratios,
    prepare_base,
    print_checkpointing,
    print_machine,
    print_projection,
    projects,
    rank_and_world,
    rank_batches,
    spawn_side,
    time_our_steps,
    trainable_fingerprint,
    trl_result,
    trl_trainer_args,
    with_depth,
    write_result,
)

SIDES = ("ours", "trl")


def prepare_workdir(workdir: Path, num_samples: int) -> None:
    from data.synthetic import write_synthetic

    write_synthetic(
        workdir / "synthetic", seed=SEED, n_train=num_samples, n_eval=0, n_pref_train=0, n_pref_eval=0
    )
    prepare_base(workdir, load_demo_recipe())


def rendered_rows(workdir: Path, recipe, processor, num_samples: int):
    """Our RenderedDataset over the first `num_samples` conversations of sft_train.jsonl, in file order."""
    from config import Source
    from data.collate import RenderedDataset
    from data.loaders import load_samples, plan
    from data.sources import SkipCounter

    source = Source(
        format="trl_messages",
        path=str(workdir / "synthetic" / "sft_train.jsonl"),
        image_root=str(workdir / "synthetic"),
        limit=num_samples,
    )
    data = replace(recipe.data, train=(source,), num_workers=0)
    skips = SkipCounter()
    planned = plan(
        load_samples(data.train, "sft", data, seed=recipe.seed, skips=skips), processor, data, skips
    )
    if len(planned) != num_samples:
        raise RuntimeError(f"{len(planned)} samples planned, {num_samples} needed:\n{skips.summary()}")
    return RenderedDataset(planned, processor, assistant_turns=data.assistant_turns)


class TrlCollator:
    """Rows of indices (SFTTrainer takes a `datasets.Dataset` only) -> our rendered rows -> our SFTCollator, minus
    the key only our loop reads. Rendering runs here, in the batch fetch, as in our DataLoader."""

    def __init__(self, rows, pad_token_id: int):
        from data.collate import SFTCollator

        self.rows = rows
        self.collate = SFTCollator(pad_token_id=pad_token_id)

    def __call__(self, items):
        batch = self.collate([self.rows[item["index"]] for item in items])
        batch.pop("num_supervised_tokens")
        return batch


def run_ours(workdir: Path, steps: int, warmup: int, batch_size: int) -> dict:
    from accelerate.utils import set_seed
    from torch.utils.data import DataLoader

    from data.collate import SFTCollator
    from train.core import device, optim
    from train.core.losses import sft_loss_sum, supervised_tokens
    from train.core.trainable import configure_trainable, dpo_parts, parameter_groups, upcast_trainable_

    recipe = load_demo_recipe()
    total = warmup + steps
    accelerator = device.make_accelerator(recipe, workdir / "ours_run", grad_accum=1)
    model, processor = load_base(workdir, recipe)
    meter = StepMeter(model)
    loader = DataLoader(  # file order, each rank its share of the batches (as the Trainer's prepared loader)
        rendered_rows(workdir, recipe, processor, total * batch_size * rank_and_world()[1]),
        batch_sampler=rank_batches(total, batch_size),
        num_workers=0,
        collate_fn=SFTCollator(pad_token_id=processor.tokenizer.pad_token_id),
    )
    set_seed(recipe.seed)  # as the Trainer does before it adds the adapter: the same LoRA initialisation
    model = configure_trainable(
        model, dpo_parts(recipe.model), recipe.lora
    )  # LM LoRA only (see the docstring)
    fingerprint = trainable_fingerprint(model)
    upcast_trainable_(model)
    train_section = replace(recipe.train, scheduler="constant", warmup_steps=0)
    optimizer = optim.make_optimizer(parameter_groups(model, train_section), train_section)
    scheduler = optim.make_scheduler(optimizer, train_section, total)
    model, optimizer = device.prepare(accelerator, model, optimizer, batch_size)
    return time_our_steps(
        accelerator,
        model,
        optimizer,
        scheduler,
        loader,
        sft_loss_sum,
        supervised_tokens,
        total=total,
        max_grad_norm=recipe.train.max_grad_norm,
        meter=meter,
        fingerprint=fingerprint,
        extra=lambda record: {"tokens": record["units"]},
    )


def trl_config(workdir: Path, recipe, steps: int, batch_size: int):
    from trl import SFTConfig

    return SFTConfig(
        **trl_trainer_args(workdir, recipe, steps, batch_size),
        learning_rate=recipe.train.lr,
        dataset_kwargs={"skip_prepare_dataset": True},
        remove_unused_columns=False,
    )


def run_trl(workdir: Path, steps: int, warmup: int, batch_size: int) -> dict:
    from datasets import Dataset
    from trl import SFTTrainer

    recipe = load_demo_recipe()
    total = warmup + steps
    rows = total * batch_size * rank_and_world()[1]
    model, processor = load_base(workdir, recipe)
    recorder = TrlStepRecorder(StepMeter(model))
    trainer = SFTTrainer(
        model=model,
        args=trl_config(workdir, recipe, total, batch_size),
        train_dataset=Dataset.from_dict({"index": list(range(rows))}),
        data_collator=TrlCollator(
            rendered_rows(workdir, recipe, processor, rows), processor.tokenizer.pad_token_id
        ),
        processing_class=processor,
        peft_config=lora_config(model, recipe),
    )
    losses: list[float] = []
    compute_loss = trainer.compute_loss

    def recorded_loss(*args, **kwargs):  # the exact per-step loss (the logged one may be rounded)
        loss = compute_loss(*args, **kwargs)
        losses.append(float((loss[0] if isinstance(loss, tuple) else loss).detach()))
        return loss

    trainer.compute_loss = recorded_loss
    recorder.time_fetches(trainer)
    trainer.add_callback(recorder)
    trainer.train()
    if len(losses) != len(recorder.records):
        raise RuntimeError(f"trl: {len(losses)} losses for {len(recorder.records)} steps")
    if rank_and_world()[1] > 1:
        # compute_loss returns this rank's sum / the step's tokens on all ranks x ranks (what DDP averages): the
        # mean over the ranks is the step's loss.
        gathered = torch.tensor(losses, dtype=torch.float64)
        torch.distributed.all_reduce(gathered)
        losses = (gathered / rank_and_world()[1]).tolist()
    return trl_result(recorder, losses)


def run_side(
    side: str, workdir: Path, steps: int, warmup: int, batch_size: int, threads: int, width: str, depth
) -> None:
    if threads:
        torch.set_num_threads(threads)
    configure_width(width, depth)
    write_result(workdir, side, (run_ours if side == "ours" else run_trl)(workdir, steps, warmup, batch_size))


# ------------------------------------------------------------------------------------------------ the parent


def summarise(result: dict, warmup: int, batch_size: int) -> dict:
    timed = result["steps"][warmup:]
    seconds = sum(step["seconds"] for step in timed)
    cpu_seconds = sum(step["cpu_seconds"] for step in timed)

    def mean(key: str) -> float:
        return sum(step[key] for step in timed) / len(timed)

    return {
        "samples_per_s": batch_size * len(timed) / seconds,
        "samples_per_cpu_s": batch_size * len(timed) / cpu_seconds,
        "seconds_per_step": seconds / len(timed),
        "cpu_seconds_per_step": cpu_seconds / len(timed),
        "data_ms": 1000 * mean("data_seconds"),
        "clip_calls": mean("clip_calls"),
        "clip_ms": 1000 * mean("clip_seconds"),
        "clip_cpu_ms": 1000 * mean("clip_cpu_seconds"),
        "decoder_ms": 1000 * mean("decoder_seconds"),
        "head_ms": 1000 * mean("head_seconds"),
        "lm_tokens": mean("lm_tokens"),
        "saved_mb": mean("saved_mb"),
        "peak_mb": result["lifetime_peak_mb"],
        "train_growth_mb": result["train_growth_mb"],
        "losses": [step["loss"] for step in result["steps"]],
    }


COLUMNS = (
    ("samples/s", "samples_per_s", "{:.4g}"),
    ("s/step", "seconds_per_step", "{:.3f}"),
    ("CPU s/step", "cpu_seconds_per_step", "{:.3f}"),
    ("data ms/step", "data_ms", "{:.0f}"),
    ("CLIP calls/step", "clip_calls", "{:.2f}"),
    ("CLIP ms/step", "clip_ms", "{:.1f}"),
    ("layers CPU ms", "decoder_ms", "{:.0f}"),
    ("head CPU ms", "head_ms", "{:.0f}"),
    ("LM tokens/step", "lm_tokens", "{:.0f}"),
    ("saved MB/step", "saved_mb", "{:.1f}"),
    ("peak RSS MB", "peak_mb", "{:.0f}"),
    ("train +MB", "train_growth_mb", "{:.0f}"),
)


def print_table(runs: dict[str, list[dict]]) -> None:
    """Per side, the median over its runs of each column."""
    widths = [max(len(title), 8) for title, _, _ in COLUMNS]
    print("medians over the runs of each side:")
    print(f"{'side':<9}" + " ".join(f"{title:>{w}}" for (title, _, _), w in zip(COLUMNS, widths)))
    medians = {}
    for side, summaries in runs.items():
        medians[side] = {key: statistics.median(s[key] for s in summaries) for _, key, _ in COLUMNS}
        cells = [fmt.format(medians[side][key]) for _, key, fmt in COLUMNS]
        print(f"{side:<9}" + " ".join(f"{c:>{w}}" for c, w in zip(cells, widths)))
    ratios = [
        medians["ours"][key] / medians["TRL"][key] if medians["TRL"][key] else float("nan")
        for _, key, _ in COLUMNS
    ]
    print(f"{'ours/TRL':<9}" + " ".join(f"{r:>{w - 1}.2f}x" for r, w in zip(ratios, widths)))


def check_losses(runs: dict[str, list[dict]], rtol: float) -> float:
    """The largest relative gap between any run's loss and ours' first run's, step by step; raises above rtol."""
    reference = runs["ours"][0]["losses"]
    worst = 0.0
    for side, summaries in runs.items():
        for summary in summaries:
            if len(summary["losses"]) != len(reference):
                raise AssertionError(f"{side}: {len(summary['losses'])} steps, ours {len(reference)}")
            for step, (a, b) in enumerate(zip(summary["losses"], reference)):
                gap = abs(a - b) / abs(b)
                worst = max(worst, gap)
                if gap > rtol:
                    raise AssertionError(
                        f"{side}, step {step}: loss {a!r} vs ours {b!r} (relative gap {gap:.1e} > "
                        f"{rtol:.0e}): the sides do not do the same work"
                    )
    return worst


def run_both(args: argparse.Namespace) -> None:
    import transformers

    from models.phi3v.tiny import DEMO_MODEL

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    configure_width(args.width, None)
    recipe = load_demo_recipe()
    per_step = args.batch_size * args.processes
    print_machine("SFT steps, ours vs TRL SFTTrainer", args)
    print(
        f"model: {model_description(args, DEMO_MODEL)}, {recipe.model.dtype}, {recipe.model.attn_implementation}, "
        f"num_crops {recipe.model.num_crops}; LoRA r {recipe.lora.r}, alpha {recipe.lora.alpha}, dropout "
        f"{recipe.lora.dropout} on the LM's {', '.join(recipe.lora.target_modules)}; tower and projector frozen; "
        f"gradient checkpointing {'on' if recipe.model.gradient_checkpointing else 'off'}; {args.processes} "
        "process(es) per side"
    )
    print(
        f"run: {args.warmup} warm-up + {args.steps} timed steps of {args.batch_size} samples per process, the first "
        f"{(args.warmup + args.steps) * per_step} synthetic conversations in file order; AdamW lr "
        f"{recipe.train.lr:g} constant, clip {recipe.train.max_grad_norm}; {args.repeats} run(s) per side, "
        "alternating (ours first), each in a fresh subprocess"
    )
    labels = {"ours": "ours", "trl": "TRL"}
    runs: dict = {d: {label: [] for label in labels.values()} for d in depths(args)}
    fingerprints: dict = {d: set() for d in depths(args)}
    checkpointing: dict = {label: set() for label in labels.values()}
    with tempfile.TemporaryDirectory(prefix="sft_vs_trl-") as tmp:
        workdir = Path(tmp)
        prepare_workdir(workdir, (args.warmup + args.steps) * per_step)
        for repeat in range(args.repeats):
            for depth in depths(args):
                for side, label in labels.items():
                    where = "" if depth is None else f" at {depth} layers"
                    started = time.perf_counter()
                    result, failure = spawn_side(
                        side, workdir, with_depth(args, depth), script=Path(__file__)
                    )
                    if result is None:
                        print(f"run {repeat + 1} {label}{where}: failed; the tail of its output:\n{failure}")
                        sys.exit(1)
                    runs[depth][label].append(summarise(result, args.warmup, per_step))
                    fingerprints[depth].add(result["initial_trainable"])
                    checkpointing[label].update(step["checkpointing"] for step in result["steps"])
                    print(
                        f"run {repeat + 1} {label}{where}: {runs[depth][label][-1]['samples_per_s']:.4g} samples/s, "
                        f"subprocess {time.perf_counter() - started:.0f} s; load average now "
                        f"{os.getloadavg()[0]:.2f}",
                        flush=True,
                    )
    print_checkpointing(checkpointing)
    for depth in depths(args):
        if depth is not None:
            print(f"## {depth} decoder layers")
        report_depth(args, runs[depth], fingerprints[depth])
    if projects(args):
        sides = tuple(labels.values())
        for clock, step_key, clip_key in (
            ("wall", "seconds_per_step", "clip_ms"),
            ("CPU", "cpu_seconds_per_step", "clip_cpu_ms"),
        ):
            print_projection(
                {side: {d: [r[step_key] for r in runs[d][side]] for d in REAL_DEPTHS} for side in sides},
                {
                    side: {d: [r[clip_key] / 1000 for r in runs[d][side]] for d in REAL_DEPTHS}
                    for side in sides
                },
                per_step,
                "samples/s",
                clock,
            )


def report_depth(args: argparse.Namespace, runs: dict[str, list[dict]], fingerprints: set[str]) -> None:
    """One model's runs: fingerprints, the losses of both sides step by step, the table and the paired ratio."""
    if len(fingerprints) != 1:
        raise AssertionError(f"initial trainable weights differ between runs: {sorted(fingerprints)}")
    print(f"initial trainable weights: identical in every run of both sides ({next(iter(fingerprints))})")
    worst = check_losses(runs, args.loss_rtol)
    losses = runs["ours"][0]["losses"]
    print(
        f"losses: equal at every step on both sides (largest relative gap {worst:.1e}, allowed {args.loss_rtol:.0e});"
        f" first/last {losses[0]:.6f}/{losses[-1]:.6f}"
    )
    print_table(runs)
    print(
        paired_ratios(
            [s["samples_per_s"] for s in runs["ours"]], [s["samples_per_s"] for s in runs["TRL"]], "samples/s"
        )
    )
    print(
        paired_ratios(
            [s["samples_per_cpu_s"] for s in runs["ours"]],
            [s["samples_per_cpu_s"] for s in runs["TRL"]],
            "samples/CPU-s",
            names="ours/TRL (process CPU time)",
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--steps", type=int, help="timed optimizer steps per side (default 20; --width real: 3)"
    )
    parser.add_argument(
        "--warmup", type=int, help="optimizer steps run first and not timed (default 3; --width real: 1)"
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        help="samples per optimizer step and process (default the demo's 16; real: 2)",
    )
    parser.add_argument(
        "--repeats", type=int, help="runs per side, alternating; paired medians (default 5; --width real: 3)"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads per side (0: torch's default)")
    parser.add_argument(
        "--loss-rtol",
        type=float,
        default=1e-4,
        help="largest relative gap allowed between the sides' losses at any step",
    )
    parser.add_argument("--side", choices=SIDES, help="run one side in this process (needs --workdir)")
    parser.add_argument("--workdir", type=Path, help="a folder the parent prepared (with --side)")
    add_width_arguments(parser)
    args = parser.parse_args()
    fill_width_defaults(
        args,
        tiny=dict(steps=20, warmup=3, batch_size=16, repeats=5),
        real=dict(steps=3, warmup=1, batch_size=2, repeats=3),
    )
    if (
        min(args.steps, args.batch_size, args.repeats, args.processes) < 1
        or min(args.warmup, args.threads) < 0
    ):
        parser.error("need --steps, --batch-size, --repeats, --processes >= 1 and --warmup, --threads >= 0")
    if args.side:
        if args.workdir is None:
            parser.error("--side needs --workdir (a folder prepared by the parent run)")
        run_side(
            args.side,
            args.workdir,
            args.steps,
            args.warmup,
            args.batch_size,
            args.threads,
            args.width,
            args.depth,
        )
    else:
        run_both(args)


if __name__ == "__main__":
    main()
