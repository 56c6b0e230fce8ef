"""Where training runs: the accelerator (devices, processes, mixed precision, trackers), preparing the model and
optimizer for it, and moving batches onto its device."""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager, nullcontext
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator, DistributedType, PartialState
from accelerate.utils import GradientAccumulationPlugin, InitProcessGroupKwargs, set_seed

from config import Recipe
from rundir.layout import logs_dir
from runtime.processes import (
    init_restartable_process_group,
    shards_parameters,
)

log = logging.getLogger(__name__)


def set_threads(recipe: Recipe | None = None) -> int:
    """Set this process's intra-op threads before the model loads; returns the count in force.

    Precedence: `train.num_threads` from the recipe, then `$OMP_NUM_THREADS`, then a default: torch's own with a
    GPU (the host threads only feed the device), and `usable cores // processes on this node` without one, so that
    N CPU processes on N cores do not oversubscribe (each OpenMP region waits for its slowest, descheduled thread).
    `OMP_NUM_THREADS` is exported with the count, so DataLoader workers and child processes inherit it (torch's
    worker loop also sets one thread per worker)."""
    requested = recipe.train.num_threads if recipe is not None else None
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if requested is None and env.isdigit() and int(env) > 0:
        requested = int(env)
    if requested is None and not torch.cuda.is_available():
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
        requested = max(1, cores // max(1, local))
    if requested is not None:
        torch.set_num_threads(requested)
        os.environ["OMP_NUM_THREADS"] = str(requested)
    return torch.get_num_threads()


def apply_liger(enabled: bool) -> bool:
    """`model.liger`: patch transformers' Phi-3 classes with liger-kernel's Triton RoPE, RMSNorm and SwiGLU, before
    the model is built (the decoder layers are transformers' Phi3DecoderLayer). The fused linear cross-entropy stays
    off: our losses compute logits only at supervised positions themselves (train/core/losses.py)."""
    if not enabled:
        return False
    if not torch.cuda.is_available():
        raise RuntimeError(
            "model.liger: true needs a CUDA GPU (liger-kernel's kernels are Triton); set it to false"
        )
    try:
        from liger_kernel.transformers import apply_liger_kernel_to_phi3
    except ImportError as error:
        raise RuntimeError(
            "model.liger: true needs the liger-kernel package: pip install -e '.[gpu]'"
        ) from error
    apply_liger_kernel_to_phi3(
        rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False
    )
    return True


def make_accelerator(
    recipe: Recipe, run_dir: Path, grad_accum: int, log_with: list | None = None
) -> Accelerator:
    """`log_with`: tracker instances (train/core/tracking.py `make_trackers`); None: the recipe's tracker names."""
    # gloo where there is no GPU: the multi-process CPU runs (DDP, DeepSpeed, FSDP2) need it. A single process gets no
    # process group (asking for one without a launcher fails).
    # train.collective_timeout_s bounds every collective's wait (runtime/diagnostics.py writes the stacks before it).
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    timeout = timedelta(seconds=recipe.train.collective_timeout_s)
    backend = {"backend": "gloo"} if not torch.cuda.is_available() else {}
    kwargs = [InitProcessGroupKwargs(timeout=timeout, **backend)] if distributed else []
    # An FSDP launch on a CPU-only machine: accelerate forms a CPU process group (gloo) only when asked for the CPU;
    # select_fsdp_on_cpu then selects FSDP2 over it.
    fsdp_on_cpu = distributed and wants_fsdp() and not torch.cuda.is_available()
    if distributed:
        init_restartable_process_group(timeout)
    accelerator = Accelerator(
        cpu=fsdp_on_cpu,
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=grad_accum, sync_with_dataloader=False
        ),
        mixed_precision="bf16" if recipe.train.precision == "bf16" else "no",
        log_with=(log_with if log_with is not None else list(recipe.logging.report_to)) or None,
        project_dir=str(logs_dir(run_dir)),
        kwargs_handlers=kwargs,
    )
    select_fsdp_on_cpu(accelerator)
    if accelerator.num_processes > 1 and accelerator.distributed_type == DistributedType.NO:
        raise RuntimeError(
            f"{accelerator.num_processes} processes but no distributed backend: launch CPU runs with "
            "`ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu ...` (launch.sh does), not bare torchrun"
        )
    if (
        accelerator.distributed_type == DistributedType.FSDP
        and accelerator.state.fsdp_plugin.cpu_ram_efficient_loading
    ):
        # transformers would then load the weights on rank 0 only; the base eval, the preflight and DPO's reference
        # log-probs run before prepare and need the whole model on every rank (docs/distributed.md#fsdp2).
        raise RuntimeError(
            "fsdp_cpu_ram_efficient_loading: true is not supported: the model loads whole on every rank "
            "and is sharded at prepare; set it to false (recipes/accelerate/fsdp2.yaml)"
        )
    if shards_parameters(accelerator) and recipe.model.quantization != "none":
        raise RuntimeError(
            f"model.quantization: {recipe.model.quantization} with sharded parameters (DeepSpeed ZeRO-3, FSDP) is not "
            "supported: the quantised weights would have to be sharded in bitsandbytes' storage dtype, which is not "
            "built or tested here. The 4-bit 4.2B model takes ~3 GB per GPU: use recipes/accelerate/ddp.yaml or "
            "zero2.yaml (docs/qlora.md)"
        )
    plugin = zero3_plugin(accelerator)
    if plugin is not None:
        # save_trained gathers the partitions into one 16-bit (or fp32) state dict for the hub layout.
        plugin.deepspeed_config.setdefault("zero_optimization", {})[
            "stage3_gather_16bit_weights_on_model_save"
        ] = True
    log.info(
        "accelerate: %s, %d process(es), device %s, mixed precision %s",
        accelerator.distributed_type,
        accelerator.num_processes,
        accelerator.device,
        accelerator.mixed_precision,
    )
    set_seed(recipe.seed)
    return accelerator


def wants_fsdp() -> bool:
    """Whether the launcher asked for FSDP (`accelerate launch --use_fsdp`, or `distributed_type: FSDP`)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def select_fsdp_on_cpu(accelerator: Accelerator) -> bool:
    """Select FSDP2 where the launcher asked for FSDP but accelerate chose DDP because there is no GPU; True if it
    did. accelerate 1.15 selects `DistributedType.FSDP` only for a GPU-type process group (its state.py checks
    `ACCELERATE_USE_FSDP` inside the MULTI_GPU / MULTI_NPU / ... branch, with no MULTI_CPU), so
    `accelerate launch --use_fsdp` on a CPU-only machine ends up MULTI_CPU, i.e. plain DDP. FSDP2
    (`torch.distributed.fsdp.fully_shard`) itself runs on a CPU device mesh over gloo, and nothing on accelerate's
    FSDP2 path (prepare, backward, clip_grad_norm_, get_state_dict, save_state / load_state) needs a GPU, so this
    sets the state's distributed type to FSDP with the plugin accelerate built from the launcher's environment:
    CPU runs take the same accelerate FSDP2 code path as GPU runs (docs/distributed.md#fsdp2). FSDP1 is refused."""
    if (
        not wants_fsdp()
        or accelerator.distributed_type != DistributedType.MULTI_CPU
        or torch.cuda.is_available()
    ):
        return False
    from accelerate.utils import FullyShardedDataParallelPlugin

    plugin = (
        FullyShardedDataParallelPlugin()
    )  # from the launcher's FSDP_* variables, as Accelerator() builds it
    if plugin.fsdp_version != 2:
        raise RuntimeError(
            "FSDP on CPU processes is supported with fsdp_version: 2 only (recipes/accelerate/"
            "fsdp2.yaml, or accelerate launch --use_fsdp --fsdp_version 2)"
        )
    if accelerator.mixed_precision != "no":
        plugin.set_mixed_precision(accelerator.mixed_precision)
    accelerator.state.fsdp_plugin = plugin
    accelerator.state.distributed_type = DistributedType.FSDP
    # As AcceleratorState.__init__ does at its end: every later AcceleratorState() (accelerate's optimizer wrapper
    # makes one) copies PartialState's shared values over its own.
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    log.info(
        "accelerate chose %s on a CPU-only machine for an FSDP launch: FSDP2 selected over gloo",
        DistributedType.MULTI_CPU,
    )
    return True


def zero3_plugin(accelerator: Accelerator):
    """accelerate's DeepSpeed plugin when the run uses ZeRO-3, else None."""
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return None
    plugin = accelerator.state.deepspeed_plugin
    return plugin if plugin.zero_stage == 3 else None


def model_forward_only(accelerator: Accelerator) -> bool:
    """Whether the prepared model's submodules may run only inside the model's own forward (FSDP). FSDP2 gathers a
    unit's parameters in that unit's forward hook: the root unit (what no decoder or CLIP layer or the embedding
    holds: the CLIP embeddings, the projector, the separators) only in the whole model's forward, so calling
    `vision_embed_tokens` on its own would meet sharded DTensors. DeepSpeed ZeRO-3 gathers per submodule and
    has no such limit."""
    return accelerator.distributed_type == DistributedType.FSDP


@contextmanager
def whole_model_loading(accelerator: Accelerator):
    """Load models whole on every rank, also under ZeRO-3. transformers builds a model inside `deepspeed.zero.Init`
    (partitioned as it loads) while accelerate's ZeRO-3 config is registered with it; this unregisters it for the
    load and registers it again after. The 4.2B model fits one GPU in 16 bits (8.4 GB): the base eval, the preflight
    and the reference log-probs run on it unsharded, and `accelerator.prepare` partitions it (docs/distributed.md#zero-3).
    FSDP2 needs nothing here: with `fsdp_cpu_ram_efficient_loading: false` (make_accelerator refuses true) transformers
    loads the whole model on every rank, and `accelerator.prepare` shards it."""
    plugin = zero3_plugin(accelerator)
    if plugin is None:
        yield
        return
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        plugin.set_deepspeed_weakref()


def prepare(accelerator: Accelerator, model, optimizer, micro_batch_size: int):
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        # No DataLoader goes through prepare (our samplers shard by rank themselves): tell DeepSpeed the batch.
        accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = (
            micro_batch_size
        )
    prepared = accelerator.prepare(model, optimizer)
    if accelerator.distributed_type == DistributedType.FSDP:
        log.info("FSDP2 units: %s", fsdp_units(prepared[0]))
    return prepared


def fsdp_units(model: torch.nn.Module) -> str:
    """The classes `fully_shard` was applied to, with counts (the root, the embedding, the final norm and LM head
    group, and the wrapped layers), e.g. `2 Phi3DecoderLayer, 2 CLIPEncoderLayer, 1 Embedding, ...`."""
    from collections import Counter

    from torch.distributed.fsdp import FSDPModule

    counts = Counter(
        type(m).__name__.removeprefix("FSDP") for m in model.modules() if isinstance(m, FSDPModule)
    )
    return ", ".join(f"{n} {name}" for name, n in counts.most_common())


def to_device(batch: dict, device: torch.device) -> dict:
    return {
        k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()
    }


def autocast_context(accelerator: Accelerator):
    return accelerator.autocast() if accelerator.mixed_precision != "no" else nullcontext()
