"""Tracking and the report's training curves: what the loop counts, where the trackers write, every eval at its
step in TensorBoard's and W&B's own files, the SFT validation loss, and the curves drawn in eval/report.html."""

import json
import math
import os
import re
import struct
import time
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch

from config import load_recipe
from data.synthetic import DEMO_COUNTS, write_synthetic
from eval.curves import nice_ticks
from eval.report import render_report
from train.core.tracking import batch_tokens, make_trackers

from ..run_helpers import DEMO, run_stage, small_overrides

# ------------------------------------------------------------------------------------------------ fast


def test_batch_tokens_counts_every_unpadded_token_and_the_supervised_ones():
    padded = {
        "input_ids": torch.zeros(2, 5, dtype=torch.long),
        "attention_mask": torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]),
        "labels": torch.tensor([[-100, -100, 7, 8, -100], [-100, 9, -100, -100, -100]]),
    }
    assert batch_tokens(padded) == (8, 3)  # padding left out; supervised = labels after the shift
    packed = {
        "input_ids": torch.zeros(1, 6, dtype=torch.long),
        "labels": torch.tensor([[-100, 1, 2, -100, -100, 3]]),
    }  # no mask: a pack has no padding
    assert batch_tokens(packed) == (6, 3)


def test_validation_loss_is_per_supervised_token_whatever_the_batch_size(tmp_path):
    from accelerate import Accelerator

    from train.core.losses import sft_loss_sum, supervised_tokens
    from train.core.model_loading import build_tiny
    from train.core.validation_loss import ValidationLoss

    synthetic = tmp_path / "synthetic"
    write_synthetic(synthetic, seed=0, **DEMO_COUNTS)

    def validation(batch_size: int) -> ValidationLoss:
        recipe = load_recipe(
            DEMO,
            small_overrides(
                tmp_path / f"run{batch_size}", synthetic, "sft", max_steps=4, micro_batch_size=batch_size
            )
            + ["eval.every_steps=3", "data.eval.0.limit=7"],
        )
        return ValidationLoss(
            recipe, processor, tmp_path / f"run{batch_size}", Accelerator(cpu=True), total_steps=4
        )

    recipe = load_recipe(DEMO, [f"data.train.0.path={synthetic}"])
    model, processor = build_tiny(recipe.model, seed=0)
    model.eval()
    one, five = validation(1), validation(5)
    with torch.no_grad():
        by_sample = [sft_loss_sum(model, batch)[0].item() for batch in one.loader]
    tokens = sum(supervised_tokens(batch) for batch in one.loader)
    expected = sum(by_sample) / tokens
    assert len(by_sample) == 7 and len(list(five.loader)) == 2  # every sample once, the short last batch kept
    assert five.evaluate(model, 3)["loss"] == pytest.approx(expected, rel=1e-5)
    assert one.evaluate(model, 3) == {
        "step": 3,
        "loss": pytest.approx(expected, rel=1e-5),
        "tokens": tokens,
        "samples": 7,
    }
    for step in (1, 2, 3, 4):  # the callback evaluates at every eval.every_steps and at the last step
        five(type("State", (), {"step": step})(), model)
    assert [r["step"] for r in five.records()] == [3, 4]  # step 3 evaluated twice: one record


def test_trackers_write_inside_the_run_directory(tmp_path):
    recipe = load_recipe(DEMO, ["logging.report_to=[tensorboard,wandb]", "logging.run_name=exp"])
    tensorboard, wandb = make_trackers(recipe, tmp_path / "run", "dpo")
    assert Path(tensorboard.logging_dir_param) / tensorboard.run_name == tmp_path / "run/logs/tensorboard/dpo"
    assert wandb.run_name == "phi3v-tune"  # the W&B project
    assert wandb.init_kwargs == {
        "name": "exp/dpo",
        "group": "exp",
        "job_type": "dpo",
        "dir": str(tmp_path / "run/logs"),
    }
    assert "wandb/" in (Path(__file__).resolve().parents[2] / ".gitignore").read_text().split()


def test_a_resumed_stage_continues_its_wandb_run(tmp_path, monkeypatch):
    """The stage's W&B run id is kept in the run directory: a resume continues that run (resume="allow"); a new start
    of the stage (no train.resume) begins another."""
    import wandb
    from accelerate import Accelerator

    from rundir.layout import wandb_id_file
    from train.core import tracking

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "run"
    ids = []
    try:
        for resume in ("false", "true", "false"):
            # W&B names an offline run's folder by the second it started: two starts in one second share a folder
            # (CI saw 1 folder where 2 were expected), so each start waits for a new second.
            time.sleep(1.05 - time.time() % 1)
            recipe = load_recipe(
                DEMO, ["logging.report_to=[wandb]", f"train.resume={resume}", f"output_dir={run}"]
            )
            accelerator = Accelerator(log_with=make_trackers(recipe, run, "sft"), cpu=True)
            tracking.start(accelerator, recipe, run, "sft")
            [tracker] = accelerator.trackers
            assert tracker.init_kwargs["resume"] == "allow" and tracker.run.id == tracker.init_kwargs["id"]
            ids.append(tracker.run.id)
            assert wandb_id_file(run, "sft").read_text().strip() == ids[-1]
            accelerator.end_training()
    finally:
        wandb.teardown()  # W&B keeps its settings in a process-wide singleton: leave none to later tests
    assert ids[0] == ids[1] != ids[2]
    assert len(list((run / "logs" / "wandb").glob(f"offline-run-*-{ids[0]}"))) == 2  # one W&B run, continued


def test_nice_ticks_cover_the_range_with_round_steps():
    assert nice_ticks(0.0, 1.0) == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert nice_ticks(3.0, 47.0) == [0.0, 10.0, 20.0, 30.0, 40.0, 50.0]
    ticks = nice_ticks(2e-4, 2e-4)  # a constant series still gets an axis
    assert ticks[0] < 2e-4 < ticks[-1]


class SvgParser(HTMLParser):
    """The report's charts: {(stage, metric): {"series": {label: points}, "texts": [...]}} and every tag seen."""

    def __init__(self):
        super().__init__()
        self.charts, self.tags, self._chart = {}, set(), None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.add(tag)
        if tag == "svg":
            self._chart = self.charts.setdefault(
                (attrs["data-stage"], attrs["data-metric"]), {"series": {}, "texts": []}
            )
        elif tag == "g" and self._chart is not None and "data-series" in attrs:
            self._chart["series"][attrs["data-series"]] = int(attrs["data-points"])

    def handle_endtag(self, tag):
        if tag == "svg":
            self._chart = None

    def handle_data(self, data):
        if self._chart is not None and data.strip():
            self._chart["texts"].append(data.strip())


def write_summaries(run_dir: Path) -> None:
    sft = {
        "steps": 20,
        "history": [
            {"step": s, "loss": 3.0 / s, "lr": 1e-3 * (1 - s / 20), "grad_norm": 1.0 + s % 3}
            for s in range(2, 21, 2)
        ],
        "validation": [{"step": 10, "loss": 0.5}, {"step": 20, "loss": 0.4}],
    }
    sft["history"][3]["grad_norm"] = float("nan")  # a gap, not a broken chart
    dpo = {
        "steps": 6,
        "history": [
            {
                "step": s,
                "loss": 0.69 - 0.05 * s,
                "lr": 5e-4,
                "grad_norm": 0.5,
                "rewards/margins": 0.1 * s,
                "rewards/accuracies": min(1.0, 0.5 + 0.1 * s),
            }
            for s in range(1, 7)
        ],
    }
    for stage, summary in (("sft", sft), ("dpo", dpo)):
        (run_dir / stage).mkdir(parents=True)
        (run_dir / stage / "summary.json").write_text(json.dumps(summary))


def test_report_draws_each_stages_training_curves_as_inline_svg(tmp_path):
    write_summaries(tmp_path)
    page = render_report(tmp_path)
    parsed = SvgParser()
    parsed.feed(page)
    assert set(parsed.charts) == {
        ("sft", "loss"),
        ("sft", "lr"),
        ("sft", "grad_norm"),
        ("dpo", "loss"),
        ("dpo", "lr"),
        ("dpo", "grad_norm"),
        ("dpo", "rewards/margins"),
        ("dpo", "rewards/accuracies"),
    }
    assert parsed.charts[("sft", "loss")]["series"] == {"train": 10, "validation": 2}
    assert parsed.charts[("sft", "grad_norm")]["series"] == {"grad norm": 9}  # the NaN left out
    assert parsed.charts[("dpo", "rewards/margins")]["series"] == {"margin": 6}
    for (stage, _), chart in parsed.charts.items():
        assert "step" in chart["texts"]  # x axis label; y label and title follow
        assert any(text.startswith(stage) for text in chart["texts"])  # the <title>: "<stage> <chart title>"
    assert "Reward margin (chosen - rejected)" in parsed.charts[("dpo", "rewards/margins")]["texts"]
    assert {"polyline", "circle", "line", "text"} <= parsed.tags
    # Readable offline: no script, no link or external reference besides the SVG namespace.
    assert "script" not in parsed.tags and "link" not in parsed.tags
    assert set(re.findall(r"https?://[^\"' ]+", page)) <= {"http://www.w3.org/2000/svg"}
    assert page.index('id="training-curves"') < page.index("No task has been scored yet.")


def test_report_without_summaries_has_no_curves(tmp_path):
    assert "training-curves" not in render_report(tmp_path)


# ------------------------------------------------------------------------------------------------ a short demo


def wandb_records(path: Path):
    """The protobuf records of a W&B transaction log (`run-<id>.wandb`). wandb 0.31 ships no Python reader (its
    `sdk.internal.datastore` is gone with the Python backend): the file is a LevelDB-style log, a 7-byte header
    (":W&B", magic, version) then 32 KiB blocks of records, each crc32 (4), length (2, little-endian), type (1:
    full, 2: first, 3: middle, 4: last) and data; each record's data is a `wandb_internal_pb2.Record`."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", path
    position, pending = 7, b""
    while position + 7 <= len(data):
        left = 32768 - position % 32768
        if left < 7:  # a block's tail too short for a record header is padding
            position += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[position : position + 7])
        payload = data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending + payload)
            pending = b""
            yield record
        elif kind in (2, 3):
            pending += payload
        else:
            break


def wandb_run(path: Path) -> tuple[dict, dict[int, dict]]:
    """(the run's name, group, job type; {step: logged values}) from a W&B offline run's transaction log."""
    run, steps = {}, {}
    for record in wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = {
                "name": record.run.display_name,
                "group": record.run.run_group,
                "job_type": record.run.job_type,
            }
        elif kind == "history":
            values = {
                item.key or "/".join(item.nested_key): json.loads(item.value_json)
                for item in record.history.item
            }
            values = {
                key: value for key, value in values.items() if not key.startswith("_")
            }  # W&B's _step, _runtime
            steps.setdefault(record.history.step.num, {}).update(values)
    return run, steps


def tensorboard_scalars(folder: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    events.Reload()
    return {
        tag: {event.step: event.value for event in events.Scalars(tag)} for tag in events.Tags()["scalars"]
    }


SFT_STEPS, DPO_STEPS, EVERY = 4, 4, 2


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory):
    """SFT -> DPO -> eval on a few steps, scored every 2 steps, logged to TensorBoard and W&B (offline) at once."""
    root = tmp_path_factory.mktemp("tracked")
    synthetic = root / "synthetic"
    write_synthetic(synthetic, seed=0, **DEMO_COUNTS)
    overrides = small_overrides(root / "run", synthetic, "sft", max_steps=SFT_STEPS) + [
        "stages=[sft,dpo,eval]",
        f"dpo.max_steps={DPO_STEPS}",
        "eval.limit=6",
        f"eval.every_steps={EVERY}",
        "eval.batch_size=6",
        "logging.report_to=[tensorboard,wandb]",
        "logging.run_name=tracked",
    ]
    saved = {key: os.environ.get(key) for key in ("WANDB_MODE", "WANDB_SILENT")}
    os.environ.update(WANDB_MODE="offline", WANDB_SILENT="true")
    cwd = Path.cwd()
    os.chdir(root)  # W&B must not write into the working directory
    try:
        run_stage("sft", overrides)
        run_stage("dpo", overrides)
    finally:
        os.chdir(cwd)
        for key, value in saved.items():
            os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)
    assert not (root / "wandb").exists()
    return root / "run"


def expected_logs(run_dir: Path) -> dict:
    results = json.loads((run_dir / "eval" / "results.json").read_text())["synthetic"]["exact_match"]
    validation = json.loads((run_dir / "sft" / "summary.json").read_text())["validation"]
    return {"results": results, "validation": {v["step"]: v["loss"] for v in validation}}


@pytest.mark.slow  # two short stages with evals and two trackers: ~30 s on 2 cores
def test_tensorboard_shows_every_eval_at_its_step_and_the_validation_loss(tracked_run):
    expected = expected_logs(tracked_run)
    sft = tensorboard_scalars(tracked_run / "logs" / "tensorboard" / "sft")
    dpo = tensorboard_scalars(tracked_run / "logs" / "tensorboard" / "dpo")
    # SFT's run: the base at step 0, every 2 steps, SFT's own score at its last step; DPO's run on DPO's steps.
    assert sorted(sft["eval/synthetic/exact_match"]) == [0, 2, 4]
    assert sft["eval/synthetic/exact_match"][0] == pytest.approx(expected["results"]["base"])
    assert sft["eval/synthetic/exact_match"][SFT_STEPS] == pytest.approx(expected["results"]["sft"])
    assert sorted(dpo["eval/synthetic/exact_match"]) == [2, 4]
    assert dpo["eval/synthetic/exact_match"][DPO_STEPS] == pytest.approx(expected["results"]["dpo"])
    assert set(dpo["eval/preference/dpo/accuracy"]) == {DPO_STEPS}
    # Validation loss every eval.every_steps and at the end, as in the summary.
    assert sft["val/loss"] == pytest.approx(expected["validation"]) and sorted(expected["validation"]) == [
        2,
        4,
    ]
    assert all(math.isfinite(v) and v > 0 for v in sft["val/loss"].values())
    # Throughput: every token computed, and the supervised ones (fewer: prompts and images are not supervised).
    for scalars in (sft, dpo):
        assert sorted(scalars["train/tokens_per_s"]) == [1, 2, 3, 4]
        assert all(
            scalars["train/tokens_per_s"][s] > scalars["train/supervised_tokens_per_s"][s] > 0
            for s in range(1, 5)
        )
    assert "train/pairs_per_s" in dpo and "train/rewards/margins" in dpo


@pytest.mark.slow
def test_wandb_offline_run_holds_every_eval_at_its_step_inside_the_run_dir(tracked_run):
    expected = expected_logs(tracked_run)
    logs = sorted((tracked_run / "logs" / "wandb").glob("offline-run-*/run-*.wandb"))
    runs = {run["job_type"]: (run, steps) for run, steps in map(wandb_run, logs)}
    assert set(runs) == {"sft", "dpo"} and len(logs) == 2
    (sft_run, sft), (dpo_run, dpo) = runs["sft"], runs["dpo"]
    assert (sft_run["name"], dpo_run["name"], sft_run["group"]) == ("tracked/sft", "tracked/dpo", "tracked")
    assert sft[0] == {
        "eval/synthetic/exact_match": pytest.approx(expected["results"]["base"])
    }  # before training
    assert sft[SFT_STEPS]["eval/synthetic/exact_match"] == pytest.approx(expected["results"]["sft"])
    assert {s for s, v in sft.items() if "eval/synthetic/exact_match" in v} == {0, 2, 4}
    assert {s: v["val/loss"] for s, v in sft.items() if "val/loss" in v} == pytest.approx(
        expected["validation"]
    )
    assert {s for s, v in dpo.items() if "eval/synthetic/exact_match" in v} == {2, 4}
    assert dpo[DPO_STEPS]["eval/synthetic/exact_match"] == pytest.approx(expected["results"]["dpo"])
    assert sorted(s for s, v in dpo.items() if "train/loss" in v) == [1, 2, 3, 4]  # DPO's own steps


@pytest.mark.slow
def test_the_runs_report_shows_both_stages_curves(tracked_run):
    parsed = SvgParser()
    parsed.feed((tracked_run / "eval" / "report.html").read_text())
    assert parsed.charts[("sft", "loss")]["series"] == {"train": SFT_STEPS, "validation": 2}
    assert parsed.charts[("dpo", "rewards/accuracies")]["series"] == {"accuracy": DPO_STEPS}
    assert {("sft", "lr"), ("sft", "grad_norm"), ("dpo", "loss"), ("dpo", "rewards/margins")} <= set(
        parsed.charts
    )
