"""DPO steps on the same tiny Phi-3-V: our stage (train/dpo.py) vs TRL's `DPOTrainer`, side by side.

    python benchmarks/dpo_vs_trl.py                        # 3 warm-up + 30 timed steps of 16 pairs, 3 runs a side
    python benchmarks/dpo_vs_trl.py --steps 10 --batch-size 8 --repeats 1
    python benchmarks/dpo_vs_trl.py --width real           # real widths, 2 and 3 layers, 1 warm-up + 3 steps of 2, 3 repeats
    python benchmarks/dpo_vs_trl.py --width real --processes 2      # the same, each side as 2 DDP processes (gloo)
    python benchmarks/dpo_vs_trl.py --side ours --workdir DIR ...   # one side only (what the parent runs)

The parent prepares one temporary folder: the synthetic preference pairs (`data.synthetic.write_synthetic`,
`pref_train.jsonl` in TRL's conversational preference format, PNG images) and the demo's tiny model
(`train.core.model_loading.build_tiny` with recipes/demo.yaml's `model` section, saved once). It then runs each side in its own
subprocess (`--side`), alternating, `--repeats` times, so that the sides share no memory high-water mark,
allocator or import state, and a burst of load from other programs hits one run rather than one side. Both sides
load the same saved weights and add the same peft `LoraConfig` after the same seed (the demo's `lora` section on
the language model's qkv_proj, o_proj, gate_up_proj, down_proj; tower and projector frozen, as
`train.core.trainable.dpo_parts` has it). Both train the first `(warmup + steps) x batch_size` pairs of the file in file
order, fp32 on CPU, with the demo's loss and beta, AdamW at the demo's DPO learning rate (constant, no warm-up),
gradient clipping at the demo's 1.0, and as reference the same network with the adapter disabled.

- ours: `train.core.loop.train_step` (the loop's optimizer step: forward, backward, clip, AdamW step, zero_grad) with
  `train.preference.stage_loss.DPOLoss` on batches from `RenderedDataset` + `DPOCollator`. A batch carries each image once per
  pair, and the frozen tower encodes it once for chosen, rejected, policy and reference. The LM computes each
  prompt once for both completions (`data.collate.shared_layout`: one `prompt + chosen + rejected` row per pair
  under a block mask), in the policy and in the reference pass. `--with-2b` adds a third side, ours on the 2B-row
  layout (every prompt computed twice, `DPOCollator(share_prompt=False)`), and asserts that it computes the same
  losses at every step.
- TRL: `trl.DPOTrainer(model, args=DPOConfig(...), train_dataset=..., processing_class=Phi3VProcessor,
  peft_config=LoraConfig)`. Its `DataCollatorForVisionPreference` repeats every image for chosen and rejected,
  and the policy and the reference pass each run the tower on them. What TRL needs here (`trl_config`,
  `trl_dataset`):
  - `max_length=None`: its collator cuts `input_ids` at max_length but never the images, and a cut inside an
    image breaks the forward; None truncates nothing;
  - `gradient_checkpointing=False`, `bf16=False`: TRL defaults both to True, and the demo runs fp32 without
    checkpointing;
  - `train_sampling_strategy="sequential"` (file order, as ours), `use_cpu=True`, `report_to=[]`,
    `save_strategy="no"`;
  - the `images` column holds file paths cast to `datasets.Image()`, so that rows reach the collator as PIL images.
  Token sequences differ slightly between the sides. TRL tokenises the prompt with `add_special_tokens=False`, so
  its rows lack the `<s>` that Phi-3-V puts before each text chunk (at the start and after every image). Its
  completion mask also covers the `▁ \\n` that follows `<|end|>`, which ours leaves unsupervised.

Measured per side over the timed steps (the warm-up steps run but are not counted):
- pairs/s: pairs / seconds of forward + backward + clip + optimizer step. For TRL that is a callback's
  `on_step_begin` to `on_step_end`, the same span of `Trainer._inner_training_loop`. Fetching and collating a batch
  (PNG decode, HD crops, tokenisation) happens before that span on both sides and is timed apart (data ms/step);
- CLIP calls/step, CLIP images/step, CLIP ms/step: forward calls of `model.model.vision_embed_tokens.img_processor`
  (the CLIP trunk), the crops plus global views they encode, and the seconds spent inside them, from forward hooks;
- LM tokens/step: the positions the decoder's first layer computes, summed over its passes (policy and reference):
  rows x padded length for the model's forward (SFT's loss computes the real tokens only where it can,
  models/phi3v/supervised_forward.py);
- saved MB/step: bytes of the tensors autograd keeps for backward (`torch.autograd.graph.saved_tensors_hooks`;
  one count per storage, parameters left out), i.e. the activation memory of a step whatever the allocator does;
- memory from /proc/self/status: peak RSS is the process's high-water mark over its whole life (imports, model,
  data, training); train +MB is the high-water mark during training (warm-up included) minus the resident size
  when training began. The mark is reset there through /proc/self/clear_refs. Where that is refused, the growth of
  getrusage's ru_maxrss is shown instead, which reads 0 if setup peaked higher.
The losses of the first and last step are printed as a sanity check. Both sides start at ln 2 = 0.6931: LoRA's B
starts at zero, so policy = reference.

`--width real` (shared with sft_vs_trl.py): the model has every dimension of Phi-3-vision-128k
(`models.phi3v.sizes.full_size_config`: hidden 3072, 32 heads, MLP 8192, vocab 32,064; CLIP ViT-L/14-336 at its
width: hidden 1024, 16 heads, MLP 4096, 336 px crops of 14 px patches) with fewer layers: 2 and 3 decoder layers
(each side is run at both), 2 CLIP layers built of which 1 runs (the feature layer is -2; the real tower builds 24
and runs 23). Random fp32 weights from a fixed seed, built in each side's process (the same weights on both sides);
the synthetic data's tokenizer (its ids fit the 32,064 rows). Both sides: the chartqa recipe's LoRA (r 64, alpha 128,
on qkv_proj, o_proj, gate_up_proj, down_proj; dropout 0, so that neither side draws random masks), gradient
checkpointing on (non-reentrant, transformers' default, on both sides), num_crops 1 (one 336 px crop and the
global view per image: 313 image tokens), max_length 4096. Defaults at real width: 1 warm-up + 3 timed steps of 2
pairs (SFT: 2 samples), 3 repeats; each repeat runs ours and TRL at 2 layers, then at 3.

Projection to the real depth (`project_to_full_depth`), per side and per repeat: the difference of the steps at 3 and
2 decoder layers is one more layer's cost (its forward, its recomputation and its backward, on that side's tokens),
so s(32) = s(2) + 30 x [s(3) - s(2)], plus the CLIP tower at its real depth: the step's measured CLIP seconds times
(f - 1), f being the project's FLOP model's CLIP forward at 23 layers over the one that ran
(benchmarks/train_step.py `vision_forward_flops`: patch convolution + layers; about 22). What does not grow with
depth (embedding, the LM head and the loss, the optimizer, data) stays as measured. The projected ratio is the
median of the repeats' TRL s(32) / ours s(32), with min-max. Per-phase columns show where the step goes: CLIP,
the decoder layers' calls (forward, and under checkpointing the recomputation: each layer's first norm to its
MLP), the LM head's module calls (TRL's DPO and SFT compute their logits through the model's forward at every
position: its loss reads them), and the rest (mostly the backward).

Clocks: each step is timed in wall seconds and in the process's CPU seconds (`time.process_time`, user + system of
all its threads: one torch thread here). On a machine that other programs load, wall time also counts the time the
side waited for a core; CPU time does not (it still feels shared caches and memory bandwidth). Both are reported,
paired, and projected; the phase columns (decoder layers, LM head) are CPU milliseconds. Under DDP a rank's CPU
time leaves out its waits in the all-reduce: read the wall figures there.

`--depths 2` (a comma list) times only the depths given: the DDP runs below time 2 layers only, and the projection
is printed when both of REAL_DEPTHS were timed.

`--processes 2`: each side runs as 2 processes over gloo (accelerate's launcher, `--multi_gpu` with
ACCELERATE_USE_CPU, one torch thread each), DDP, each process `--batch-size` pairs a step (batch i of the file order
to rank i % 2, as accelerate's prepared DataLoader hands a Trainer's ranks their batches); the per-step figures are
rank 0's (pairs/s counts both ranks' pairs).

Each side runs single-threaded by default (`--threads 1`). On a 2-core machine that other programs keep busy, two
OpenMP threads per side stall at every parallel region whenever one thread is descheduled. At 2 threads, with
other jobs holding the load average near 6, a step of 16 pairs took 2.7 s on both sides. At 1 thread it took
0.15-0.26 s, and repeated runs of one side still differed by up to 20 %. Hence the alternating repeats (5 by
default): the table shows each side's medians, and the speed-up is the median (with min-max) of the ratios of runs
made back to back (paired), which a burst of load shifts for one pair only. `--threads 0` leaves torch's default.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata as metadata
import json
import os
import platform
import re
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(
    0, str(REPO)
)  # this checkout's packages, also when another checkout is installed in editable mode

import torch  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

RECIPE = REPO / "recipes" / "demo.yaml"
SIDES = ("ours", "trl", "ours-2b")
LABELS = {"ours": "ours", "trl": "TRL", "ours-2b": "ours 2B-row"}
SEED = 0  # the synthetic data's seed, as data.loaders.concrete writes the demo's
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "TQDM_DISABLE": "1",
}


# ------------------------------------------------------------------------------------------------ measuring


class ResidentMemory:
    """Resident set size from /proc/self/status (kB), with the high-water mark resettable where Linux allows."""

    def __init__(self):
        self.start_kb = self._status_kb("VmRSS")
        self.reset_ok = self._reset_peak()
        self.start_maxrss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux

    @staticmethod
    def _status_kb(key: str) -> int:
        match = re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
        assert match, f"/proc/self/status has no {key}"
        return int(match.group(1))

    @staticmethod
    def _reset_peak() -> bool:
        # "5" resets VmHWM to the current RSS (Linux >= 4.0, proc(5)); a sandbox may refuse the write.
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            return False
        return True

    def growth_mb(self) -> float:
        """MB the high-water mark rose above the resident size at construction."""
        if self.reset_ok:
            return (self._status_kb("VmHWM") - self.start_kb) / 1024
        return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - self.start_maxrss_kb) / 1024


def lifetime_peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def trainable_fingerprint(model) -> str:
    """Count, elements and float64 sum of the trainable tensors: equal on both sides iff LoRA starts the same."""
    params = [p for p in model.parameters() if p.requires_grad]
    total = sum(float(p.detach().double().sum()) for p in params)
    return f"{len(params)} tensors, {sum(p.numel() for p in params)} values, sum {total:.12g}"


class StepMeter:
    """Per optimizer step: CLIP trunk calls, the crops they encode and the seconds they take, decoder tokens, and
    the bytes of the tensors autograd keeps for backward (activations; the parameters it also references are not
    counted)."""

    def __init__(self, model):
        backbone = model.model  # hooked on the Phi3VForCausalLM itself, before peft wraps it
        clip = backbone.vision_embed_tokens.img_processor
        clip.register_forward_pre_hook(self._on_clip_start)
        clip.register_forward_hook(self._on_clip_end)
        # On the first layer's norm, which every path calls: SFT's loss runs the layer's parts on the real tokens.
        backbone.layers[0].input_layernorm.register_forward_pre_hook(self._on_decoder)
        # Phases: each decoder layer's call from its first norm to its MLP (a recomputation under gradient
        # checkpointing is a call too: it runs whole before that layer's backward), and the LM head's calls.
        for layer in backbone.layers:
            layer.input_layernorm.register_forward_pre_hook(self._on_layer_start)
            layer.mlp.register_forward_hook(self._on_layer_end)
        self._layers = list(backbone.layers)
        model.lm_head.register_forward_pre_hook(self._on_head_start)
        model.lm_head.register_forward_hook(self._on_head_end)
        self._saving = None
        self._clip_started = self._clip_cpu_started = self._layer_started = self._head_started = 0.0
        self._reset()

    def _reset(self) -> None:
        self.clip_calls = self.clip_images = self.lm_tokens = 0
        self.clip_seconds = self.clip_cpu_seconds = self.decoder_seconds = self.head_seconds = 0.0
        self.saved_bytes: dict[int, int] = {}  # storage address -> bytes: views of one storage count once

    def _on_clip_start(self, _module, args) -> None:
        self.clip_calls += 1
        self.clip_images += int(args[0].shape[0])  # (global views + crops, 3, S, S)
        self._clip_started = time.perf_counter()
        self._clip_cpu_started = time.process_time()

    def _on_clip_end(self, _module, _args, _output) -> None:
        self.clip_seconds += time.perf_counter() - self._clip_started
        self.clip_cpu_seconds += time.process_time() - self._clip_cpu_started

    # The decoder's and the head's phases in CPU seconds of this process: what another program's load changes least.
    def _on_layer_start(self, _module, _args) -> None:
        self._layer_started = time.process_time()

    def _on_layer_end(self, _module, _args, _output) -> None:
        self.decoder_seconds += time.process_time() - self._layer_started

    def _on_head_start(self, _module, _args) -> None:
        self._head_started = time.process_time()

    def _on_head_end(self, _module, _args, _output) -> None:
        self.head_seconds += time.process_time() - self._head_started

    def _on_decoder(self, _module, args) -> None:
        self.lm_tokens += int(args[0].shape[:-1].numel())  # (rows, padded length, hidden) or (tokens, hidden)

    def _on_save(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in self._parameter_storages:
            self.saved_bytes[storage.data_ptr()] = storage.nbytes()
        return tensor

    def begin(self, model) -> None:
        self._reset()
        self._parameter_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self._saving = torch.autograd.graph.saved_tensors_hooks(self._on_save, lambda tensor: tensor)
        self._saving.__enter__()

    def end(self) -> dict:
        self._saving.__exit__(None, None, None)
        return {
            "clip_calls": self.clip_calls,
            "clip_images": self.clip_images,
            "clip_seconds": self.clip_seconds,
            "clip_cpu_seconds": self.clip_cpu_seconds,
            "decoder_seconds": self.decoder_seconds,
            "head_seconds": self.head_seconds,
            # Whether every decoder layer was set to checkpoint itself during the step (what the trainer enabled).
            "checkpointing": all(getattr(layer, "gradient_checkpointing", False) for layer in self._layers),
            "lm_tokens": self.lm_tokens,
            "saved_mb": sum(self.saved_bytes.values()) / 2**20,
        }


# ------------------------------------------------------------------------------------------------ shared setup


# --width real: every dimension of Phi-3-vision-128k (models.phi3v.sizes: hidden 3072, 32 heads, MLP 8192, vocab
# 32,064; CLIP ViT-L/14-336: hidden 1024, 16 heads, MLP 4096, 336 px crops of 14 px patches), fewer layers, the
# chartqa recipe's LoRA (r 64, alpha 128, the same targets; dropout 0 so both sides draw no random masks) and
# gradient checkpointing on. Set in each side's process by `configure_width`.
REAL_DEPTHS = (2, 3)  # decoder layers: each side is timed at both (the difference is one layer's cost)
REAL_VISION_LAYERS = (
    2  # CLIP layers built; the feature layer is -2, so 1 runs (the real tower: 24 built, 23 run)
)
REAL_NUM_CROPS = 1  # one 336 px crop + the global view per image: 313 image tokens
REAL_FULL_DEPTH = 32
WIDTH = {"width": "tiny", "depth": None}


def configure_width(width: str, depth: int | None) -> None:
    WIDTH.update(width=width, depth=depth)


def load_demo_recipe():
    """The demo recipe (DPO's sigmoid loss without the RPO term); at real width with the real run's LoRA, gradient
    checkpointing, max_length and the crop count above."""
    from config import load_recipe

    recipe = load_recipe(RECIPE)
    # The sigmoid loss alone on both sides: the demo adds RPO's NLL term (dpo.sft_weight), which TRL's side does
    # not compute.
    recipe = replace(recipe, dpo=replace(recipe.dpo, sft_weight=0.0))
    if WIDTH["width"] != "real":
        return recipe
    return replace(
        recipe,
        model=replace(recipe.model, gradient_checkpointing=True, num_crops=REAL_NUM_CROPS),
        lora=replace(recipe.lora, r=64, alpha=128, dropout=0.0),
        data=replace(recipe.data, max_length=4096),  # chartqa's: 313 image slots exceed the demo's 256
    )


def real_width_config(tokenizer, depth: int, vision_layers: int = REAL_VISION_LAYERS):
    """Phi-3-vision-128k's config (`full_size_config`) cut to `depth` decoder and `vision_layers` CLIP layers, with
    the special token ids of the benchmark's tokenizer (the synthetic data's; its ids sit below 32,064)."""
    from models.phi3v.sizes import full_size_config
    from models.phi3v.tiny import tiny_config

    ids = tiny_config(tokenizer)
    config = full_size_config(
        "phi3v",
        num_hidden_layers=depth,
        bos_token_id=ids.bos_token_id,
        eos_token_id=ids.eos_token_id,
        pad_token_id=ids.pad_token_id,
        image_token_id=ids.image_token_id,
        end_token_ids=ids.end_token_ids,
    )
    config.img_processor = {**config.img_processor, "vision_config": {"num_hidden_layers": vision_layers}}
    config._attn_implementation = "sdpa"
    return config


def prepare_base(workdir: Path, recipe) -> None:
    """The tiny base model (saved once; both sides load this copy), or at real width the processor only (336 px
    crops, `REAL_NUM_CROPS`): each side builds the real-width model from its config and a fixed seed."""
    from train.core.model_loading import build_tiny

    model, processor = build_tiny(recipe.model, recipe.seed)
    if WIDTH["width"] == "real":
        from models.phi3v import Phi3VImageProcessor, Phi3VProcessor

        image_processor = Phi3VImageProcessor(num_crops=REAL_NUM_CROPS, crop_size=336, patch_size=14)
        Phi3VProcessor(image_processor, processor.tokenizer).save_pretrained(workdir / "base")
        return
    model.save_pretrained(workdir / "base")
    processor.save_pretrained(workdir / "base")


def prepare_workdir(workdir: Path, num_pairs: int) -> None:
    """The synthetic preference pairs and the base model (`prepare_base`)."""
    from data.synthetic import write_synthetic

    # Only the training preference pairs are read.
    write_synthetic(
        workdir / "synthetic", seed=SEED, n_train=0, n_eval=0, n_pref_train=num_pairs, n_pref_eval=0
    )
    prepare_base(workdir, load_demo_recipe())


def load_base(workdir: Path, recipe):
    import models

    if WIDTH["width"] != "real":
        return models.load(
            str(workdir / "base"),
            dtype=recipe.model.dtype,
            attn_implementation=recipe.model.attn_implementation,
            num_crops=recipe.model.num_crops,
        )
    from models.phi3v import Phi3VForCausalLM, Phi3VProcessor

    processor = Phi3VProcessor.from_pretrained(str(workdir / "base"))
    torch.manual_seed(SEED)  # the same random weights on both sides and in every run
    model = Phi3VForCausalLM(real_width_config(processor.tokenizer, WIDTH["depth"]))
    return model.float(), processor


def rank_and_world() -> tuple[int, int]:
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def rank_batches(count: int, batch_size: int) -> list[list[int]]:
    """This process's `count` batches of row indices: file order, batch i of the run going to rank i % world (what
    accelerate's prepared DataLoader hands each rank of a Trainer)."""
    rank, world = rank_and_world()
    return [list(range(b * batch_size, (b + 1) * batch_size)) for b in range(rank, count * world, world)]


def lora_config(model, recipe):
    """The LoraConfig `train.core.trainable.configure_trainable` builds for the DPO stage's parts (LM only here)."""
    from peft import LoraConfig

    from train.core.trainable import dpo_parts, lora_target_regex

    lora = recipe.lora
    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        use_rslora=lora.use_rslora,
        use_dora=lora.use_dora,
        target_modules=lora_target_regex(model, dpo_parts(recipe.model), lora),
        task_type="CAUSAL_LM",
    )


def dpo_lr(recipe) -> float:
    return recipe.dpo.lr or recipe.train.lr


# ------------------------------------------------------------------------------------------------ ours


def run_ours(workdir: Path, steps: int, warmup: int, batch_size: int, share_prompt: bool = True) -> dict:
    from accelerate.utils import set_seed
    from torch.utils.data import DataLoader

    from config import Source
    from data.collate import DPOCollator, RenderedDataset
    from data.loaders import load_samples, plan
    from data.sources import SkipCounter
    from train.core import device, optim
    from train.core.trainable import configure_trainable, dpo_parts, parameter_groups, upcast_trainable_
    from train.preference.stage_loss import DPOLoss, count_pairs

    recipe = load_demo_recipe()
    total = warmup + steps
    rows = total * batch_size * rank_and_world()[1]  # every rank's batches (rank_batches picks this one's)
    source = Source(
        format="trl_preference",
        path=str(workdir / "synthetic" / "pref_train.jsonl"),
        image_root=str(workdir / "synthetic"),
        limit=rows,
    )
    data = replace(recipe.data, train=(source,), num_workers=0)
    accelerator = device.make_accelerator(
        recipe, workdir / "ours_run", grad_accum=1
    )  # seeds like train.dpo.main
    model, processor = load_base(workdir, recipe)
    meter = StepMeter(model)
    skips = SkipCounter()
    samples = load_samples(
        data.train, "dpo", data, seed=recipe.seed, skips=skips, main_first=accelerator.main_process_first
    )
    planned = plan(samples, processor, data, skips)
    if len(planned) != rows:
        raise RuntimeError(f"ours: {len(planned)} pairs planned, {rows} needed:\n{skips.summary()}")
    # File order in batches of batch_size, as TRL's sequential sampler gives them (each rank its share).
    loader = DataLoader(
        RenderedDataset(planned, processor),
        batch_sampler=rank_batches(total, batch_size),
        num_workers=0,
        collate_fn=DPOCollator(pad_token_id=processor.tokenizer.pad_token_id, share_prompt=share_prompt),
    )

    parts = dpo_parts(recipe.model)
    set_seed(recipe.seed)  # as DPOTrainer does right before it adds the adapter: the same LoRA initialisation
    model = configure_trainable(model, parts, recipe.lora)
    fingerprint = trainable_fingerprint(model)
    upcast_trainable_(model)
    train_section = replace(recipe.train, scheduler="constant", warmup_steps=0)
    optimizer = optim.make_optimizer(
        parameter_groups(model, train_section), train_section, lr_scale=dpo_lr(recipe) / recipe.train.lr
    )
    scheduler = optim.make_scheduler(optimizer, train_section, total)
    model, optimizer = device.prepare(accelerator, model, optimizer, batch_size)
    loss_fn = DPOLoss(recipe, accelerator, share_features=parts.vision != "lora")
    return time_our_steps(
        accelerator,
        model,
        optimizer,
        scheduler,
        loader,
        loss_fn,
        count_pairs,
        total=total,
        max_grad_norm=recipe.train.max_grad_norm,
        meter=meter,
        fingerprint=fingerprint,
    )


def time_our_steps(
    accelerator,
    model,
    optimizer,
    scheduler,
    loader,
    loss_fn,
    count,
    *,
    total: int,
    max_grad_norm: float | None,
    meter,
    fingerprint,
    extra=None,
) -> dict:
    """Our side's timed loop, shared with sft_vs_trl.py: `total` optimizer steps of one micro-batch each through the
    loop's own `train_step`, the data fetch timed apart; `extra(record)` adds per-step fields."""
    from train.core import device
    from train.core.loop import LoopConfig, train_step

    config = LoopConfig(
        total_steps=total, grad_accum=1, max_grad_norm=max_grad_norm, log_every=1, checkpoint_every=total
    )

    def loss_on_device(model_, batch):
        return loss_fn(model_, device.to_device(batch, accelerator.device))

    model.train()
    memory = ResidentMemory()
    records, batches = [], iter(loader)
    for _ in range(total):
        fetched = time.perf_counter()
        batch = next(batches)
        meter.begin(model)
        started, cpu_started = time.perf_counter(), time.process_time()
        record = train_step(accelerator, model, optimizer, scheduler, [batch], loss_on_device, count, config)
        ended = time.perf_counter()
        records.append(
            {
                "seconds": ended - started,
                "cpu_seconds": time.process_time() - cpu_started,
                "data_seconds": started - fetched,
                "loss": record["loss"],
                **(extra(record) if extra else {}),
                **meter.end(),
            }
        )
    return {
        "steps": records,
        "train_growth_mb": memory.growth_mb(),
        "peak_reset": memory.reset_ok,
        "initial_trainable": fingerprint,
    }


# ------------------------------------------------------------------------------------------------ TRL


def trl_dataset(workdir: Path, num_pairs: int):
    """The first `num_pairs` rows of pref_train.jsonl as a datasets.Dataset whose `images` decode to PIL."""
    from datasets import Dataset, Image, List

    root = workdir / "synthetic"
    with open(root / "pref_train.jsonl", encoding="utf-8") as stream:
        rows = [json.loads(line) for _, line in zip(range(num_pairs), stream)]
    for row in rows:
        row["images"] = [str(root / path) for path in row["images"]]
    return Dataset.from_list(rows).cast_column("images", List(Image()))


def trl_trainer_args(workdir: Path, recipe, steps: int, batch_size: int) -> dict:
    """The trainer arguments TRL's side takes in both benchmarks (this one and sft_vs_trl.py): our recipe's optimizer,
    clipping and checkpointing, a constant learning rate, fp32 on CPU, the batches in file order, no saving."""
    train = recipe.train
    return dict(
        output_dir=str(workdir / "trl_run"),
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=1,
        max_steps=steps,
        lr_scheduler_type="constant",
        weight_decay=train.weight_decay,
        adam_beta1=train.adam_betas[0],
        adam_beta2=train.adam_betas[1],
        adam_epsilon=train.adam_eps,
        max_grad_norm=train.max_grad_norm or 0.0,
        max_length=None,  # the vision collator would cut input_ids but not the images
        gradient_checkpointing=recipe.model.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},  # what ours uses (transformers' default)
        bf16=False,
        fp16=False,
        use_cpu=True,
        train_sampling_strategy="sequential",
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
        seed=recipe.seed,
        report_to=[],
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
    )


def trl_config(workdir: Path, recipe, steps: int, batch_size: int):
    from trl import DPOConfig

    return DPOConfig(
        **trl_trainer_args(workdir, recipe, steps, batch_size),
        learning_rate=dpo_lr(recipe),
        beta=recipe.dpo.beta,
        loss_type=[loss.type for loss in recipe.dpo.losses],
        loss_weights=[loss.weight for loss in recipe.dpo.losses],
    )


class TrlStepRecorder(TrainerCallback):
    """Per optimizer step of a `Trainer`: the seconds from on_step_begin to on_step_end, the seconds its batch
    fetch took just before, and the StepMeter counts; the trainable weights' fingerprint and memory at the start."""

    def __init__(self, meter: StepMeter):
        self.meter = meter
        self.records: list[dict] = []
        self.fetch_seconds = 0.0

    def time_fetches(self, trainer) -> None:
        # Trainer fetches and collates a step's batches in get_batch_samples, before on_step_begin.
        fetch = trainer.get_batch_samples

        def timed_fetch(*args, **kwargs):
            started = time.perf_counter()
            result = fetch(*args, **kwargs)
            self.fetch_seconds = time.perf_counter() - started
            return result

        trainer.get_batch_samples = timed_fetch

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.fingerprint = trainable_fingerprint(model)
        self.memory = ResidentMemory()

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.meter.begin(model)
        self.started, self.cpu_started = time.perf_counter(), time.process_time()

    def on_step_end(self, args, state, control, **kwargs):
        seconds = time.perf_counter() - self.started
        self.records.append(
            {
                "seconds": seconds,
                "cpu_seconds": time.process_time() - self.cpu_started,
                "data_seconds": self.fetch_seconds,
                **self.meter.end(),
            }
        )


def run_trl(workdir: Path, steps: int, warmup: int, batch_size: int) -> dict:
    from trl import DPOTrainer

    recipe = load_demo_recipe()
    total = warmup + steps
    model, processor = load_base(workdir, recipe)
    recorder = TrlStepRecorder(StepMeter(model))
    trainer = DPOTrainer(
        model=model,
        args=trl_config(workdir, recipe, total, batch_size),
        train_dataset=trl_dataset(workdir, total * batch_size * rank_and_world()[1]),
        processing_class=processor,
        peft_config=lora_config(model, recipe),
    )
    recorder.time_fetches(trainer)
    trainer.add_callback(recorder)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]  # logging_steps=1
    if len(losses) != len(recorder.records):
        raise RuntimeError(f"trl: {len(losses)} logged losses for {len(recorder.records)} steps")
    return trl_result(recorder, losses)


def trl_result(recorder: TrlStepRecorder, losses: list[float]) -> dict:
    """The TRL side's result: its recorded steps, each with its loss."""
    for record, loss in zip(recorder.records, losses):
        record["loss"] = loss
    return {
        "steps": recorder.records,
        "train_growth_mb": recorder.memory.growth_mb(),
        "peak_reset": recorder.memory.reset_ok,
        "initial_trainable": recorder.fingerprint,
    }


# ------------------------------------------------------------------------------------------------ one side


def write_result(workdir: Path, side: str, result: dict) -> None:
    """What a side's subprocess hands its parent: the result, with the process's peak memory and threads (under
    DDP, rank 0's)."""
    if rank_and_world()[0] != 0:
        return
    result.update(side=side, lifetime_peak_mb=lifetime_peak_mb(), torch_threads=torch.get_num_threads())
    (workdir / f"{side}.json").write_text(json.dumps(result, indent=1) + "\n")


def run_side(
    side: str, workdir: Path, steps: int, warmup: int, batch_size: int, threads: int, width: str, depth
) -> None:
    if threads:
        torch.set_num_threads(threads)
    configure_width(width, depth)
    if side == "trl":
        result = run_trl(workdir, steps, warmup, batch_size)
    else:
        result = run_ours(workdir, steps, warmup, batch_size, share_prompt=side == "ours")
    write_result(workdir, side, result)


# ------------------------------------------------------------------------------------------------ the parent


@dataclass(frozen=True, kw_only=True)
class SideSummary:
    pairs_per_s: float
    pairs_per_cpu_s: float
    seconds_per_step: float
    cpu_seconds_per_step: float
    data_ms_per_step: float
    clip_calls: float
    clip_images: float
    clip_ms: float
    clip_cpu_ms: float
    decoder_ms: float
    head_ms: float
    lm_tokens: float
    saved_mb: float
    peak_mb: float
    train_growth_mb: float
    first_loss: float
    last_loss: float


def summarise(result: dict, warmup: int, batch_size: int) -> SideSummary:
    timed = result["steps"][warmup:]
    seconds = sum(step["seconds"] for step in timed)
    cpu_seconds = sum(step["cpu_seconds"] for step in timed)

    def mean(key: str) -> float:
        return sum(step[key] for step in timed) / len(timed)

    return SideSummary(
        pairs_per_s=batch_size * len(timed) / seconds,
        pairs_per_cpu_s=batch_size * len(timed) / cpu_seconds,
        seconds_per_step=seconds / len(timed),
        cpu_seconds_per_step=cpu_seconds / len(timed),
        data_ms_per_step=1000 * mean("data_seconds"),
        clip_calls=mean("clip_calls"),
        clip_images=mean("clip_images"),
        clip_ms=1000 * mean("clip_seconds"),
        clip_cpu_ms=1000 * mean("clip_cpu_seconds"),
        decoder_ms=1000 * mean("decoder_seconds"),
        head_ms=1000 * mean("head_seconds"),
        lm_tokens=mean("lm_tokens"),
        saved_mb=mean("saved_mb"),
        peak_mb=result["lifetime_peak_mb"],
        train_growth_mb=result["train_growth_mb"],
        first_loss=result["steps"][0]["loss"],
        last_loss=result["steps"][-1]["loss"],
    )


def spawn_side(
    side: str, workdir: Path, args: argparse.Namespace, script: Path = Path(__file__)
) -> tuple[dict | None, str]:
    """(result, '') or (None, the tail of the failed subprocess's output) of `script --side side` (this benchmark,
    or another built like it). `args.processes` > 1: the side runs in that many CPU processes over gloo (DDP), through
    accelerate's launcher as tests/run_helpers.py launches them; rank 0 writes the result. `args.width` 'real':
    the side builds the real-width model at `args.depth` decoder layers."""
    side_args = [
        "--side",
        side,
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
    if getattr(args, "width", "tiny") == "real":
        side_args += ["--width", "real", "--depth", str(args.depth)]
    processes = getattr(args, "processes", 1)
    launcher = [sys.executable]
    if processes > 1:
        launcher += [
            "-m",
            "accelerate.commands.launch",
            "--num_processes",
            str(processes),
            "--num_machines",
            "1",
            "--multi_gpu",
            "--mixed_precision",
            "no",
            "--main_process_port",
            str(29500 + os.getpid() % 1000),
        ]
    command = [*launcher, str(script.resolve()), *side_args]
    env = {
        **os.environ,
        **OFFLINE_ENV,
        **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {}),
        **({"ACCELERATE_USE_CPU": "1"} if processes > 1 else {}),
        "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]),
    }
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        return None, (done.stdout + done.stderr)[-4000:]
    return json.loads((workdir / f"{side}.json").read_text()), ""


def versions() -> str:
    # From the installed metadata: importing trl here would only slow the parent down.
    packages = ("torch", "transformers", "trl", "peft", "accelerate", "datasets")
    return f"python {platform.python_version()}, " + ", ".join(
        f"{name} {metadata.version(name)}" for name in packages
    )


def print_machine(title: str, args: argparse.Namespace) -> None:
    """The header lines every benchmark built like this one starts with: what, when, the command, machine, versions
    and load."""
    now = datetime.datetime.now(datetime.timezone.utc)
    cpus = os.cpu_count()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cpus
    threads = args.threads or f"torch's default ({torch.get_num_threads()})"
    print(f"# {title}, {now:%Y-%m-%d %H:%M} UTC")
    print(f"command: {shlex.join([sys.executable, *sys.argv])}  (cwd {Path.cwd()})")
    print(
        f"machine: {platform.platform()}, {platform.machine()}, {cpus} CPUs ({usable} usable); torch threads "
        f"per side: {threads}"
    )
    print(f"versions: {versions()}")
    print("load average at start (1/5/15 min): " + "/".join(f"{x:.2f}" for x in os.getloadavg()))


def print_header(args: argparse.Namespace, recipe) -> None:
    from models.phi3v.tiny import DEMO_MODEL as TINY_MODEL

    lora = recipe.lora
    print_machine("DPO steps, ours vs TRL DPOTrainer", args)
    print(
        f"model: {model_description(args, TINY_MODEL)}, {recipe.model.dtype}, {recipe.model.attn_implementation}, "
        f"num_crops {recipe.model.num_crops}; LoRA r {lora.r}, alpha {lora.alpha}, dropout {lora.dropout} on the "
        f"LM's {', '.join(lora.target_modules)}; tower and projector frozen; gradient checkpointing "
        f"{'on' if recipe.model.gradient_checkpointing else 'off'}; {args.processes} process(es) per side"
    )
    print(
        f"run: {args.warmup} warm-up + {args.steps} timed steps of {args.batch_size} pairs per process, the first "
        f"{(args.warmup + args.steps) * args.batch_size * args.processes} synthetic pairs in file order; "
        f"{'+'.join(loss.type for loss in recipe.dpo.losses)} loss, beta {recipe.dpo.beta}, AdamW lr "
        f"{dpo_lr(recipe):g} constant, clip {recipe.train.max_grad_norm}; {args.repeats} run(s) per side, "
        f"alternating (ours first), each in a fresh subprocess; medians per side and paired ratios"
    )


COLUMNS = (
    ("pairs/s", "pairs_per_s", "{:.4g}"),
    ("s/step", "seconds_per_step", "{:.3f}"),
    ("CPU s/step", "cpu_seconds_per_step", "{:.3f}"),
    ("data ms/step", "data_ms_per_step", "{:.0f}"),
    ("CLIP calls/step", "clip_calls", "{:.1f}"),
    ("CLIP images/step", "clip_images", "{:.0f}"),
    ("CLIP ms/step", "clip_ms", "{:.1f}"),
    ("layers CPU ms", "decoder_ms", "{:.0f}"),
    ("head CPU ms", "head_ms", "{:.0f}"),
    ("LM tokens/step", "lm_tokens", "{:.0f}"),
    ("saved MB/step", "saved_mb", "{:.1f}"),
    ("peak RSS MB", "peak_mb", "{:.0f}"),
    ("train +MB", "train_growth_mb", "{:.0f}"),
)


def print_table(summaries: dict[str, SideSummary | None]) -> None:
    widths = [max(len(title), 8) for title, _, _ in COLUMNS]
    print(
        f"{'side':<9}"
        + " ".join(f"{title:>{w}}" for (title, _, _), w in zip(COLUMNS, widths))
        + "  loss first/last"
    )
    for side, summary in summaries.items():
        if summary is None:
            print(f"{side:<9} failed (its output is below)")
            continue
        cells = [fmt.format(getattr(summary, key)) for _, key, fmt in COLUMNS]
        print(
            f"{side:<9}"
            + " ".join(f"{c:>{w}}" for c, w in zip(cells, widths))
            + f"  {summary.first_loss:.4f}/{summary.last_loss:.4f}"
        )
    ours, theirs = summaries.get("ours"), summaries.get("TRL")
    if ours and theirs:
        ratios = [
            getattr(ours, key) / getattr(theirs, key) if getattr(theirs, key) else float("nan")
            for _, key, _ in COLUMNS
        ]
        print(f"{'ours/TRL':<9}" + " ".join(f"{r:>{w - 1}.2f}x" for r, w in zip(ratios, widths)))


def print_fingerprints(fingerprints: dict[str, set[str]]) -> None:
    seen = set().union(*fingerprints.values())
    if len(seen) == 1:
        print(f"initial trainable weights: identical in every run of both sides ({seen.pop()})")
    else:
        print(
            "initial trainable weights DIFFER: "
            + "; ".join(f"{label}: {sorted(values)}" for label, values in fingerprints.items())
        )


def paired_ratios(ours: list[float], theirs: list[float], unit: str, names: str = "ours/TRL") -> str:
    """The ratio of each pair of runs (run i of one side against run i of the other, run back to back), as median
    and min-max, with each side's median: a burst of load from other programs hits one pair, not one side."""
    ratios = [a / b for a, b in zip(ours, theirs)]
    return (
        f"{names} {unit}: paired median {statistics.median(ratios):.2f}x (min {min(ratios):.2f}x, max "
        f"{max(ratios):.2f}x) over {len(ratios)} pairs [" + ", ".join(f"{r:.2f}" for r in ratios) + "]; "
        f"medians {statistics.median(ours):.4g} vs {statistics.median(theirs):.4g} {unit}"
    )


def median_summary(summaries: list[SideSummary]) -> SideSummary:
    """Each column's median over a side's runs (losses: the first run's; they are equal across runs)."""
    fields = {
        key: statistics.median(getattr(s, key) for s in summaries)
        for key in SideSummary.__dataclass_fields__
        if key not in ("first_loss", "last_loss")
    }
    return SideSummary(**fields, first_loss=summaries[0].first_loss, last_loss=summaries[0].last_loss)


def check_same_losses(a: list[float], b: list[float], rtol: float, what: str) -> float:
    worst = max(abs(x - y) / abs(y) for x, y in zip(a, b))
    if len(a) != len(b) or worst > rtol:
        raise AssertionError(f"{what}: losses differ (largest relative gap {worst:.1e} > {rtol:.0e})")
    return worst


def run_both(args: argparse.Namespace) -> None:
    import transformers

    transformers.logging.set_verbosity_error()  # build_tiny's config notes and save progress bars
    transformers.logging.disable_progress_bar()
    configure_width(args.width, None)
    recipe = load_demo_recipe()
    print_header(args, recipe)
    sides = ["ours", "trl"] + (["ours-2b"] if args.with_2b else [])
    # Keyed by decoder depth (None: the tiny model), then by side label; one entry per repeat.
    runs: dict = {d: {LABELS[side]: [] for side in sides} for d in depths(args)}
    losses: dict = {d: {LABELS[side]: [] for side in sides} for d in depths(args)}
    fingerprints: dict = {d: {LABELS[side]: set() for side in sides} for d in depths(args)}
    checkpointing: dict = {LABELS[side]: set() for side in sides}
    with tempfile.TemporaryDirectory(prefix="dpo_vs_trl-") as tmp:
        workdir = Path(tmp)
        prepare_workdir(workdir, (args.warmup + args.steps) * args.batch_size * args.processes)
        for repeat in range(args.repeats):
            for depth in depths(args):
                for side in sides:
                    label = LABELS[side]
                    where = "" if depth is None else f" at {depth} layers"
                    started = time.perf_counter()
                    result, failure = spawn_side(side, workdir, with_depth(args, depth))
                    if result is None:
                        print(
                            f"run {repeat + 1} {label}{where}: failed after {time.perf_counter() - started:.0f} s; "
                            f"the tail of its output:\n{failure}"
                        )
                        sys.exit(1)
                    runs[depth][label].append(
                        summarise(result, args.warmup, args.batch_size * args.processes)
                    )
                    losses[depth][label].append([step["loss"] for step in result["steps"]])
                    checkpointing[label].update(step["checkpointing"] for step in result["steps"])
                    fingerprints[depth][label].add(result["initial_trainable"])
                    print(
                        f"run {repeat + 1} {label}{where}: {runs[depth][label][-1].pairs_per_s:.4g} pairs/s, "
                        f"subprocess {time.perf_counter() - started:.0f} s; memory high-water mark reset: "
                        f"{result['peak_reset']}; load average now {os.getloadavg()[0]:.2f}",
                        flush=True,
                    )
    print_checkpointing(checkpointing)
    for depth in depths(args):
        if depth is not None:
            print(f"## {depth} decoder layers")
        report_depth(args, runs[depth], losses[depth], fingerprints[depth])
    if projects(args):
        sides = ("ours", "TRL")
        for clock, step_key, clip_key in (
            ("wall", "seconds_per_step", "clip_ms"),
            ("CPU", "cpu_seconds_per_step", "clip_cpu_ms"),
        ):
            print_projection(
                {
                    side: {d: [getattr(r, step_key) for r in runs[d][side]] for d in REAL_DEPTHS}
                    for side in sides
                },
                {
                    side: {d: [getattr(r, clip_key) / 1000 for r in runs[d][side]] for d in REAL_DEPTHS}
                    for side in sides
                },
                args.batch_size * args.processes,
                "pairs/s",
                clock,
            )


def print_checkpointing(checkpointing: dict[str, set]) -> None:
    """Whether each side's decoder layers checkpointed themselves in its timed and warm-up steps (every step alike)."""
    print(
        "gradient checkpointing set on every decoder layer, per side over all steps: "
        + ", ".join(
            f"{label} {'yes' if flags == {True} else 'no' if flags == {False} else 'mixed' if flags else 'n/a'}"
            for label, flags in checkpointing.items()
        )
    )


def report_depth(args, runs: dict, losses: dict, fingerprints: dict) -> None:
    """One model's runs: fingerprints, losses, the table and the paired ratios."""
    print_fingerprints(fingerprints)
    for label, side_losses in losses.items():  # every run of a side computes the same losses
        for other in side_losses[1:]:
            check_same_losses(other, side_losses[0], 1e-6, f"{label}, two runs")
    if args.with_2b:
        worst = check_same_losses(
            losses["ours"][0], losses["ours 2B-row"][0], args.loss_rtol, "ours (shared prompt) vs ours 2B-row"
        )
        print(
            f"losses, shared prompt vs 2B-row layout: equal at every step (largest relative gap {worst:.1e}, "
            f"allowed {args.loss_rtol:.0e})"
        )
    print("medians over the runs of each side:")
    print_table(
        {label: median_summary(summaries) for label, summaries in runs.items() if label != "ours 2B-row"}
    )
    print(
        paired_ratios([s.pairs_per_s for s in runs["ours"]], [s.pairs_per_s for s in runs["TRL"]], "pairs/s")
    )
    print(
        paired_ratios(
            [s.pairs_per_cpu_s for s in runs["ours"]],
            [s.pairs_per_cpu_s for s in runs["TRL"]],
            "pairs/CPU-s",
            names="ours/TRL (process CPU time)",
        )
    )
    if args.with_2b:
        print(
            paired_ratios(
                [s.pairs_per_s for s in runs["ours"]],
                [s.pairs_per_s for s in runs["ours 2B-row"]],
                "pairs/s",
                names="ours/ours 2B-row",
            )
        )
        print(
            paired_ratios(
                [s.pairs_per_s for s in runs["ours 2B-row"]],
                [s.pairs_per_s for s in runs["TRL"]],
                "pairs/s",
                names="ours 2B-row/TRL",
            )
        )


# ------------------------------------------------------------------------------------------------ real width


def add_width_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--width",
        choices=("tiny", "real"),
        default="tiny",
        help="tiny: the demo's model; real: Phi-3-vision-128k's widths at fewer layers (module docstring)",
    )
    parser.add_argument("--depth", type=int, help="(a side at --width real) its decoder layers")
    parser.add_argument(
        "--processes", type=int, default=1, help="processes per side: 2 runs DDP over gloo, one thread each"
    )
    parser.add_argument(
        "--depths",
        default=",".join(map(str, REAL_DEPTHS)),
        help="(--width real) decoder depths to time, comma-separated; the 32-layer projection needs the two "
        "default ones",
    )


def fill_width_defaults(args: argparse.Namespace, tiny: dict, real: dict) -> None:
    """Options left unset take the width's defaults."""
    for key, value in (real if args.width == "real" else tiny).items():
        if getattr(args, key) is None:
            setattr(args, key, value)


def depths(args: argparse.Namespace) -> tuple:
    if args.width != "real":
        return (None,)
    return tuple(int(depth) for depth in str(args.depths).split(","))


def projects(args: argparse.Namespace) -> bool:
    """Whether the run timed the two depths the 32-layer projection reads."""
    return args.width == "real" and set(REAL_DEPTHS) <= set(depths(args))


def with_depth(args: argparse.Namespace, depth) -> argparse.Namespace:
    return argparse.Namespace(**{**vars(args), "depth": depth})


def model_description(args: argparse.Namespace, tiny_model: dict) -> str:
    if args.width != "real":
        return f"tiny Phi-3-V {tiny_model}"
    return (
        f"Phi-3-vision-128k at real width (hidden 3072, 32 heads, MLP 8192, vocab 32064; CLIP ViT-L/14-336: "
        f"hidden 1024, 16 heads, MLP 4096, 336 px crops of 14 px patches), random weights (seed {SEED}), "
        f"decoder layers {' and '.join(map(str, depths(args)))} (timed at each), CLIP {REAL_VISION_LAYERS} layers "
        f"built, {REAL_VISION_LAYERS - 1} run (real: 24 built, 23 run)"
    )


def clip_depth_factor() -> float:
    """The FLOP model's CLIP forward per view at the real depth (23 layers run) over the benchmark's (1 run):
    benchmarks/train_step.py `vision_forward_flops` (patch convolution + the layers run)."""
    from benchmarks.train_step import vision_forward_flops
    from models.phi3v.sizes import full_size_config

    real = full_size_config("phi3v")
    used = full_size_config("phi3v")
    used.img_processor = {**used.img_processor, "vision_config": {"num_hidden_layers": REAL_VISION_LAYERS}}
    return vision_forward_flops(real, 1) / vision_forward_flops(used, 1)


def project_to_full_depth(seconds: dict, clip_seconds: dict) -> list[float]:
    """Per repeat, one side's seconds per step projected to 32 decoder layers and the real CLIP depth:
    s(L1) + (32 - L1) x [s(L2) - s(L1)] / (L2 - L1) + (f - 1) x CLIP seconds, where L1 < L2 are REAL_DEPTHS (the
    difference of the two runs is the cost of one more decoder layer: forward, recomputation and backward), and f
    is `clip_depth_factor` applied to the measured CLIP seconds of the step (the tower is frozen: forward only).
    `seconds[depth]` and `clip_seconds[depth]`: one value per repeat."""
    low, high = REAL_DEPTHS
    factor = clip_depth_factor()
    projected = []
    for s_low, s_high, c_low, c_high in zip(
        seconds[low], seconds[high], clip_seconds[low], clip_seconds[high]
    ):
        layer = (s_high - s_low) / (high - low)
        projected.append(s_low + (REAL_FULL_DEPTH - low) * layer + (factor - 1) * (c_low + c_high) / 2)
    return projected


def print_projection(
    seconds: dict[str, dict],
    clip_seconds: dict[str, dict],
    units_per_step: int,
    unit: str,
    clock: str = "wall",
    sides=("ours", "TRL"),
) -> None:
    """The per-layer cost, CLIP, the projected step and throughput of each side (medians over repeats), and the
    paired ratio of the projected throughputs (TRL's seconds / ours, repeat by repeat), on one clock (wall or the
    process's CPU seconds)."""
    low, high = REAL_DEPTHS
    print(
        f"projection to {REAL_FULL_DEPTH} decoder layers and CLIP's 23, {clock} seconds: s({low}) + "
        f"({REAL_FULL_DEPTH} - {low}) x [s({high}) - s({low})] + (f - 1) x CLIP s, f = {clip_depth_factor():.2f} "
        "(the FLOP model's CLIP forward at 23 layers over 1), per repeat; medians over repeats:"
    )
    projected = {}
    for side in sides:
        projected[side] = project_to_full_depth(seconds[side], clip_seconds[side])
        layers = [(b - a) / (high - low) for a, b in zip(seconds[side][low], seconds[side][high])]
        print(
            f"  {side:<5} s/step at {low}: {statistics.median(seconds[side][low]):.2f}, at {high}: "
            f"{statistics.median(seconds[side][high]):.2f}; one decoder layer {statistics.median(layers):.2f} s "
            f"(min {min(layers):.2f}, max {max(layers):.2f}); CLIP {statistics.median(clip_seconds[side][low]):.2f} s;"
            f" projected {statistics.median(projected[side]):.1f} s/step = "
            f"{units_per_step / statistics.median(projected[side]):.4f} {unit}"
        )
    ours, theirs = sides
    print(
        paired_ratios(
            [units_per_step / s for s in projected[ours]],
            [units_per_step / s for s in projected[theirs]],
            unit,
            names=f"projected {REAL_FULL_DEPTH}-layer {ours}/{theirs} ({clock})",
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--steps", type=int, help="timed optimizer steps per side (default 30; --width real: 3)"
    )
    parser.add_argument(
        "--warmup", type=int, help="optimizer steps run first and not timed (default 3; --width real: 1)"
    )
    parser.add_argument(
        "--batch-size", type=int, help="pairs per optimizer step and process (default the demo's 16; real: 2)"
    )
    parser.add_argument(
        "--repeats", type=int, help="runs per side, alternating; paired medians (default 5; --width real: 3)"
    )
    parser.add_argument(
        "--with-2b",
        action="store_true",
        help="also run ours on the 2B-row layout (no prompt sharing) and assert equal losses",
    )
    parser.add_argument(
        "--loss-rtol",
        type=float,
        default=1e-4,
        help="largest relative loss gap allowed between the shared-prompt and 2B-row runs",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads per side (1: see the module docstring; 0: torch's default)",
    )
    parser.add_argument("--side", choices=SIDES, help="run one side in this process (needs --workdir)")
    parser.add_argument("--workdir", type=Path, help="a folder the parent prepared (with --side)")
    add_width_arguments(parser)
    args = parser.parse_args()
    fill_width_defaults(
        args,
        tiny=dict(steps=30, warmup=3, batch_size=16, repeats=5),
        real=dict(steps=3, warmup=1, batch_size=2, repeats=3),
    )
    if (
        min(args.steps, args.batch_size, args.repeats, args.processes) < 1
        or min(args.warmup, args.threads) < 0
    ):
        parser.error(
            f"need --steps, --batch-size, --repeats, --processes >= 1 and --warmup, --threads >= 0; got "
            f"{args.steps}, {args.batch_size}, {args.repeats}, {args.processes}, {args.warmup}, {args.threads}"
        )
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
