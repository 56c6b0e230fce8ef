"""eval.generate, eval.hook, eval.report and `python -m eval` on the tiny model and a small synthetic dataset."""

from __future__ import annotations

import base64
import io
import json
from dataclasses import replace
from html.parser import HTMLParser
from pathlib import Path

import datasets
import pytest
import torch
import yaml
from peft import LoraConfig, get_peft_model
from PIL import Image

import eval.generate as generate_module
import eval.hook as hook_module
from config import EvalSection, parse_recipe
from data.synthetic import write_synthetic
from eval.__main__ import ModelPlan, main, plan_model
from eval.generate import common_width, generate_answers, left_pad, merge_gathered, shard_for_rank
from eval.hook import EvalGateError, evaluate_stage, gate_violations
from eval.report import biggest_changes, write_report
from eval.tasks import TASKS, load_examples


@pytest.fixture(autouse=True)
def _offline_datasets_cache(tmp_path, monkeypatch):
    """Keep the datasets cache inside tmp_path, and never reach the hub."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def synthetic_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data") / "synthetic"
    write_synthetic(root, seed=0, n_train=0, n_eval=8, n_pref_train=0, n_pref_eval=0)
    return root


@pytest.fixture()
def examples(synthetic_dir):
    return load_examples(TASKS["synthetic"].with_source(path=synthetic_dir), limit=5)


def eval_section(**changes) -> EvalSection:
    return replace(EvalSection(tasks=("synthetic",), limit=6, max_new_tokens=3, batch_size=4), **changes)


def count_generate_calls(model) -> list[int]:
    """Wrap model.generate; the list records the batch size of every call."""
    calls, original = [], model.generate

    def counting(**inputs):
        calls.append(inputs["input_ids"].shape[0])
        return original(**inputs)

    model.generate = counting
    return calls


def fake_answers(monkeypatch, answer_for):
    """Replace generation in the hook: `answer_for(example)` answers each example."""

    def fake(model, processor, examples, **_):
        return [answer_for(example) for example in examples]

    monkeypatch.setattr(hook_module, "generate_answers", fake)


def read_json(path: Path):
    return json.loads(path.read_text())


# ------------------------------------------------------------------------------------------------ generation


def test_batched_generation_equals_one_by_one(tiny_model, tiny_processor, examples):
    calls = count_generate_calls(tiny_model)
    batched = generate_answers(tiny_model, tiny_processor, examples, batch_size=4, max_new_tokens=4)
    assert calls == [4, 1]
    one_by_one = generate_answers(tiny_model, tiny_processor, examples, batch_size=1, max_new_tokens=4)
    assert batched == one_by_one
    assert len(batched) == 5 and all(isinstance(a, str) and a == a.strip() for a in batched)


def test_answer_stops_at_end_token_and_is_stripped(tiny_model, tiny_processor, examples):
    tokenizer = tiny_processor.tokenizer
    answer_ids = tokenizer(" red ", add_special_tokens=False).input_ids
    tail = [
        tokenizer.convert_tokens_to_ids("<|end|>"),
        *tokenizer("blue", add_special_tokens=False).input_ids,
    ]

    def scripted_generate(**inputs):
        new = torch.tensor([answer_ids + tail] * inputs["input_ids"].shape[0])
        assert (inputs["attention_mask"][:, -1] == 1).all(), "prompts must be padded on the left"
        return torch.cat([inputs["input_ids"], new], dim=1)

    tiny_model.generate = scripted_generate
    assert (
        generate_answers(tiny_model, tiny_processor, examples[:3], batch_size=2, max_new_tokens=8)
        == ["red"] * 3
    )


def test_shards_cover_every_example_with_equal_batch_counts():
    lengths = [5, 1, 9, 3, 7]
    shards = [shard_for_rank(lengths, num_processes=2, process_index=rank) for rank in (0, 1)]
    assert shards == [
        [2, 0, 1],
        [4, 3, 3],
    ]  # longest first, dealt round-robin; rank 1 repeats its last prompt
    assert sorted(set(shards[0]) | set(shards[1])) == [0, 1, 2, 3, 4]
    assert [shard_for_rank([4], num_processes=3, process_index=rank) for rank in range(3)] == [[0], [0], [0]]
    assert shard_for_rank([], num_processes=2, process_index=1) == []
    pairs = [(2, "c"), (0, "a"), (1, "b"), (4, "e"), (3, "d"), (3, "d again")]
    assert merge_gathered(pairs, 5) == ["a", "b", "c", "d", "e"]


class FakeRank:
    """The parts of an Accelerator that generate_answers uses, for one rank of a fake 2-process run."""

    def __init__(self, process_index: int):
        self.num_processes, self.process_index = 2, process_index
        self.is_main_process = process_index == 0

    def unwrap_model(self, model):
        return model


def test_two_rank_generation_matches_one_process(tiny_model, tiny_processor, examples, monkeypatch):
    expected = generate_answers(tiny_model, tiny_processor, examples, batch_size=2, max_new_tokens=4)
    calls = count_generate_calls(tiny_model)
    rank_one_pairs = []

    def gather_as_rank_one(pairs):
        rank_one_pairs.extend(pairs)
        return pairs + [(i, a) for i, a in enumerate(expected) if i not in {j for j, _ in pairs}]

    monkeypatch.setattr(generate_module, "gather_object", gather_as_rank_one)
    generate_answers(
        tiny_model, tiny_processor, examples, batch_size=2, max_new_tokens=4, accelerator=FakeRank(1)
    )
    rank_zero_pairs = []

    def gather_as_rank_zero(pairs):
        rank_zero_pairs.extend(pairs)
        return pairs + rank_one_pairs

    monkeypatch.setattr(generate_module, "gather_object", gather_as_rank_zero)
    answers = generate_answers(
        tiny_model, tiny_processor, examples, batch_size=2, max_new_tokens=4, accelerator=FakeRank(0)
    )
    assert answers == expected
    assert calls == [2, 1, 2, 1]  # each rank answers 3 prompts (rank 1 repeats one) in 2 batches
    rank_zero, rank_one = {i for i, _ in rank_zero_pairs}, {i for i, _ in rank_one_pairs}
    assert len(rank_zero_pairs) == len(rank_one_pairs) == 3
    assert len(rank_zero) == 3 and len(rank_one) == 2 and rank_zero | rank_one == set(range(5))


# ------------------------------------------------------------------------------------------------ the hook


def test_results_json_shape_merge_and_predictions(tiny_model, tiny_processor, synthetic_dir, tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "eval").mkdir(parents=True)
    (run_dir / "eval" / "results.json").write_text(
        json.dumps({"chartqa": {"relaxed_accuracy": {"base": 0.25}}})
    )
    paths = {"synthetic": synthetic_dir}
    scores = evaluate_stage(
        "base",
        tiny_model,
        tiny_processor,
        eval_section(),
        run_dir,
        model_id_for_cache="tiny",
        task_paths=paths,
    )
    base = scores["synthetic"]["exact_match"]
    assert 0.0 <= base <= 1.0
    rows = [
        json.loads(line)
        for line in (run_dir / "eval/predictions/base/synthetic.jsonl").read_text().splitlines()
    ]
    assert [row["id"] for row in rows] == [str(i) for i in range(6)]
    assert set(rows[0]) == {"id", "question", "references", "prediction", "score", "meta"}
    assert rows[0]["question"] == "What colour is the shape?" and rows[0]["meta"] == {"kind": "colour"}

    with pytest.MonkeyPatch.context() as patch:
        fake_answers(patch, lambda example: example.references[0])
        evaluate_stage(
            "sft",
            tiny_model,
            tiny_processor,
            eval_section(),
            run_dir,
            model_id_for_cache="run/sft",
            task_paths=paths,
        )
    assert read_json(run_dir / "eval/results.json") == {
        "chartqa": {"relaxed_accuracy": {"base": 0.25}},
        "synthetic": {"exact_match": {"base": base, "sft": 1.0}},
    }
    assert (run_dir / "eval/report.html").is_file()


def test_base_score_is_cached_and_reused(tiny_model, tiny_processor, synthetic_dir, tmp_path):
    calls = count_generate_calls(tiny_model)
    paths = {"synthetic": synthetic_dir}
    first = evaluate_stage(
        "base",
        tiny_model,
        tiny_processor,
        eval_section(),
        tmp_path / "a",
        model_id_for_cache="tiny@main",
        task_paths=paths,
    )
    assert len(calls) == 2  # 6 prompts in batches of 4
    [cache_file] = (tmp_path / "a/eval/cache").glob("base-synthetic-*.json")
    second = evaluate_stage(
        "base",
        tiny_model,
        tiny_processor,
        eval_section(),
        tmp_path / "a",
        model_id_for_cache="tiny@main",
        task_paths=paths,
    )
    assert second == first and len(calls) == 2  # nothing generated again

    # Another run sharing the cache folder reuses it too; another limit or model id is another entry.
    shared = tmp_path / "a/eval/cache"
    evaluate_stage(
        "base",
        tiny_model,
        tiny_processor,
        eval_section(),
        tmp_path / "b",
        model_id_for_cache="tiny@main",
        task_paths=paths,
        cache_dir=shared,
    )
    assert len(calls) == 2 and (tmp_path / "b/eval/predictions/base/synthetic.jsonl").is_file()
    evaluate_stage(
        "base",
        tiny_model,
        tiny_processor,
        eval_section(limit=3),
        tmp_path / "a",
        model_id_for_cache="tiny@main",
        task_paths=paths,
    )
    evaluate_stage(
        "base",
        tiny_model,
        tiny_processor,
        eval_section(limit=3),
        tmp_path / "a",
        model_id_for_cache="other@main",
        task_paths=paths,
    )
    assert len(calls) == 4 and len(list(shared.glob("base-synthetic-*.json"))) == 3
    assert read_json(cache_file)["ids"] == [str(i) for i in range(6)]

    # Trained stages are never cached.
    evaluate_stage(
        "sft",
        tiny_model,
        tiny_processor,
        eval_section(),
        tmp_path / "a",
        model_id_for_cache="tiny@main",
        task_paths=paths,
    )
    assert len(calls) == 6


def test_gate_raises_naming_task_metric_scores_and_margin(
    tiny_model, tiny_processor, synthetic_dir, tmp_path, monkeypatch
):
    paths = {"synthetic": synthetic_dir}
    fake_answers(monkeypatch, lambda example: example.references[0])
    gated = eval_section(gate_margin=0.1)
    evaluate_stage(
        "base", tiny_model, tiny_processor, gated, tmp_path, model_id_for_cache="m", task_paths=paths
    )
    fake_answers(monkeypatch, lambda example: "nothing")
    with pytest.raises(EvalGateError) as raised:
        evaluate_stage(
            "sft", tiny_model, tiny_processor, gated, tmp_path, model_id_for_cache="m/sft", task_paths=paths
        )
    message = str(raised.value)
    assert (
        "synthetic exact_match: sft scored 0.0000, base scored 1.0000, a drop of 1.0000 > margin 0.1"
        in message
    )
    assert "eval.gate_margin = 0.1" in message and "results.json" in message
    # Everything is written before the gate fails.
    assert read_json(tmp_path / "eval/results.json")["synthetic"]["exact_match"] == {"base": 1.0, "sft": 0.0}
    # Without a margin, or within it, nothing is raised; dpo is compared with sft, the stage before it.
    evaluate_stage(
        "sft",
        tiny_model,
        tiny_processor,
        eval_section(),
        tmp_path,
        model_id_for_cache="m/sft",
        task_paths=paths,
    )
    fake_answers(monkeypatch, lambda example: example.references[0] if example.id != "0" else "no")
    evaluate_stage(
        "dpo",
        tiny_model,
        tiny_processor,
        eval_section(gate_margin=0.0),
        tmp_path,
        model_id_for_cache="m/dpo",
        task_paths=paths,
    )


def test_gate_skips_directionless_metrics_and_missing_stages():
    results = {
        "pope": {
            "accuracy": {"base": 0.80, "dpo": 0.85},
            "yes_ratio": {"base": 0.5, "dpo": 0.2},
            "f1": {"base": 0.8, "sft": 0.5, "dpo": 0.9},
        }
    }
    pope = TASKS["pope"]
    assert (
        gate_violations(results, "dpo", [pope], 0.05) == []
    )  # sft -> dpo rose; base -> sft is not dpo's pair
    [line] = gate_violations(results, "sft", [pope], 0.05)
    assert line.startswith("pope f1: sft scored 0.5000, base scored 0.8000, a drop of 0.3000 > margin 0.05")


def test_scores_go_to_the_accelerator_trackers(
    tiny_model, tiny_processor, synthetic_dir, tmp_path, monkeypatch
):
    class RecordingAccelerator:
        num_processes, process_index, is_main_process = 1, 0, True

        def __init__(self):
            self.logged, self.waits = [], 0

        def unwrap_model(self, model):
            return model

        def log(self, values, step=None):
            self.logged.append((values, step))

        def wait_for_everyone(self):
            self.waits += 1

    fake_answers(monkeypatch, lambda example: example.references[0])
    accelerator = RecordingAccelerator()
    evaluate_stage(
        "sft",
        tiny_model,
        tiny_processor,
        eval_section(),
        tmp_path,
        model_id_for_cache="m",
        accelerator=accelerator,
        task_paths={"synthetic": synthetic_dir},
        step=7,
    )
    assert accelerator.logged == [({"eval/synthetic/exact_match": 1.0}, 7)] and accelerator.waits == 1


def test_unknown_stage_is_refused(tiny_model, tiny_processor, tmp_path):
    with pytest.raises(ValueError, match="stage 'final' is not one of"):
        evaluate_stage("final", tiny_model, tiny_processor, eval_section(), tmp_path, model_id_for_cache="m")


# ------------------------------------------------------------------------------------------------ the report


class PageParser(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.images, self.headers, self.texts = [], [], [], []
        self._in_header = False

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag == "img":
            self.images.append(dict(attrs)["src"])
        self._in_header = tag == "th"

    def handle_endtag(self, tag):
        self._in_header = False

    def handle_data(self, data):
        (self.headers if self._in_header else self.texts).append(data)


def test_report_shows_stage_columns_deltas_and_changed_examples(
    tiny_model, tiny_processor, synthetic_dir, tmp_path, monkeypatch
):
    paths = {"synthetic": synthetic_dir}
    fake_answers(
        monkeypatch, lambda example: example.references[0] if int(example.id) < 3 else "<script>x</script>"
    )
    evaluate_stage(
        "base", tiny_model, tiny_processor, eval_section(), tmp_path, model_id_for_cache="m", task_paths=paths
    )
    fake_answers(
        monkeypatch, lambda example: example.references[0] if int(example.id) >= 2 else "wrong & <b>"
    )
    evaluate_stage(
        "sft",
        tiny_model,
        tiny_processor,
        eval_section(),
        tmp_path,
        model_id_for_cache="m/sft",
        task_paths=paths,
    )

    page = PageParser()
    page.feed((tmp_path / "eval/report.html").read_text())
    assert {"base", "sft", "dpo", "metric"} <= set(page.headers)
    assert "Δ sft − base" in page.headers and "Δ dpo − sft" in page.headers
    assert "script" not in page.tags and "b" not in page.tags  # predictions are text, never markup
    assert "<script>x</script>" in page.texts and "wrong & <b>" in page.texts
    text = " ".join(page.texts)
    assert "0.5000" in text and "0.6667" in text and "+0.1667" in text  # base 3/6, sft 4/6
    # Rows 0-1 regressed, rows 3-5 gained (row 4 is text-only: no image); each shown with its image.
    assert len(page.images) == 4
    for src in page.images:
        assert src.startswith("data:image/png;base64,")
        image = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
        assert image.format == "PNG" and max(image.size) <= 160
    assert "(no image)" in page.texts


def test_biggest_changes_orders_by_change_then_row():
    before = [{"id": str(i), "score": s} for i, s in enumerate([1.0, 0.0, 1.0, 0.5, 0.0])]
    after = [{"id": str(i), "score": s} for i, s in enumerate([0.0, 1.0, 0.5, 0.5, 0.25])]
    regressions, gains = biggest_changes(before, after, count=5)
    assert [c.id for c in regressions] == ["0", "2"] and [c.id for c in gains] == ["1", "4"]
    assert [c.delta for c in gains] == [1.0, 0.25]


def test_report_of_an_empty_run_renders(tmp_path):
    page = PageParser()
    page.feed(write_report(tmp_path).read_text())
    assert "No task has been scored yet." in page.texts


# ------------------------------------------------------------------------------------------------ the CLI


def write_recipe(path: Path, synthetic_dir: Path) -> Path:
    recipe = {
        "model": {"name_or_path": "tiny", "dtype": "float32", "num_crops": 4},
        "data": {"train": [{"format": "synthetic", "path": str(synthetic_dir)}]},
        "eval": {"tasks": ["synthetic"], "limit": 3, "max_new_tokens": 2, "batch_size": 3},
        "stages": ["eval"],
    }
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_cli_scores_a_run_directory_stage_by_stage(
    tiny_model, tiny_processor, synthetic_dir, tmp_path, capsys
):
    run_dir = tmp_path / "run"
    tiny_model.save_pretrained(run_dir / "base")
    tiny_processor.save_pretrained(run_dir / "base")
    lora = get_peft_model(tiny_model, LoraConfig(r=2, target_modules=["qkv_proj"], init_lora_weights=False))
    lora.save_pretrained(run_dir / "sft" / "adapter")
    recipe = write_recipe(tmp_path / "recipe.yaml", synthetic_dir)

    assert main([str(recipe), "--model", str(run_dir)]) == 0  # the latest stage: sft
    assert main([str(recipe), "--model", str(run_dir), "--stage", "base", "--limit", "2"]) == 0
    out = capsys.readouterr().out
    assert f"sft model: {run_dir / 'base'} + {run_dir / 'sft' / 'adapter'}" in out
    results = read_json(run_dir / "eval/results.json")
    assert set(results["synthetic"]["exact_match"]) == {"base", "sft"}
    table = out.strip().splitlines()[-2]
    assert (
        table.split()[:2] == ["synthetic", "exact_match"] and len(table.split()) == 4
    )  # base and sft filled
    assert len((run_dir / "eval/predictions/base/synthetic.jsonl").read_text().splitlines()) == 2
    assert list((run_dir / "eval/cache").glob("base-synthetic-*.json"))


def test_cli_scores_a_checkpoint_folder_into_output_dir(
    tiny_model, tiny_processor, synthetic_dir, tmp_path, capsys
):
    tiny_model.save_pretrained(tmp_path / "ckpt")
    tiny_processor.save_pretrained(tmp_path / "ckpt")
    recipe = write_recipe(tmp_path / "recipe.yaml", synthetic_dir)
    out_dir = tmp_path / "scores"
    assert (
        main(
            [
                str(recipe),
                "--model",
                str(tmp_path / "ckpt"),
                "--output-dir",
                str(out_dir),
                "--data",
                f"synthetic={synthetic_dir}",
            ]
        )
        == 0
    )
    assert set(read_json(out_dir / "eval/results.json")["synthetic"]["exact_match"]) == {"base"}
    assert "report: " in capsys.readouterr().out


def touch(folder: Path, name: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text("{}")
    return folder


def test_model_plans_for_run_directories(tmp_path):
    from rundir.weights import Weights, write_start

    recipe = parse_recipe(
        {"model": {"name_or_path": "org/base"}, "stages": ["eval"], "eval": {"tasks": ["chartqa"]}},
        source="test",
    )
    run = tmp_path / "run"
    sft_adapter = touch(run / "sft" / "adapter", "adapter_config.json")
    (sft_adapter / "adapter_model.safetensors").write_bytes(b"weights")
    (run / "recipe.resolved.yaml").write_text("")
    assert plan_model(str(run), recipe, stage=None, adapter=None) == ModelPlan(
        weights=Weights(base="org/base", adapters=(sft_adapter,)), stage="sft", run_dir=run
    )
    write_start(run, Weights(base="org/base", adapters=(sft_adapter,)))
    dpo_adapter = touch(run / "dpo" / "adapter", "adapter_config.json")
    assert plan_model(str(run), recipe, stage=None, adapter=None).weights.adapters == (
        sft_adapter,
        dpo_adapter,
    )
    touch(run / "sft" / "merged", "config.json")  # an export: the adapter over the base stays the SFT model
    assert plan_model(str(run), recipe, stage="dpo", adapter=None) == ModelPlan(
        weights=Weights(base="org/base", adapters=(sft_adapter, dpo_adapter)), stage="dpo", run_dir=run
    )
    assert plan_model(str(run), recipe, stage="base", adapter=None).weights.base == "org/base"
    other = touch(tmp_path / "other", "adapter_config.json")
    assert plan_model(str(run), recipe, stage="sft", adapter=other).weights.adapters == (other,)
    assert plan_model("org/base", recipe, stage=None, adapter=other) == ModelPlan(
        weights=Weights(base="org/base", adapters=(other,)), stage="sft"
    )

    lone = tmp_path / "lone"
    touch(lone / "dpo" / "adapter", "adapter_config.json")
    external = touch(tmp_path / "sft_run" / "sft" / "adapter", "adapter_config.json")
    write_start(lone, Weights(base="org/base", adapters=()))
    (lone / "dpo" / "start.json").write_text(f'{{"base": "org/base", "adapters": ["{external}"]}}')
    assert plan_model(str(lone), recipe, stage=None, adapter=None).weights.adapters == (
        external,
        lone / "dpo" / "adapter",
    )
    with pytest.raises(FileNotFoundError, match="has no sft model: neither .*adapter nor .*merged"):
        plan_model(str(lone), recipe, stage="sft", adapter=None)
    with pytest.raises(ValueError, match="no adapter_config.json there"):
        plan_model("org/base", recipe, stage=None, adapter=tmp_path)
    tiny = replace(recipe, model=replace(recipe.model, name_or_path="tiny"))
    with pytest.raises(FileNotFoundError, match="no base/ checkpoint.*'tiny'"):
        plan_model(str(run), tiny, stage="base", adapter=None)


def test_dpo_eval_and_export_agree_on_a_runs_weights(tmp_path):
    """One run directory holding both adapters and merged folders: DPO's starting point, the eval CLI's plan and
    export's merge chain are the same weights, and they are what dpo/start.json records."""
    import json

    from rundir.weights import dpo_start, stage_weights, write_start

    recipe = parse_recipe(
        {
            "model": {"name_or_path": "org/base", "revision": "v1"},
            "stages": ["sft", "dpo"],
            "data": {"train": [{"format": "synthetic"}]},
            "train": {"max_steps": 1},
        },
        source="test",
    )
    run = tmp_path / "run"
    (run / "recipe.resolved.yaml").parent.mkdir(parents=True)
    (run / "recipe.resolved.yaml").write_text(yaml_dump(recipe))
    sft_adapter = touch(run / "sft" / "adapter", "adapter_config.json")
    (sft_adapter / "adapter_model.safetensors").write_bytes(b"sft weights")
    touch(run / "sft" / "merged", "config.json")
    start = dpo_start(recipe, run)  # what DPO trains from
    write_start(run, start)
    dpo_adapter = touch(run / "dpo" / "adapter", "adapter_config.json")
    touch(run / "dpo" / "merged", "config.json")

    recorded = json.loads((run / "dpo" / "start.json").read_text())
    assert recorded["base"] == "org/base" and recorded["revision"] == "v1"
    assert recorded["adapters"] == [str(sft_adapter)] and len(recorded["weights_sha256"]) == 1
    assert start == stage_weights(run, "sft")  # DPO starts from the SFT model the resolver names
    dpo_weights = stage_weights(run, "dpo")  # what export merges
    assert dpo_weights.adapters == (sft_adapter, dpo_adapter) and dpo_weights.base == recorded["base"]
    assert plan_model(str(run), recipe, stage="dpo", adapter=None).weights == dpo_weights  # what eval loads
    assert plan_model(str(run), recipe, stage="sft", adapter=None).weights == start


def yaml_dump(recipe) -> str:
    from config.parse import resolved_yaml

    return resolved_yaml(recipe)


def test_batches_that_can_reach_the_rope_switch_get_one_width_on_every_rank():
    """Phi-3 drops its cache where a batch's width passes 4096; synced ranks must cross at the same step, so a batch
    that can reach it is padded to the widest prompt of that batch on any rank (eval/generate.py)."""
    lengths = [4075, 4075, 4075, 4074, 100, 90]
    shards = [shard_for_rank(lengths, num_processes=2, process_index=rank) for rank in range(2)]
    assert [[lengths[i] for i in shard] for shard in shards] == [[4075, 4075, 100], [4075, 4074, 90]]
    widths = [common_width(lengths, shards, start, 1, 24, 4096) for start in range(3)]
    assert widths == [4075, 4075, None]  # the last batches cannot reach 4096: each rank keeps its own width
    assert common_width(lengths, shards, 0, 2, 24, None) is None  # a model without the switch
    batch = {"input_ids": torch.tensor([[5, 6]]), "attention_mask": torch.tensor([[1, 1]])}
    padded = left_pad(batch, 4, pad_token_id=0)
    assert padded["input_ids"].tolist() == [[0, 0, 5, 6]] and padded["attention_mask"].tolist() == [
        [0, 0, 1, 1]
    ]
