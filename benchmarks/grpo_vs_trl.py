"""GRPO steps on the same tiny Phi-3-V: our stage (train/grpo.py) vs TRL's `GRPOTrainer`, side by side.

    python benchmarks/grpo_vs_trl.py                       # 1 warm-up + 4 timed steps of 4 prompts x 8, 3 runs a side
    python benchmarks/grpo_vs_trl.py --steps 3 --repeats 1
    python benchmarks/grpo_vs_trl.py --side ours --workdir DIR ...   # one side only (what the parent runs)

The parent prepares one temporary folder: the synthetic data (`data.synthetic.write_synthetic`), a file of its
single-turn image questions in TRL's conversational format, and the demo's tiny model (recipes/demo_grpo.yaml's
`model` section) saved once. Each side then runs in its own subprocess, alternating, `--repeats` times
(`benchmarks/dpo_vs_trl.py`'s `spawn_side`): no shared allocator, import state or memory high-water mark.

Both sides: the same weights (ours builds the demo's `tiny` base from the recipe's seed, as the parent built the
saved one TRL loads), a fresh LoRA (demo's r, alpha, dropout, target modules on the language model;
tower and projector frozen), the same prompts (shuffled by each side's own sampler), `--batch-size` prompts x
`--generations` completions per step, at most `--max-new-tokens` tokens at temperature 1.0, the exact-match reward,
TRL's default loss (`dapo`, epsilon 0.2, beta 0, one iteration per generation, group scaling), AdamW at the demo's
GRPO learning rate, fp32 on CPU.

- ours: `train.grpo.main` with the stage's own loader (rollouts: each prompt's image encoded once, its KV cache
  shared by its completions) and loss (the rollout's image features reused: no vision pass in the loss pass);
  seconds per step from the loop's logged throughput (generation, rewards and the training step together).
- TRL: `trl.GRPOTrainer(model, reward_funcs=[exact_match], processing_class=...)`; TRL 1.16 generates with
  `model.generate` on the prompt repeated G times (each copy with its image) and runs the loss pass on every
  prompt + completion row with its pixels. Our `Phi3VProcessor` is given to it through `TrlProcessor`, which answers
  the two calls TRL makes that our processor does not take: `apply_chat_template(conversation=..., tokenize=True,
  return_dict=True)` and `image_processor(images, crop_to_patches=True)` (the crops per image, with which TRL splits
  the tile-indexed `pixel_values`). Seconds per step: TRL's own logged `step_time` (generation included).

Measured per side over the timed steps: completions/s, s/step, completion tokens per step (the two sides stop at
different ids: TRL at the tokenizer's EOS, ours at `<|end|>` too), CLIP calls and images per step (forward hooks on
the CLIP trunk, counted by patching `Phi3VImageEmbedding.forward`). Losses are not compared: each side samples its
completions from its own random stream, so the sides train on different completions; the loss formulas are shown
equal to TRL's, on the same inputs, by tests/train/test_grpo_losses.py.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from benchmarks.dpo_vs_trl import paired_ratios, print_machine, spawn_side, write_result  # noqa: E402

RECIPE = REPO / "recipes" / "demo_grpo.yaml"
SIDES = ("ours", "trl")


def count_vision_calls() -> dict:
    """Patch the image embedding's forward to count its calls and the images it encodes."""
    from models.phi3v.vision import Phi3VImageEmbedding

    counts = {"calls": 0, "images": 0}
    forward = Phi3VImageEmbedding.forward

    def counted(self, pixel_values, image_sizes):
        counts["calls"] += 1
        counts["images"] += int(image_sizes.shape[0])
        return forward(self, pixel_values, image_sizes)

    Phi3VImageEmbedding.forward = counted
    return counts


def prepare_workdir(workdir: Path) -> None:
    from config import load_recipe
    from data.synthetic import DEMO_COUNTS, write_synthetic
    from train.core.model_loading import build_tiny

    paths = write_synthetic(workdir / "synthetic", seed=0, **DEMO_COUNTS)
    rows = [json.loads(line) for line in paths.sft_train.read_text().splitlines()]
    single = [row for row in rows if len(row.get("images") or []) == 1 and len(row["messages"]) == 2]
    (workdir / "prompts.jsonl").write_text("".join(json.dumps(row) + "\n" for row in single))
    recipe = load_recipe(RECIPE)
    model, processor = build_tiny(recipe.model, 0)
    model.save_pretrained(workdir / "base")
    processor.save_pretrained(workdir / "base")


def our_overrides(workdir: Path, args) -> list[str]:
    return [
        f"output_dir={workdir / 'ours_run'}",
        "overwrite_output_dir=true",
        "stages=[grpo]",
        "data.train.0.format=trl_messages",
        f"data.train.0.path={workdir / 'prompts.jsonl'}",
        f"data.train.0.image_root={workdir / 'synthetic'}",
        f"train.micro_batch_size={args.batch_size}",
        "train.grad_accum=1",
        "train.log_every=1",
        "train.checkpoint_every=100000",
        "train.scheduler=constant",
        "train.warmup_ratio=0.0",
        f"grpo.max_steps={args.warmup + args.steps}",
        f"grpo.num_generations={args.generations}",
        f"grpo.max_new_tokens={args.max_new_tokens}",
        "grpo.temperature=1.0",
        "grpo.loss_type=dapo",
        "grpo.rewards=[{type: exact_match}]",
    ]


def run_ours(workdir: Path, args) -> dict:
    from config import load_recipe
    from train import grpo

    counts = count_vision_calls()
    run = grpo.main(load_recipe(RECIPE, our_overrides(workdir, args)), RECIPE)
    history = json.loads((run / "grpo" / "summary.json").read_text())["history"]
    timed = history[args.warmup :]
    completions = args.batch_size * args.generations
    return {
        "seconds_per_step": [completions / h["samples_per_s"] for h in timed],
        "completion_tokens": [h["supervised_tokens"] for h in timed],
        "vision_calls": counts["calls"] / len(history),
        "vision_images": counts["images"] / len(history),
    }


def trl_processor(processor):
    """Our processor answering the calls TRL's GRPOTrainer makes of a VLM processor (module doc)."""
    from models.phi3v import Phi3VProcessor
    from models.phi3v.image_processing import crop_grid

    class TrlImageProcessor:
        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def __call__(self, images, crop_to_patches=False, return_tensors="pt", **kwargs):
            if not crop_to_patches:
                return self.inner(images, **kwargs)
            flat = [image for group in images for image in (group if isinstance(group, list) else [group])]
            grids = [
                crop_grid(im.width, im.height, self.inner.num_crops, self.inner.crop_size) for im in flat
            ]
            return {"num_patches": torch.tensor([rows * cols for rows, cols in grids])}

    class TrlProcessor(Phi3VProcessor):
        def apply_chat_template(
            self,
            conversation,
            add_generation_prompt=False,
            tokenize=False,
            return_dict=False,
            chat_template=None,
            tools=None,
            **kwargs,
        ):
            single = bool(conversation) and isinstance(conversation[0], dict)
            conversations = [conversation] if single else conversation
            texts = [
                Phi3VProcessor.apply_chat_template(self, c, add_generation_prompt=add_generation_prompt)
                for c in conversations
            ]
            if not tokenize:
                return texts[0] if single else texts
            images = [
                [
                    part["image"]
                    for message in c
                    if isinstance(message["content"], list)
                    for part in message["content"]
                    if part["type"] == "image"
                ]
                for c in conversations
            ]
            out = self(text=texts, images=images, padding_side="left", do_normalize=False)
            ids = [row[mask.bool()].tolist() for row, mask in zip(out["input_ids"], out["attention_mask"])]
            fields = {k: v for k, v in out.items() if k not in ("input_ids", "attention_mask")}
            return {"input_ids": ids, "attention_mask": [[1] * len(i) for i in ids], **fields}

    wrapped = TrlProcessor.__new__(TrlProcessor)
    wrapped.__dict__.update(processor.__dict__)
    wrapped.image_processor = TrlImageProcessor(processor.image_processor)
    return wrapped


def run_trl(workdir: Path, args) -> dict:
    from datasets import Dataset, Image, List
    from peft import LoraConfig
    from trl import GRPOConfig, GRPOTrainer

    import models
    from config import load_recipe
    from eval.metrics import exact_match

    recipe = load_recipe(RECIPE)
    counts = count_vision_calls()
    model, processor = models.load(
        str(workdir / "base"), dtype="float32", attn_implementation="sdpa", num_crops=recipe.model.num_crops
    )
    rows = []
    for line in (workdir / "prompts.jsonl").read_text().splitlines():
        row = json.loads(line)
        prompt, answer = row["messages"]
        rows.append(
            {
                "prompt": [prompt],
                "answer": answer["content"][0]["text"],
                "images": [str(workdir / "synthetic" / path) for path in row["images"]],
            }
        )
    dataset = Dataset.from_list(rows).cast_column("images", List(Image()))

    def exact(completions, answer, **kwargs):
        return [
            exact_match(c[0]["content"] if isinstance(c, list) else c, [a])
            for c, a in zip(completions, answer)
        ]

    config = GRPOConfig(
        output_dir=str(workdir / "trl_run"),
        per_device_train_batch_size=args.batch_size * args.generations,
        num_generations=args.generations,
        max_completion_length=args.max_new_tokens,
        max_steps=args.warmup + args.steps,
        learning_rate=recipe.grpo.lr,
        lr_scheduler_type="constant",
        max_grad_norm=recipe.train.max_grad_norm,
        temperature=1.0,
        loss_type="dapo",
        beta=0.0,
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        seed=0,
    )
    lora = LoraConfig(
        r=recipe.lora.r,
        lora_alpha=recipe.lora.alpha,
        lora_dropout=recipe.lora.dropout,
        target_modules=list(recipe.lora.target_modules),
    )
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=[exact],
        args=config,
        train_dataset=dataset,
        processing_class=trl_processor(processor),
        peft_config=lora,
    )
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "step_time" in entry]
    timed = logged[args.warmup :]
    steps = len(logged)
    return {
        "seconds_per_step": [float(h["step_time"]) for h in timed],
        "completion_tokens": [
            float(h["completions/mean_length"]) * args.batch_size * args.generations for h in timed
        ],
        "vision_calls": counts["calls"] / steps,
        "vision_images": counts["images"] / steps,
    }


def summarise(result: dict, args) -> dict:
    seconds = statistics.median(result["seconds_per_step"])
    return {
        "completions_per_s": args.batch_size * args.generations / seconds,
        "seconds_per_step": seconds,
        "tokens_per_step": statistics.median(result["completion_tokens"]),
        "vision_calls": result["vision_calls"],
        "vision_images": result["vision_images"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=4, help="prompts per step")
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--side", choices=SIDES)
    parser.add_argument("--workdir", type=Path)
    args = parser.parse_args()
    if args.side:  # spawn_side passes the shared options; the rest come from the parent's args.json
        vars(args).update(json.loads((args.workdir / "args.json").read_text()))
        torch.set_num_threads(args.threads or torch.get_num_threads())
        result = run_ours(args.workdir, args) if args.side == "ours" else run_trl(args.workdir, args)
        write_result(args.workdir, args.side, result)
        return
    print_machine("GRPO steps, ours vs TRL GRPOTrainer", args)
    print(
        f"run: {args.warmup} warm-up + {args.steps} timed steps of {args.batch_size} prompts x {args.generations} "
        f"completions (at most {args.max_new_tokens} tokens, temperature 1.0), dapo loss, beta 0; {args.repeats} "
        "run(s) per side, alternating (ours first), each in a fresh subprocess"
    )
    runs: dict[str, list[dict]] = {side: [] for side in SIDES}
    with tempfile.TemporaryDirectory(prefix="grpo-vs-trl-") as tmp:
        workdir = Path(tmp)
        prepare_workdir(workdir)
        (workdir / "args.json").write_text(
            json.dumps({"generations": args.generations, "max_new_tokens": args.max_new_tokens})
        )
        for _ in range(args.repeats):
            for side in SIDES:
                result, failure = spawn_side(side, workdir, args, script=Path(__file__))
                if result is None:
                    raise SystemExit(f"the {side} side failed:\n{failure}")
                runs[side].append(summarise(result, args))
    columns = ("completions_per_s", "seconds_per_step", "tokens_per_step", "vision_calls", "vision_images")
    print("side  " + "  ".join(f"{c:>18}" for c in columns))
    for side in SIDES:
        print(
            f"{side:5} " + "  ".join(f"{statistics.median(r[c] for r in runs[side]):18.2f}" for c in columns)
        )
    print(
        paired_ratios(
            [r["completions_per_s"] for r in runs["ours"]],
            [r["completions_per_s"] for r in runs["trl"]],
            "completions/s",
        )
    )


if __name__ == "__main__":
    main()
