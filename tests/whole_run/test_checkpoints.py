"""Checkpoints and the loop that never lies: lean safetensors + JSON checkpoints that never unpickle, a stop on
SIGTERM that resumes to the uninterrupted adapter, honest resume, the divergence guard, durable replacement."""

import json
import os
import pickle
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from config import RecipeError, load_recipe
from rundir.weights import write_folder_manifest
from train import sft
from train.core import callbacks, checkpoint
from train.core.checkpoint import Checkpointer, ResumeRefused, check_resume, recover_replaced
from train.core.loop import Diverged, Interrupted

from ..run_helpers import DEMO, adapter, assert_same_adapter, run_stage, small_overrides


class Payload:
    """Unpickling this creates `marker`: what a planted checkpoint file could do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def signal_at(step_to_signal: int, signum: int):
    """Replaces callbacks.stop_after: sends `signum` to this process after that step (and its checkpoint)."""

    def factory(step):
        def on_step(state, model) -> None:
            if state.step == step_to_signal:
                os.kill(os.getpid(), signum)

        return on_step

    return factory


def test_sigterm_stops_with_a_lean_pickle_free_checkpoint_that_resumes_exactly(
    synthetic, tmp_path, monkeypatch
):
    settings = dict(max_steps=4, checkpoint_every=100)
    straight = run_stage("sft", small_overrides(tmp_path / "straight", synthetic, "sft", **settings))
    run = tmp_path / "resumed"
    overrides = small_overrides(run, synthetic, "sft", **settings)
    monkeypatch.setattr(callbacks, "stop_after", signal_at(2, signal.SIGTERM))
    with pytest.raises(Interrupted) as stopped:
        run_stage("sft", overrides, stop_after_step=2)
    monkeypatch.undo()
    assert stopped.value.exit_code == 128 + signal.SIGTERM and stopped.value.step == 2
    assert f"train.resume=true output_dir={run}" in str(stopped.value)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored
    folder = run / "sft" / "checkpoints" / "step-00000002"
    assert not (run / "sft" / "adapter").exists()

    # Lean: safetensors and JSON only, the trainable parameters (LoRA, projector) and no frozen weight.
    names = {p.name for p in folder.iterdir()}
    assert all(n.endswith((".json", ".safetensors")) for n in names), names
    trained = load_file(folder / "trainable.safetensors")
    assert trained and all("lora_" in k or "img_projection" in k for k in trained), sorted(trained)[:5]
    size = sum(p.stat().st_size for p in folder.iterdir())
    adapter_size = (straight / "sft" / "adapter" / "adapter_model.safetensors").stat().st_size
    assert size <= 3 * adapter_size + 1_000_000, (size, adapter_size)

    # Planted pickles (accelerate's file names) are never loaded: no code runs, resume ignores them.
    marker = tmp_path / "pwned"
    for name in ("custom_checkpoint_0.pkl", "optimizer.bin", "random_states_0.pkl"):
        (folder / name).write_bytes(pickle.dumps(Payload(marker)))
    run_stage("sft", [*overrides, "train.resume=true"])
    assert not marker.exists()
    assert_same_adapter(adapter(straight, "sft"), adapter(run, "sft"), rel=1e-6)


def test_resume_refuses_changes_unless_allowed_and_never_rewrites_the_recipe_it_refused(synthetic, tmp_path):
    run = tmp_path / "run"
    overrides = small_overrides(run, synthetic, "sft", max_steps=2, checkpoint_every=1)
    run_stage("sft", overrides)
    resolved = (run / "recipe.resolved.yaml").read_bytes()

    changed = [*overrides, "train.resume=true", "train.lr=1.0e-3", "train.max_steps=3"]
    with pytest.raises(ResumeRefused) as refused:
        run_stage("sft", changed)
    message = str(refused.value)
    assert "train.lr: 0.002 -> 0.001" in message and "train.max_steps: 2 -> 3" in message
    assert "train.resume_allow_changes=[train.lr,train.max_steps]" in message
    assert (run / "recipe.resolved.yaml").read_bytes() == resolved

    # Other frozen weights under the same checkpoint: refused whatever is allowed.
    base = run / "base" / "model.safetensors"
    original = base.read_bytes()
    weights = load_file(base)
    key = next(k for k in weights if "embed_tokens" in k)
    weights[key] = weights[key] + 1.0
    save_file(weights, str(base), metadata={"format": "pt"})
    with pytest.raises(ResumeRefused, match="frozen weights differ"):
        run_stage("sft", [*changed, "train.resume_allow_changes=[train.lr,train.max_steps]"])
    assert (run / "recipe.resolved.yaml").read_bytes() == resolved
    base.write_bytes(original)

    run_stage("sft", [*changed, "train.resume_allow_changes=[train.lr,train.max_steps]"])
    record = json.loads((run / "sft" / "checkpoints" / "step-00000003" / "run.json").read_text())
    assert record["allowed_changes"] == [
        {
            "step": 2,
            "changes": {"train.lr": {"old": 0.002, "new": 0.001}, "train.max_steps": {"old": 2, "new": 3}},
        }
    ]
    assert "lr: 0.001" in (run / "recipe.resolved.yaml").read_text()


def test_divergence_stops_naming_the_step_and_saves_no_adapter(synthetic, tmp_path, capsys):
    run = tmp_path / "run"
    argv = [
        str(DEMO),
        *small_overrides(run, synthetic, "sft", max_steps=6, checkpoint_every=1),
        "train.lr=1.0e+8",
    ]
    with pytest.raises(SystemExit) as exited:
        sft.cli(argv)
    assert exited.value.code == 3
    err = capsys.readouterr().err
    assert "training diverged at step" in err and "lower train.lr" in err
    assert not (run / "sft" / "adapter").exists()
    for folder in checkpoint.checkpoints(run / "sft" / "checkpoints"):
        assert all(torch.isfinite(t).all() for t in load_file(folder / "trainable.safetensors").values())

    # skip: non-finite updates are dropped, until more than train.max_nonfinite_steps of them
    skipped = tmp_path / "skipped"
    with pytest.raises(Diverged, match=r"\(2 non-finite steps\)"):
        run_stage(
            "sft",
            [
                *small_overrides(
                    skipped,
                    synthetic,
                    "sft",
                    max_steps=8,
                    lr="1.0e+8",
                    on_nonfinite="skip",
                    max_nonfinite_steps=1,
                )
            ],
        )
    assert not (skipped / "sft" / "adapter").exists()


def test_resume_allow_changes_names_run_shaping_keys_only():
    with pytest.raises(
        RecipeError, match=r"train.resume_allow_changes.0 = 'train.log_every': no such run-shaping"
    ):
        load_recipe(DEMO, ["train.resume_allow_changes=[train.log_every]"])


def test_non_finite_recipe_numbers_are_refused():
    for value in (".inf", "-.inf", ".nan"):
        with pytest.raises(RecipeError, match="train.lr = "):
            load_recipe(DEMO, [f"train.lr={value}"])


def test_an_old_pickle_format_checkpoint_is_refused(tmp_path):
    folder = tmp_path / "step-00000002"
    folder.mkdir()
    (folder / "loop_state.json").write_text(json.dumps({"step": 2}))
    (folder / "custom_checkpoint_0.pkl").write_bytes(pickle.dumps(Payload(tmp_path / "pwned")))
    recipe = load_recipe(DEMO, [f"output_dir={tmp_path}", "train.resume=true"])
    with pytest.raises(ResumeRefused, match="pickle format, which is never loaded"):
        check_resume(recipe, "sft", tmp_path, world_size=1)
    assert not (tmp_path / "pwned").exists()


def test_a_same_step_checkpoint_is_replaced_only_once_its_replacement_is_complete(tmp_path, monkeypatch):
    final, staging = tmp_path / "step-00000004", tmp_path / ".tmp-step-00000004"
    for folder, text in ((final, "old"), (staging, "new")):
        folder.mkdir()
        (folder / "loop_state.json").write_text(text)
    saver = Checkpointer.__new__(Checkpointer)
    saver.directory = tmp_path
    real_replace, calls = os.replace, []

    def crash_on_second(src, dst):  # the old one moved aside, then a crash before the new one is in place
        calls.append(dst)
        if len(calls) == 2:
            raise OSError("simulated crash")
        real_replace(src, dst)

    monkeypatch.setattr(checkpoint.os, "replace", crash_on_second)
    with pytest.raises(OSError):
        saver._replace(staging, final)
    monkeypatch.undo()
    assert (tmp_path / ".old-step-00000004" / "loop_state.json").read_text() == "old"
    recover_replaced(tmp_path)
    assert (final / "loop_state.json").read_text() == "old"
    saver._replace(staging, final)
    assert (final / "loop_state.json").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000004"]


@pytest.mark.slow  # launches 2 processes, twice
def test_sigterm_to_one_of_two_ranks_stops_both_at_the_same_step_and_resumes(synthetic, tmp_path):
    """SIGTERM to rank 1 only: the flag is all-reduced, so rank 0 stops at the same step (no hang), the checkpoint is
    written, and resuming on 2 processes ends like one uninterrupted process with twice the accumulation."""
    import subprocess
    import sys
    import time

    psutil = pytest.importorskip("psutil")
    from ..run_helpers import REPO, launch_two_processes

    settings = dict(max_steps=10, checkpoint_every=1, keep_checkpoints=20, micro_batch_size=2)
    one = run_stage("sft", small_overrides(tmp_path / "one", synthetic, "sft", grad_accum=4, **settings))
    run = tmp_path / "two"
    overrides = small_overrides(run, synthetic, "sft", grad_accum=2, **settings)
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--main_process_port",
        str(29600 + os.getpid() % 1000),
        "--multi_gpu",
        str(REPO / "train" / "sft.py"),
        str(DEMO),
        *overrides,
    ]
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    launcher = subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 400
        while not (run / "sft" / "checkpoints" / "step-00000002").exists():
            assert launcher.poll() is None and time.monotonic() < deadline, "the run ended before step 2"
            time.sleep(0.05)
        rank1 = [
            p for p in psutil.Process(launcher.pid).children(recursive=True) if p.environ().get("RANK") == "1"
        ]
        assert len(rank1) == 1
        rank1[0].send_signal(signal.SIGTERM)
        out, err = launcher.communicate(timeout=300)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode != 0
    assert "stopped by SIGTERM after step" in err and f"train.resume=true output_dir={run}" in err, err[
        -3000:
    ]
    steps = [p.name for p in checkpoint.checkpoints(run / "sft" / "checkpoints")]
    assert len(steps) < 10 and not (run / "sft" / "adapter").exists(), steps
    launch_two_processes("sft", [*overrides, "train.resume=true"])
    assert_same_adapter(adapter(one, "sft"), adapter(run, "sft"))


def test_resume_names_a_cut_short_and_a_missing_file_and_continues_from_the_newest_intact_checkpoint(
    synthetic, tmp_path, caplog, capsys
):
    run = tmp_path / "run"
    overrides = small_overrides(run, synthetic, "sft", max_steps=4, checkpoint_every=1, keep_checkpoints=3)
    run_stage("sft", overrides)
    finished = adapter(run, "sft")
    folders = checkpoint.checkpoints(run / "sft" / "checkpoints")
    assert [p.name for p in folders] == ["step-00000002", "step-00000003", "step-00000004"]
    assert set(json.loads((folders[-1] / "manifest.json").read_text())["files"]) >= {
        "trainable.safetensors",
        "optimizer.safetensors",
        "loop_state.json",
        "run.json",
        "rng-0.json",
    }
    tensor = folders[2] / "trainable.safetensors"  # a disk that lied: the file cut short
    tensor.write_bytes(tensor.read_bytes()[: tensor.stat().st_size // 2])
    (folders[1] / "optimizer.safetensors").unlink()  # a copy that stopped

    with caplog.at_level("WARNING", logger="train.core.checkpoint"):
        run_stage("sft", [*overrides, "train.resume=true"])
    warned = caplog.text
    assert "trainable.safetensors in" in warned and "not the" in warned and "cut short" in warned, warned
    assert "optimizer.safetensors is missing from" in warned, warned
    names = sorted(p.name for p in (run / "sft" / "checkpoints").iterdir())
    assert ".failed-step-00000003" in names and ".failed-step-00000004" in names, names
    assert_same_adapter(finished, adapter(run, "sft"), rel=1e-6)  # steps 3 and 4 again, from step 2

    # Nothing intact: refused with the message alone (exit 2), each checkpoint named.
    for folder in checkpoint.checkpoints(run / "sft" / "checkpoints"):
        (folder / "loop_state.json").write_text("{}")
    with pytest.raises(SystemExit) as exited:
        sft.cli([str(DEMO), *overrides, "train.resume=true"])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and "no checkpoint there is intact" in err and "Traceback" not in err, err
    assert "step-00000002: loop_state.json in" in err and "bytes it was written with" in err, err


def test_a_file_planted_among_the_engines_pickles_fails_the_manifest_and_the_older_checkpoint_is_taken(
    tmp_path,
):
    """deepspeed/ (DeepSpeed's and FSDP's torch.save files) is closed: a file its manifest does not list is refused
    before anything there is unpickled, and resume falls back to the checkpoint before."""
    for step in (2, 4):
        folder = tmp_path / f"step-{step:08d}"
        (folder / "deepspeed").mkdir(parents=True)
        (folder / "deepspeed" / "random_states_0.pkl").write_bytes(b"written by this run")
        (folder / "loop_state.json").write_text(json.dumps({"step": step}))
        write_folder_manifest(folder)
    (tmp_path / "step-00000004" / "deepspeed" / "custom_checkpoint_0.pkl").write_bytes(
        pickle.dumps(Payload(tmp_path / "pwned"))
    )
    assert checkpoint.intact_checkpoint(tmp_path) == tmp_path / "step-00000002"
    assert (tmp_path / ".failed-step-00000004").is_dir() and not (tmp_path / "pwned").exists()
    (tmp_path / "step-00000002" / "deepspeed" / "random_states_0.pkl").write_bytes(b"written by intruder")
    with pytest.raises(
        ResumeRefused, match=r"step-00000002: deepspeed/random_states_0.pkl in .* sha256 differs"
    ):
        checkpoint.intact_checkpoint(tmp_path)
