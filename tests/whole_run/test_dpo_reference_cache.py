"""Precomputed reference log-probs: same training as the live reference pass, reused by later runs, refused on
resume when the inputs changed; and the mDPO term on a real run."""

import json

import pytest
from safetensors.torch import load_file, save_file

from rundir.weights import write_weights_manifest

from ..run_helpers import adapter, assert_same_adapter, history, run_stage, small_overrides


def test_precomputed_reference_trains_like_the_live_one_and_is_reused(synthetic, tmp_path):
    live = run_stage(
        "dpo", [*small_overrides(tmp_path / "live", synthetic, "dpo"), "dpo.precompute_ref_logps=false"]
    )
    cached = run_stage(
        "dpo", small_overrides(tmp_path / "cached", synthetic, "dpo")
    )  # precomputed by default
    assert_same_adapter(adapter(live, "dpo"), adapter(cached, "dpo"))
    [table] = list((tmp_path / ".cache" / "ref_logps").iterdir())
    written = table.stat().st_mtime_ns
    again = run_stage(
        "dpo", [*small_overrides(tmp_path / "again", synthetic, "dpo"), "dpo.precompute_ref_logps=true"]
    )
    assert table.stat().st_mtime_ns == written  # reused, not recomputed
    assert history(again, "dpo")[-1]["loss"] == pytest.approx(history(cached, "dpo")[-1]["loss"], rel=1e-6)
    assert json.loads((cached / "dpo" / "ref_logps.json").read_text())["pairs"] > 0


def test_resuming_with_other_data_is_refused(synthetic, tmp_path):
    overrides = [
        *small_overrides(tmp_path / "run", synthetic, "dpo", checkpoint_every=1),
        "dpo.precompute_ref_logps=true",
    ]
    run_stage("dpo", overrides)
    changed = [*overrides, "train.resume=true", "data.train.0.limit=32"]
    with pytest.raises(ValueError, match=r"data, pairs changed since"):
        run_stage("dpo", changed)


def test_a_changed_projector_alone_misses_the_cache(synthetic, tmp_path):
    """The SFT adapter's projector lives in full_weights.safetensors, beside the LoRA: changing only it is another
    reference model, so another cache key (and another start record)."""
    sft = run_stage("sft", small_overrides(tmp_path / "sft", synthetic, "sft", max_steps=1))
    dpo = [f"dpo.from_sft={sft}", "dpo.precompute_ref_logps=true", "train.max_steps=1"]
    first = run_stage("dpo", [*small_overrides(tmp_path / "first", synthetic, "dpo"), *dpo])
    tables = tmp_path / ".cache" / "ref_logps"
    assert len(list(tables.iterdir())) == 1

    folder = sft / "sft" / "adapter"
    lora = (folder / "adapter_model.safetensors").read_bytes()
    full = load_file(folder / "full_weights.safetensors")
    assert full and all("img_projection" in name for name in full), sorted(full)
    save_file(
        {name: tensor + 0.01 for name, tensor in full.items()}, str(folder / "full_weights.safetensors")
    )
    write_weights_manifest(folder)  # as an SFT run that trained another projector would
    second = run_stage("dpo", [*small_overrides(tmp_path / "second", synthetic, "dpo"), *dpo])
    assert (folder / "adapter_model.safetensors").read_bytes() == lora
    assert len(list(tables.iterdir())) == 2  # missed: computed for the new projector
    before, after = (
        json.loads((run / "dpo" / "start.json").read_text())["weights_sha256"] for run in (first, second)
    )
    assert before[0]["adapter_model.safetensors"] == after[0]["adapter_model.safetensors"]
    assert before[0]["full_weights.safetensors"] != after[0]["full_weights.safetensors"]


def test_mdpo_term_trains(synthetic, tmp_path):
    run = run_stage("dpo", [*small_overrides(tmp_path / "mdpo", synthetic, "dpo"), "dpo.mdpo_weight=1.0"])
    steps = history(run, "dpo")
    assert all("loss/mdpo" in h for h in steps)
    assert steps[0]["loss/mdpo"] == pytest.approx(0.6931, abs=1e-3)  # policy == reference at step 0: log 2


def test_a_dpo_only_run_scores_the_base_and_its_resume_does_not_score_it_again(
    synthetic, tmp_path, monkeypatch
):
    from train.core import callbacks

    run = tmp_path / "run"
    overrides = [
        *small_overrides(run, synthetic, "dpo", max_steps=2, checkpoint_every=1),
        "stages=[dpo,eval]",
        "eval.limit=4",
    ]
    run_stage("dpo", overrides)
    results = json.loads((run / "eval" / "results.json").read_text())
    scored = {stage for metrics in results.values() for values in metrics.values() for stage in values}
    assert scored == {"base", "dpo"}, results

    hooks = []
    real = callbacks.run_eval_hook
    monkeypatch.setattr(
        callbacks,
        "run_eval_hook",
        lambda stage, *args, **kwargs: (hooks.append(stage), real(stage, *args, **kwargs))[1],
    )
    run_stage("dpo", [*overrides, "train.resume=true"])
    assert hooks == ["dpo"]  # the base was scored and logged by the run this one continues
