"""QLoRA on the tiny model through the real entry points: 4-bit layers that are really 4-bit, an SFT run that learns,
its adapter over the quantised and the original base, exact resume, the 8-bit optimizers, DPO on a quantised SFT
model, both merged exports, and the recipe errors."""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import replace

import bitsandbytes as bnb
import pytest
import torch
from accelerate import Accelerator
from torch import nn

from config import RecipeError, load_recipe, parse_recipe, recipe_to_dict
from eval.__main__ import ModelPlan, load_planned
from eval.hook import evaluate_stage
from models.phi3v import Phi3VForCausalLM
from models.quantization import (
    apply_quantization,
    dequantize_language_model_,
    language_linears,
    quantize_language_model_,
    weight_bytes,
)
from rundir.weights import stage_weights
from train.core import optim
from train.core.callbacks import Preempted
from train.core.model_loading import build_tiny, load_weights
from train.core.trainable import configure_trainable, trainable_counts
from train.export import merge as export
from train.tools.dry_run import dry_run

from ..run_helpers import (
    DEMO,
    REPO,
    adapter,
    assert_same_adapter,
    history,
    launch_two_processes,
    run_stage,
    small_overrides,
)

SFT_STEPS = (
    120  # ~50 s on 2 shared cores with the two evals: the 4-bit tiny model answers 10-20% of 64 questions
)


@pytest.fixture(scope="module")
def qlora_sft(synthetic, tmp_path_factory):
    """One QLoRA SFT run (nf4, double quantisation, 8-bit AdamW) scored on 64 held-out questions before and after."""
    run_dir = tmp_path_factory.mktemp("qlora") / "run"
    overrides = [
        *small_overrides(
            run_dir,
            synthetic,
            "sft",
            max_steps=SFT_STEPS,
            micro_batch_size=16,
            grad_accum=1,
            log_every=10,
            optimizer="adamw_8bit",
        ),
        "data.train.0.limit=null",
        "stages=[sft,eval]",
        "eval.limit=64",
        "model.quantization=nf4",
    ]
    return run_stage("sft", overrides)


def exact_match(run_dir, stage: str) -> float:
    return json.loads((run_dir / "eval" / "results.json").read_text())["synthetic"]["exact_match"][stage]


def demo_recipe(*overrides: str):
    return load_recipe(DEMO, list(overrides))


# ------------------------------------------------------------------------------------------------ the layers


@pytest.mark.parametrize("quantization, double_quant", [("nf4", True), ("nf4", False), ("fp4", True)])
def test_the_language_linears_are_really_4bit_and_nothing_else_is(quantization, double_quant):
    recipe = demo_recipe(
        f"model.quantization={quantization}", f"model.double_quant={str(double_quant).lower()}"
    )
    model, _ = build_tiny(recipe.model, seed=0)
    full = {name: module.weight.numel() for name, module in language_linears(model)}
    before = weight_bytes(model)
    apply_quantization(model, recipe.model)
    for name, weights in full.items():
        layer = model.get_submodule(name)
        assert isinstance(layer, bnb.nn.Linear4bit) and isinstance(layer.weight, bnb.nn.Params4bit), name
        assert layer.weight.quant_type == quantization and layer.weight.compress_statistics == double_quant
        assert layer.weight.dtype == torch.uint8 and layer.weight.numel() * 2 == weights  # two weights a byte
        assert layer.compute_dtype == torch.float32  # null quant_compute_dtype: model.dtype
    # The CLIP tower, the projector, the embeddings and lm_head keep their float32 weights.
    kept = [
        name
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and not isinstance(m, bnb.nn.Linear4bit)
    ]
    assert kept and all("vision_embed_tokens" in name or name == "lm_head" for name in kept)
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if "vision_embed_tokens" in n)
    after = weight_bytes(model)
    linear_bytes = 4 * sum(full.values())
    assert after["other"] == before["total"] - linear_bytes
    # 4 bits a weight plus one scale per 64 (fp32: 0.5 bit; double-quantised: 8 bits + an fp32 per 256 blocks).
    assert linear_bytes / 8 < after["quantized"] < linear_bytes / 8 * (1.14 if double_quant else 1.17)
    assert trainable_counts(model)["language"]["total"] == sum(
        p.numel()
        for n, p in build_tiny(recipe.model, seed=0)[0].named_parameters()
        if "vision_embed_tokens" not in n
    )


def test_int8_layers_hold_int8_weights():
    model, _ = build_tiny(demo_recipe().model, seed=0)
    shapes = {name: module.weight.shape for name, module in language_linears(model)}
    quantize_language_model_(model, "int8")
    for name, shape in shapes.items():
        layer = model.get_submodule(name)
        assert (
            isinstance(layer, bnb.nn.Linear8bitLt)
            and layer.weight.dtype == torch.int8
            and layer.weight.shape == shape
        )
    assert model.is_loaded_in_8bit


def test_an_eval_pass_does_not_repack_the_4bit_weights():
    """bitsandbytes repacks a 4-bit weight for inference on AVX512-BF16 CPUs the first time it runs in eval mode
    without gradients; the layers here must keep their training layout (models/quantization.py)."""
    recipe = demo_recipe("model.quantization=nf4")
    model, _ = build_tiny(recipe.model, seed=0)
    apply_quantization(model, recipe.model).eval()
    layer = model.get_submodule(language_linears(build_tiny(recipe.model, seed=0)[0])[0][0])
    packed = layer.weight.data.clone()
    with torch.no_grad():
        model(input_ids=torch.tensor([[1, 5, 6, 7]]))
    assert torch.equal(layer.weight.data, packed) and not getattr(
        layer.weight.quant_state, "packing_format_for_cpu", False
    )
    assert layer.weight.quant_state.nested  # double quantisation kept


# ------------------------------------------------------------------------------------------------ SFT


def test_qlora_sft_learns_and_beats_its_base(qlora_sft):
    losses = [h["loss"] for h in history(qlora_sft, "sft")]
    assert sum(losses[-3:]) / 3 < 0.6 * losses[0], losses
    assert exact_match(qlora_sft, "sft") > exact_match(qlora_sft, "base") + 0.05


def test_the_adapter_applies_to_the_quantized_and_to_the_original_base(qlora_sft, tmp_path):
    recipe = load_recipe(qlora_sft / "recipe.resolved.yaml")
    plan = ModelPlan(weights=stage_weights(qlora_sft, "sft", recipe), stage="sft")

    def score(model_recipe):
        model, processor = load_planned(plan, model_recipe)
        out = tmp_path / model_recipe.model.quantization
        return evaluate_stage(
            "sft", model, processor, recipe.eval, out, model_id_for_cache="x", data=recipe.data
        )["synthetic"]["exact_match"], model

    quantized, model = score(recipe)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    assert quantized == exact_match(qlora_sft, "sft")  # reloaded as trained: the same answers
    original, model = score(replace(recipe, model=replace(recipe.model, quantization="none")))
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    assert original > exact_match(qlora_sft, "base") + 0.05


@pytest.mark.parametrize(
    "quantization, optimizer", [("nf4", "adamw"), ("nf4", "adamw_8bit"), ("int8", "adamw")]
)
def test_qlora_stop_and_resume_ends_with_the_same_adapter(quantization, optimizer, synthetic, tmp_path):
    settings = dict(max_steps=4, checkpoint_every=2, optimizer=optimizer)
    extra = [f"model.quantization={quantization}"]
    straight = run_stage(
        "sft", [*small_overrides(tmp_path / "straight", synthetic, "sft", **settings), *extra]
    )
    interrupted = [*small_overrides(tmp_path / "resumed", synthetic, "sft", **settings), *extra]
    with pytest.raises(Preempted):
        run_stage("sft", interrupted, stop_after_step=2)
    run_stage("sft", [*interrupted, "train.resume=true"])
    assert_same_adapter(adapter(straight, "sft"), adapter(tmp_path / "resumed", "sft"), rel=1e-6)
    assert history(straight, "sft")[-1]["loss"] == pytest.approx(
        history(tmp_path / "resumed", "sft")[-1]["loss"], rel=1e-5
    )


@pytest.mark.slow  # launches 2 processes
@pytest.mark.parametrize("deepspeed", [False, True], ids=["ddp", "zero2"])
def test_two_processes_on_a_4bit_base_equal_one_with_twice_the_accumulation(deepspeed, synthetic, tmp_path):
    extra = ["model.quantization=nf4"]
    one = run_stage(
        "sft",
        [*small_overrides(tmp_path / "one", synthetic, "sft", micro_batch_size=2, grad_accum=4), *extra],
    )
    launch_two_processes(
        "sft",
        [*small_overrides(tmp_path / "two", synthetic, "sft", micro_batch_size=2, grad_accum=2), *extra],
        deepspeed=deepspeed,
    )
    for x, y in zip(history(one, "sft"), history(tmp_path / "two", "sft"), strict=True):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-4)
    assert_same_adapter(adapter(one, "sft"), adapter(tmp_path / "two", "sft"))


# ------------------------------------------------------------------------------------------------ optimizers


@pytest.mark.parametrize("language", ["lora", "full"])
def test_the_8bit_optimizer_trains_with_8bit_states(language, synthetic, tmp_path):
    run = run_stage(
        "sft",
        [
            *small_overrides(
                tmp_path / "run",
                synthetic,
                "sft",
                max_steps=12,
                micro_batch_size=16,
                grad_accum=1,
                optimizer="adamw_8bit",
                checkpoint_every=12,
            ),
            f"model.language={language}",
            "export.adapter=false",
            "train.lr=1.0e-3",
        ],
    )
    losses = [h["loss"] for h in history(run, "sft")]
    assert sum(losses[-3:]) / 3 < 0.7 * losses[0], losses
    from safetensors.torch import load_file

    from train.core.checkpoint import OPTIMIZER_TENSORS

    tensors = load_file(str(next((run / "sft" / "checkpoints").glob("step-*")) / OPTIMIZER_TENSORS))
    # bitsandbytes' quant state; parameters under its min_8bit_size keep 32-bit moments
    eight_bit = [k for k, v in tensors.items() if k.endswith("/state1") and v.dtype == torch.uint8]
    assert eight_bit and all(tensors[k[: -len("state1")] + "state2"].dtype == torch.uint8 for k in eight_bit)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the paged optimizer runs where CUDA is")
def test_the_paged_optimizer_is_refused_without_cuda_naming_the_one_that_runs():
    train = demo_recipe("train.optimizer=paged_adamw_8bit").train
    with pytest.raises(RuntimeError, match=r"paged_adamw_8bit.*no CUDA device.*train\.optimizer: adamw_8bit"):
        optim.make_optimizer([{"params": [nn.Parameter(torch.zeros(4))], "lr": 1e-3}], train)


def test_the_optimizer_choices_equal_the_implemented_ones():
    import typing

    from config import schema
    from models.quantization import QUANTIZATIONS

    assert typing.get_args(schema.Optimizer) == optim.OPTIMIZERS
    assert typing.get_args(schema.Quantization) == ("none", *QUANTIZATIONS)


# ------------------------------------------------------------------------------------------------ DPO


def test_dpo_on_a_quantized_sft_model_starts_at_log_2(qlora_sft, synthetic, tmp_path):
    """DPO from the QLoRA SFT run: the SFT adapter merged into the float32 base, then quantised; a fresh adapter on
    top, its reference the same network with it disabled, so the first step's loss is log 2."""
    overrides = [
        *small_overrides(tmp_path / "dpo", synthetic, "dpo", max_steps=3),
        "model.quantization=nf4",
        f"dpo.from_sft={qlora_sft}",
    ]
    run = run_stage("dpo", overrides)
    first = history(run, "dpo")[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert all(math.isfinite(h["loss"]) and h["grad_norm"] > 0 for h in history(run, "dpo"))
    start = json.loads((run / "dpo" / "start.json").read_text())
    assert str(qlora_sft) in json.dumps(start)
    model, _ = load_weights(
        stage_weights(run, "dpo", load_recipe(run / "recipe.resolved.yaml")),
        load_recipe(run / "recipe.resolved.yaml").model,
    )
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules()) == len(
        language_linears(build_tiny(demo_recipe().model, seed=0)[0])
    )


# ------------------------------------------------------------------------------------------------ export


def test_merged_exports_into_the_original_and_into_the_quantized_base(qlora_sft):
    recipe = load_recipe(qlora_sft / "recipe.resolved.yaml")
    weights = stage_weights(qlora_sft, "sft", recipe)
    section = replace(recipe.model, attn_implementation="sdpa")
    trained, _ = load_planned(ModelPlan(weights=weights, stage="sft"), recipe)  # the 4-bit base + the adapter
    as_trained, _ = export.merge_into_quantized(weights, section)
    original, _ = load_weights(weights, replace(section, quantization="none"), dtype="float32")
    ids = torch.tensor([[1, *range(5, 60)]])
    with torch.no_grad():
        logits = {
            name: m.eval()(input_ids=ids).logits
            for name, m in [("trained", trained), ("as_trained", as_trained), ("original", original)]
        }
    # Merging into the dequantised 4-bit weights reproduces the trained model; the original base differs by the
    # rounding the adapter was trained against.
    assert (logits["as_trained"] - logits["trained"]).abs().max() < 1e-4
    assert (logits["original"] - logits["trained"]).abs().max() > 100 * (
        logits["as_trained"] - logits["trained"]
    ).abs().max()

    written = export.export_stage(qlora_sft, "sft", "float32")  # the default: the original base
    reloaded = Phi3VForCausalLM.from_pretrained(str(written), dtype=torch.float32)
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in reloaded.modules())
    with torch.no_grad():
        assert torch.allclose(reloaded.eval()(input_ids=ids).logits, logits["original"], atol=1e-4)


def test_dequantizing_gives_back_the_weights_the_4bit_layers_compute_with():
    recipe = demo_recipe("model.quantization=nf4")
    model, _ = build_tiny(recipe.model, seed=0)
    apply_quantization(model, recipe.model).eval()
    ids = torch.tensor([[1, *range(5, 40)]])
    with torch.no_grad():
        quantized = model(input_ids=ids).logits
        dequantize_language_model_(model)
        assert not any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
        assert torch.allclose(model(input_ids=ids).logits, quantized, atol=1e-5)


# ------------------------------------------------------------------------------------------------ the recipe


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["model.quantization=nf4", "model.language=full", "export.adapter=false"],
            r"model\.quantization = 'nf4': model\.language is full.*Fix: set model\.language: lora",
        ),
        (
            [
                "model.quantization=nf4",
                "model.dtype=bfloat16",
                "train.precision=bf16",
                "model.quant_compute_dtype=float32",
                "model.attn_implementation=flash_attention_2",
            ],
            r"model\.quant_compute_dtype = 'float32': flash-attention runs only in 16 bits.*Fix: set model\.quant_compute_dtype: bfloat16",
        ),
    ],
)
def test_combinations_that_cannot_work_are_refused_naming_the_keys(overrides, message):
    with pytest.raises(RecipeError, match=message):
        demo_recipe(*overrides)


def test_quantization_keys_without_4bit_weights_are_reported_as_ignored():
    with pytest.warns(Warning, match="model.double_quant = False is ignored: it applies to 4-bit weights"):
        demo_recipe("model.double_quant=false")
    with warnings.catch_warnings():  # a resolved recipe spells every key, defaults included: no warning
        warnings.simplefilter("error")
        parse_recipe(recipe_to_dict(demo_recipe()))


def test_full_training_of_a_quantized_model_is_refused_in_code_too():
    recipe = demo_recipe("model.quantization=nf4")
    model, _ = build_tiny(recipe.model, seed=0)
    with pytest.raises(ValueError, match="model.language = 'full' on a quantised language model"):
        configure_trainable(
            apply_quantization(model, recipe.model), replace(recipe.model, language="full"), recipe.lora
        )


def test_the_qlora_recipe_dry_runs_with_its_language_model_in_4_bits():
    summary = dry_run(load_recipe(REPO / "recipes" / "chartqa_qlora.yaml"))
    assert summary["model"]["quantization"] == "nf4"
    for stage in summary["stages"].values():
        assert stage["weight_bytes"]["quantized"] > 0
        assert stage["parameters"]["language"]["trainable"] > 0


def test_a_quantized_dpo_step_zero_is_log_2_on_a_batch(synthetic):
    """The DPO loss on one batch of the quantised policy with a fresh adapter (no training loop)."""
    from data.loaders import load_samples, loader_factory, plan
    from data.sources import SkipCounter
    from train.core.trainable import dpo_parts
    from train.preference.stage_loss import DPOLoss

    recipe = demo_recipe(f"data.train.0.path={synthetic}", "model.quantization=nf4", "dpo.sft_weight=0.0")
    model, processor = build_tiny(recipe.model, seed=0)
    samples = load_samples(
        recipe.data.train,
        "dpo",
        recipe.data,
        seed=0,
        skips=SkipCounter(),
        main_first=Accelerator(cpu=True).main_process_first,
    )
    make_loader, _ = loader_factory(
        plan(samples[:8], processor, recipe.data, SkipCounter()),
        processor,
        recipe.data,
        stage="dpo",
        micro_batch_size=4,
        seed=0,
        num_replicas=1,
        rank=0,
    )
    batch = next(b for b in make_loader(0) if "pixel_values" in b)
    policy = configure_trainable(
        apply_quantization(model, recipe.model), dpo_parts(recipe.model), recipe.lora
    )
    loss, metrics = DPOLoss(recipe, Accelerator(cpu=True), share_features=True)(policy, batch)
    assert loss.item() / (batch["input_ids"].shape[0] // 2) == pytest.approx(math.log(2), abs=1e-6)
    loss.backward()
    trained = {n for n, p in policy.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert trained and all("lora_B" in n for n in trained)


def test_transformers_bitsandbytes_config_quantizes_the_same_layers_to_the_same_numbers(tmp_path):
    """`models.quantization.bitsandbytes_config`, for users who load the base themselves, is equivalent to the
    in-place quantisation the stages use: the same layers, the same bytes, the same logits."""
    from models.quantization import bitsandbytes_config

    recipe = demo_recipe("model.quantization=nf4")
    model, _ = build_tiny(recipe.model, seed=0)
    model.save_pretrained(tmp_path)
    loaded = Phi3VForCausalLM.from_pretrained(
        str(tmp_path),
        dtype=torch.float32,
        quantization_config=bitsandbytes_config("nf4", double_quant=True, compute_dtype=torch.float32),
    )
    ours = apply_quantization(model, recipe.model)

    def quantized(m):
        return sorted(n for n, module in m.named_modules() if isinstance(module, bnb.nn.Linear4bit))

    assert (
        quantized(loaded)
        == quantized(ours)
        == sorted(name for name, _ in language_linears(build_tiny(recipe.model, seed=0)[0]))
    )
    assert weight_bytes(loaded) == weight_bytes(ours)
    ids = torch.tensor([[1, *range(5, 40)]])
    with torch.no_grad():  # train mode: no CPU inference repacking in either
        assert torch.equal(loaded.train()(input_ids=ids).logits, ours.train()(input_ids=ids).logits)
