"""What a recipe is: one frozen, keyword-only dataclass per YAML section.

Every field carries its default, its documentation and its numeric range here, and nowhere else:
`config.parse.recipe_help()` prints them for `--help`, `config.parse.parse_recipe` checks types and ranges, and
`config.checks.recipe_problems` lists every cross-field problem of a well-typed recipe.

The named choices below mirror registries of the packages that implement them (the DPO loss family in
`train/preference/losses.py`, the adapters of `data/adapters.py`, the tasks of `eval/tasks.py`); the recipe cannot import
those packages (they import it), so `tests/test_layers.py` asserts that each list equals its registry.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

Dtype = Literal["bfloat16", "float16", "float32"]
AttnImplementation = Literal["sdpa", "eager", "flash_attention_2"]
SourceFormat = Literal["trl_messages", "llava", "sharegpt", "vqa", "trl_preference", "rlaif_v", "synthetic"]
EvalTask = Literal["chartqa", "docvqa", "textvqa", "ai2d", "scienceqa", "pope", "synthetic"]
DpoLossType = Literal[
    "sigmoid", "ipo", "hinge", "robust", "bco_pair", "sppo_hard", "nca_pair", "apo_zero", "apo_down"
]
Stage = Literal["sft", "dpo", "grpo", "eval", "export"]
Quantization = Literal["none", "nf4", "fp4", "int8"]
Optimizer = Literal["adamw", "adamw_8bit", "paged_adamw_8bit"]
TrainedStage = Literal["base", "sft", "dpo", "grpo"]
GrpoLossType = Literal["grpo", "bnpo", "dr_grpo", "dapo"]
GrpoRewardType = Literal[
    "exact_match", "relaxed_accuracy", "anls", "vqa_accuracy", "option_letter", "format", "length", "function"
]

# Which training stage reads which source formats; `synthetic` draws both conversations and preference pairs. GRPO
# reads the SFT rows: the turns before the last answer are its prompt, that answer its reference.
STAGE_FORMATS = {
    "sft": frozenset({"trl_messages", "llava", "sharegpt", "vqa", "synthetic"}),
    "dpo": frozenset({"trl_preference", "rlaif_v", "synthetic"}),
    "grpo": frozenset(
        {"trl_messages", "llava", "sharegpt", "vqa", "synthetic"}
    ),  # prompts + reference answers
}
# TRL's DPO losses whose formula has a label-smoothing term (conservative DPO, robust DPO).
LABEL_SMOOTHING_LOSSES = frozenset({"sigmoid", "robust"})
STAGE_ORDER: tuple[Stage, ...] = ("sft", "dpo", "grpo", "eval", "export")
# PIL's decompression-bomb limit; data/images.py refuses larger images by default.
MAX_IMAGE_PIXELS = 89_478_485
# Where a `synthetic` source without a path writes the demo's dataset (data/synthetic.py draws it).
SYNTHETIC_DIR = "runs/.data/synthetic"


@dataclass(frozen=True, slots=True)
class Bounds:
    """The allowed range of a numeric field (of each item, for a list)."""

    ge: float | None = None
    gt: float | None = None
    lt: float | None = None

    def admits(self, value: float) -> bool:
        return math.isfinite(value) and not (  # NaN and infinities (YAML .nan, .inf) are in no range
            (self.ge is not None and value < self.ge)
            or (self.gt is not None and value <= self.gt)
            or (self.lt is not None and value >= self.lt)
        )

    def __str__(self) -> str:  # ">= 1", "> 0", "in [0, 1)"; every range the schema uses has a lower end
        if self.lt is None:
            return f">= {self.ge}" if self.ge is not None else f"> {self.gt}"
        return f"in [{self.ge}, {self.lt})" if self.ge is not None else f"in ({self.gt}, {self.lt})"


def option(
    default: Any, doc: str, *, ge: float | None = None, gt: float | None = None, lt: float | None = None
) -> Any:
    """A schema field: its default, its documentation and its numeric range, in one place."""
    assert lt is None or ge is not None or gt is not None, "Bounds.__str__ needs a lower end"
    bounds = Bounds(ge=ge, gt=gt, lt=lt) if (ge, gt, lt) != (None, None, None) else None
    metadata = {"doc": doc, "bounds": bounds}
    if isinstance(default, dict):
        return field(default_factory=lambda: dict(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def section(factory: Any, doc: str) -> Any:
    """A nested-section field whose default is the section with all its defaults."""
    return field(default_factory=factory, metadata={"doc": doc, "bounds": None})


@dataclass(frozen=True, kw_only=True, slots=True)
class ModelSection:
    name_or_path: str = option(
        "microsoft/Phi-3.5-vision-instruct",
        "Hub id, local directory, or `tiny`: a tiny randomly-initialised Phi-3-V-shaped model built from config "
        "(demo and dry runs; nothing is downloaded).",
    )
    revision: str | None = option(None, "Hub branch, tag or commit to load; null: the default branch.")
    dtype: Dtype = option("bfloat16", "Dtype the weights are loaded in.")
    attn_implementation: AttnImplementation = option("sdpa", "Attention kernel (flash_attention_2: 16-bit).")
    num_crops: int = option(16, "Most 336x336 crops per image; fewer crops, fewer image tokens.", ge=1)
    vision: Literal["frozen", "lora", "full"] = option("frozen", "How the CLIP vision tower is trained.")
    projector: Literal["frozen", "full"] = option("full", "How the image projector (2-layer MLP) is trained.")
    language: Literal["lora", "full"] = option("lora", "How the language model is trained.")
    gradient_checkpointing: bool = option(True, "Recompute activations: less memory, ~30% slower.")
    liger: bool = option(
        False, "liger-kernel's Phi-3 RoPE, RMSNorm and SwiGLU kernels (CUDA + liger-kernel only)."
    )
    quantization: Quantization = option(
        "none",
        "QLoRA: store the language model's linear layers in 4 bits (nf4, fp4) or 8 bits (int8) with bitsandbytes, "
        "frozen, LoRA on top. The CLIP tower, the projector, embeddings, norms and lm_head stay in model.dtype: "
        "they are 0.5 B of 4.1 B parameters, train (projector) or feed every token, and 4-bit rounding there costs "
        "more than it saves (docs/qlora.md).",
    )
    double_quant: bool = option(
        True,
        "nf4/fp4: quantise the per-block scales too (QLoRA's double quantisation, ~0.4 bit per weight less).",
    )
    quant_compute_dtype: Dtype | None = option(
        None, "nf4/fp4: dtype the 4-bit weights are dequantised to for each matmul; null: model.dtype."
    )


@dataclass(frozen=True, kw_only=True, slots=True)
class LoraSection:
    r: int = option(16, "LoRA rank.", ge=1)
    alpha: int = option(32, "LoRA updates are scaled by alpha/r (rsLoRA: alpha/sqrt(r)).", ge=1)
    dropout: float = option(0.05, "Dropout on the LoRA input.", ge=0, lt=1)
    target_modules: tuple[str, ...] = option(
        ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),
        "Language-model modules that get LoRA (Phi-3's fused attention and MLP projections).",
    )
    vision_target_modules: tuple[str, ...] = option(
        ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
        "CLIP modules that get LoRA when model.vision is lora.",
    )
    use_rslora: bool = option(False, "Rank-stabilised LoRA: scale by alpha/sqrt(r).")
    use_dora: bool = option(False, "Weight-decomposed LoRA (DoRA).")


@dataclass(frozen=True, kw_only=True, slots=True)
class Source:
    format: SourceFormat = option(
        "trl_messages",
        "Row format. SFT reads trl_messages, llava, sharegpt, vqa; DPO reads trl_preference, rlaif_v; synthetic "
        "(drawn in-process) feeds both.",
    )
    path: str = option(
        "", f"Hub dataset id, or a local file or directory (synthetic: default {SYNTHETIC_DIR})."
    )
    config: str | None = option(None, "Hub dataset configuration name.")
    split: str = option("train", "Dataset split.")
    revision: str | None = option(None, "Hub dataset branch, tag or commit.")
    streaming: bool = option(False, "Stream rows instead of downloading the whole split first.")
    columns: dict[str, str] = option({}, "Column renames, raw name -> canonical name.")
    image_root: str | None = option(None, "Where relative image paths resolve (and stay confined).")
    weight: float = option(1.0, "Sampling weight relative to the stage's other sources.", gt=0)
    limit: int | None = option(None, "Read at most this many rows; null: all.", ge=1)


@dataclass(frozen=True, kw_only=True, slots=True)
class DataSection:
    train: tuple[Source, ...] = option((), "Training sources; each stage reads the formats it understands.")
    eval: tuple[Source, ...] = option(
        (), "Held-out sources: SFT's validation loss (SFT formats), DPO's preference accuracy; may be empty."
    )
    max_length: int = option(4096, "Most tokens per sample, image tokens included.", ge=1)
    on_overlong: Literal["drop", "error"] = option("drop", "Over-long sample: drop and count it, or raise.")
    on_bad_sample: Literal["error", "skip"] = option(
        "error", "Invalid row: raise naming it, or skip and count it."
    )
    max_image_pixels: int = option(
        MAX_IMAGE_PIXELS, "Refuse larger images (PIL's decompression-bomb limit).", ge=1
    )
    assistant_turns: Literal["all", "last"] = option("all", "Which assistant turns are supervised.")
    num_workers: int = option(2, "DataLoader worker processes per rank.", ge=0)
    group_by_length: bool = option(False, "Batch samples of similar token counts together (less padding).")
    packing: bool = option(False, "Pack several samples into one sequence up to max_length.")


@dataclass(frozen=True, kw_only=True, slots=True)
class TrainSection:
    micro_batch_size: int = option(1, "Samples per device per forward pass.", ge=1)
    grad_accum: int = option(8, "Micro-batches per optimizer step.", ge=1)
    max_steps: int | None = option(None, "Optimizer steps; set exactly one of max_steps and epochs.", ge=1)
    epochs: float | None = option(None, "Data passes; set exactly one of max_steps and epochs.", gt=0)
    lr: float = option(2.0e-4, "Peak learning rate of the language model (LoRA or full).", gt=0)
    lr_vision: float | None = option(None, "Peak learning rate of the vision tower; null: lr.", gt=0)
    lr_projector: float | None = option(None, "Peak learning rate of the image projector; null: lr.", gt=0)
    weight_decay: float = option(0.0, "AdamW decoupled weight decay.", ge=0)
    adam_betas: tuple[float, ...] = option((0.9, 0.999), "AdamW [beta1, beta2].", ge=0, lt=1)
    adam_eps: float = option(1.0e-8, "AdamW epsilon.", gt=0)
    optimizer: Optimizer = option(
        "adamw",
        "adamw (torch, fp32 states); adamw_8bit (bitsandbytes, 8-bit states: 2 of the 8 bytes per trained "
        "parameter; runs on CPU and GPU); paged_adamw_8bit (8-bit states in CUDA unified memory, paged to the "
        "host under memory pressure; CUDA only).",
    )
    scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = option(
        "cosine", "LR schedule."
    )
    warmup_ratio: float = option(0.03, "Warmup as a fraction of all optimizer steps.", ge=0, lt=1)
    warmup_steps: int | None = option(None, "Warmup steps; overrides warmup_ratio when set.", ge=0)
    max_grad_norm: float | None = option(1.0, "Clip the global gradient norm to this; null: off.", gt=0)
    precision: Literal["bf16", "fp32"] = option("bf16", "Autocast precision of the forward pass.")
    checkpoint_every: int = option(500, "Save a resumable checkpoint every this many optimizer steps.", ge=1)
    keep_checkpoints: int = option(2, "Keep the newest this many checkpoints; older ones are deleted.", ge=1)
    log_every: int = option(10, "Log metrics every this many optimizer steps.", ge=1)
    resume: bool = option(False, "Resume from the newest checkpoint in the run directory.")
    collective_timeout_s: int = option(
        1800,
        "Seconds a collective (all-reduce, barrier) may wait for the other ranks before the run fails; every rank "
        "then writes its Python stacks to <run>/diagnostics/rank-<r>.txt.",
        ge=1,
    )
    num_threads: int | None = option(
        None,
        "Intra-op CPU threads per process; null: $OMP_NUM_THREADS if set, else torch's default with a GPU and "
        "cores // local processes without (train/core/device.py set_threads).",
        ge=1,
    )
    resume_allow_changes: tuple[str, ...] = option(
        (),
        "Run-shaping keys a resume may change (RESUME_KEYS, e.g. [train.lr]); recorded in the checkpoints.",
    )
    on_nonfinite: Literal["stop", "skip"] = option(
        "stop", "Non-finite loss or gradient norm: stop, or skip the step."
    )
    max_nonfinite_steps: int = option(
        10, "With on_nonfinite: skip, stop after this many skipped steps.", ge=0
    )
    sequence_parallel: int = option(
        1,
        "Ranks that share each sequence (Ulysses sequence parallelism, for long samples): a group of this many "
        "ranks holds one micro-batch, encodes 1/N of its crops each and runs the decoder on 1/N of its tokens; data "
        "parallelism runs over processes / N groups. Must divide the processes and the attention heads (32 on "
        "Phi-3-V); needs sdpa or flash_attention_2 (docs/distributed.md#sequence-parallelism).",
        ge=1,
    )


# The values that shape a training stage, recorded in each checkpoint and compared on resume (train/core/checkpoint.py);
# `world_size` (processes) and `data` (the planned samples' fingerprint) are not recipe keys.
RESUME_KEYS_COMMON = (
    "seed",
    "model.name_or_path",
    "model.revision",
    "model.dtype",
    "model.num_crops",
    "model.vision",
    "model.projector",
    "model.language",
    "lora.r",
    "lora.alpha",
    "lora.dropout",
    "lora.target_modules",
    "lora.vision_target_modules",
    "lora.use_rslora",
    "lora.use_dora",
    "data.max_length",
    "data.packing",
    "data.group_by_length",
    "data.assistant_turns",
    "train.micro_batch_size",
    "train.grad_accum",
    "train.lr",
    "train.lr_vision",
    "train.lr_projector",
    "train.scheduler",
    "train.warmup_ratio",
    "train.warmup_steps",
    "train.weight_decay",
    "train.adam_betas",
    "train.adam_eps",
    "train.max_grad_norm",
    "train.precision",
    "train.max_steps",
    "train.epochs",
    "train.sequence_parallel",
    "world_size",
    "data",
)
RESUME_KEYS_DPO = (
    "dpo.lr",
    "dpo.max_steps",
    "dpo.losses",
    "dpo.beta",
    "dpo.label_smoothing",
    "dpo.sft_weight",
    "dpo.mdpo_weight",
)
RESUME_KEYS_GRPO = (
    "grpo.lr",
    "grpo.max_steps",
    "grpo.rewards",
    "grpo.prompt_suffix",
    "grpo.answer_pattern",
    "grpo.num_generations",
    "grpo.temperature",
    "grpo.top_p",
    "grpo.max_new_tokens",
    "grpo.stop_strings",
    "grpo.loss_type",
    "grpo.epsilon",
    "grpo.epsilon_high",
    "grpo.beta",
    "grpo.scale_rewards",
    "grpo.num_iterations",
)
RESUME_KEYS = RESUME_KEYS_COMMON + RESUME_KEYS_DPO + RESUME_KEYS_GRPO


@dataclass(frozen=True, kw_only=True, slots=True)
class DpoLoss:
    type: DpoLossType = option("sigmoid", "Preference loss, named as in TRL's DPOTrainer.")
    weight: float = option(1.0, "Weight of this loss in the sum of losses.", gt=0)


@dataclass(frozen=True, kw_only=True, slots=True)
class DpoSection:
    losses: tuple[DpoLoss, ...] = option((DpoLoss(),), "Preference losses, summed with their weights (MPO).")
    beta: float = option(0.1, "Strength of the KL penalty to the reference model.", gt=0)
    label_smoothing: float = option(0.0, "Flipped-label rate (sigmoid and robust losses only).", ge=0, lt=0.5)
    sft_weight: float = option(0.0, "Weight of the NLL loss on the chosen completion (RPO); 0: off.", ge=0)
    mdpo_weight: float = option(0.0, "Weight of mDPO's image-conditional preference term; 0: off.", ge=0)
    lr: float | None = option(None, "Peak learning rate of the DPO stage; null: train.lr.", gt=0)
    max_steps: int | None = option(
        None, "Optimizer steps of the DPO stage; null: train.max_steps / train.epochs.", ge=1
    )
    precompute_ref_logps: bool = option(
        True,
        "Compute the reference log-probs once before training (shared out over the ranks) and cache them, "
        "instead of a reference pass in every step; false: the live pass (e.g. when a run sees only a small part "
        "of its data, as each planned pair is scored once up front).",
    )
    share_prompt: bool = option(
        True,
        "One LM pass over each pair's prompt for both completions (prefix-sharing layout, same log-probs); "
        "false: the 2B-row layout, each prompt computed twice.",
    )
    ref_batch_size: int = option(8, "Pairs per batch when precomputing reference log-probs.", ge=1)
    from_sft: str | None = option(None, "SFT run dir or adapter path to start from; null: the base model.")


@dataclass(frozen=True, kw_only=True, slots=True)
class GrpoReward:
    type: GrpoRewardType = option(
        "exact_match",
        "A task metric (exact_match, relaxed_accuracy, anls, vqa_accuracy, option_letter: the eval's own scorer, on "
        "the answer), format (1 when `pattern` matches the completion), length (-tokens / grpo.max_new_tokens), or "
        "function (`function`: module:function, called as f(completion: str, example: EvalExample) -> float | None; "
        "docs/grpo.md).",
    )
    weight: float = option(1.0, "Weight of this reward in the summed reward.", gt=0)
    pattern: str | None = option(
        None, "format: the regular expression the completion must contain (re.search)."
    )
    function: str | None = option(None, "function: the import path `module:function` of your reward.")


@dataclass(frozen=True, kw_only=True, slots=True)
class GrpoSection:
    rewards: tuple[GrpoReward, ...] = option(
        (GrpoReward(),), "Rewards, summed with their weights (train/rl/rewards.py)."
    )
    prompt_suffix: str | None = option(
        None,
        "Text appended to each prompt's last user turn, e.g. an instruction to reason briefly and then give "
        "the answer in tags (what a format reward checks); null: the rows' prompts as they are.",
    )
    answer_pattern: str | None = option(
        None,
        "Regular expression whose first group is the answer the metric rewards score (e.g. "
        "'<answer>(.*?)</answer>'); no match scores 0; null: the whole completion.",
    )
    num_generations: int = option(
        8, "Completions sampled per prompt (the group advantages are computed in).", ge=2
    )
    temperature: float = option(
        1.0, "Sampling temperature; the loss scores log-probs at it too (as TRL).", gt=0
    )
    top_p: float = option(
        1.0, "Nucleus sampling: keep the most likely tokens reaching this mass (<= 1).", gt=0
    )
    max_new_tokens: int = option(64, "Most tokens per completion (dr_grpo divides by it).", ge=1)
    stop_strings: tuple[str, ...] = option((), "A completion also ends at the token completing one of these.")
    loss_type: GrpoLossType = option(
        "dapo", "TRL's GRPO loss normalisation: grpo, bnpo, dr_grpo, dapo (TRL's default)."
    )
    epsilon: float = option(
        0.2, "Clip range below (and above, unless epsilon_high) the importance ratio 1.", gt=0, lt=1
    )
    epsilon_high: float | None = option(
        None, "Upper clip range (DAPO's clip-higher, e.g. 0.28); null: epsilon.", gt=0
    )
    beta: float = option(
        0.0,
        "Weight of the KL penalty to the starting policy (adapter disabled); 0: no "
        "reference pass (TRL's default).",
        ge=0,
    )
    scale_rewards: Literal["group", "batch", "none"] = option(
        "group", "Divide advantages by the group's reward std, the step's (batch), or not (Dr. GRPO: none)."
    )
    num_iterations: int = option(
        1, "Optimizer steps per generation (importance ratios against the sampling policy).", ge=1
    )
    share_prompt: bool = option(
        True,
        "One LM pass over each prompt for its G completions in the loss pass (prefix-sharing layout, same "
        "log-probs; sdpa or eager attention); false: G rows, each computing the prompt.",
    )
    lr: float | None = option(None, "Peak learning rate of the GRPO stage; null: train.lr.", gt=0)
    max_steps: int | None = option(
        None, "Optimizer steps of the GRPO stage; null: train.max_steps / train.epochs.", ge=1
    )


@dataclass(frozen=True, kw_only=True, slots=True)
class EvalSection:
    tasks: tuple[EvalTask, ...] = option((), "Eval task names (eval/tasks.py documents each).")
    limit: int | None = option(None, "Score at most this many examples per task; null: all.", ge=1)
    when: tuple[TrainedStage, ...] = option((), "Models to score; empty: base and every trained stage.")
    every_steps: int | None = option(
        None,
        "Also score (and compute SFT's validation loss) every this many training steps; null: never.",
        ge=1,
    )
    max_new_tokens: int = option(128, "Most generated tokens per answer.", ge=1)
    batch_size: int = option(8, "Prompts generated per batch per device.", ge=1)
    gate_margin: float | None = option(
        None, "Fail when a stage scores this far below the previous one.", ge=0
    )


@dataclass(frozen=True, kw_only=True, slots=True)
class ExportSection:
    adapter: bool = option(True, "Save the LoRA adapter (PEFT layout).")
    merged: bool = option(False, "Save merged weights in the original hub layout.")
    merged_dtype: Dtype = option("bfloat16", "Dtype of the merged weights.")
    hub_id: str | None = option(
        None,
        "Hub repository (ORG/NAME) the export uploads the merged folder and adapter to, with their model "
        "cards; null: no upload. The token is read from the environment (HF_TOKEN).",
    )
    private: bool = option(True, "Create the hub repository as private.")
    base_model_id: str | None = option(
        None,
        "Hub id of the base model, written into the adapter config and cards when model.name_or_path is a "
        "local folder; null: model.name_or_path when it is a hub id.",
    )
    merge_base: Literal["original", "quantized"] = option(
        "original",
        "With model.quantization: merge the adapters into the original base weights (loaded unquantised in "
        "float32: what one serves), or into the 4-bit rounded weights they were trained against, dequantised.",
    )


@dataclass(frozen=True, kw_only=True, slots=True)
class LoggingSection:
    report_to: tuple[Literal["wandb", "tensorboard"], ...] = option(("tensorboard",), "Metric trackers.")
    project: str | None = option(None, "Tracker project name; null: the tracker's default.")
    run_name: str | None = option(None, "Tracker run name; null: the run directory's name.")


@dataclass(frozen=True, kw_only=True, slots=True)
class Recipe:
    model: ModelSection = section(ModelSection, "Which model to load and which parts to train.")
    lora: LoraSection = section(LoraSection, "LoRA, used when model.language or model.vision is lora.")
    data: DataSection = section(DataSection, "Data sources and how samples are rendered and batched.")
    train: TrainSection = section(TrainSection, "Optimiser, schedule and checkpoints (SFT and DPO).")
    dpo: DpoSection = section(DpoSection, "The DPO stage.")
    grpo: GrpoSection = section(GrpoSection, "The GRPO stage (reinforcement learning on the task metrics).")
    eval: EvalSection = section(EvalSection, "Scoring with task metrics.")
    export: ExportSection = section(ExportSection, "What the export stage writes.")
    stages: tuple[Stage, ...] = option(
        ("sft", "export"), "Stages to run, in the order sft, dpo, grpo, eval, export."
    )
    output_dir: str | None = option(None, "Run directory; null: runs/<recipe-name>-<timestamp>/.")
    overwrite_output_dir: bool = option(False, "Allow writing into a run directory that already holds files.")
    seed: int = option(42, "Seed of every random number generator (numpy takes [0, 2**32)).", ge=0, lt=2**32)
    logging: LoggingSection = section(LoggingSection, "Metric trackers.")
    # (dotted key, origin) pairs set by config.parse.parse_recipe; read them with config.parse.provenance.
    # Not a recipe key: no init, no equality, no repr.
    _provenance: Any = field(default=None, init=False, compare=False, repr=False)
