"""Every shipped recipe parses and dry-runs (one fixture batch through the tiny model); the accelerate configs name a
distributed type accelerate knows; a dry run fails, and says why, on a recipe that cannot train."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from pathlib import Path

import pytest
import yaml
from accelerate.utils import DistributedType

from config import RecipeError, Source, load_recipe, parse_recipe
from config.checks import fewest_image_tokens
from data.sample import DataError
from train.core.trainable import PARTS
from train.tools.dry_run import cli, dry_run

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
RECIPE_FILES = sorted(RECIPES.glob("*.yaml"))
ACCELERATE_FILES = sorted((RECIPES / "accelerate").glob("*.yaml"))
MPO_OVERRIDES = (
    "dpo.losses=[{type: sigmoid, weight: 0.8}, {type: bco_pair, weight: 0.2}]",
    "dpo.sft_weight=1.0",
)
# A tiny-model SFT recipe to bend in the failure tests.
TINY_VQA = {
    "model": {"name_or_path": "tiny", "dtype": "float32", "num_crops": 4},
    "data": {"train": [{"format": "vqa", "path": "org/charts"}], "max_length": 512},
    "train": {"max_steps": 1, "precision": "fp32"},
    "stages": ["sft"],
}


@functools.cache
def summary_of(path: Path) -> dict:
    """The dry-run summary of one recipe file, computed once per test session."""
    return dry_run(load_recipe(path))


def test_the_shipped_recipes_are_all_found():
    assert {path.stem for path in RECIPE_FILES} >= {
        "demo",
        "chartqa",
        "docvqa",
        "phi35v_multi_image",
        "rlaif_v",
        "chartqa_dpo",
    }
    assert {path.stem for path in ACCELERATE_FILES} >= {"cpu", "ddp", "zero2", "zero3", "fsdp2"}


@pytest.mark.parametrize("path", RECIPE_FILES, ids=lambda path: path.stem)
def test_recipe_dry_runs_every_training_stage(path):
    recipe = load_recipe(path)
    summary = summary_of(path)
    assert list(summary["stages"]) == [stage for stage in recipe.stages if stage in ("sft", "dpo", "grpo")]
    for stage, result in summary["stages"].items():
        assert math.isfinite(result["loss"]), stage
        # DPO: chosen and rejected rows; GRPO: the G completions of each prompt
        rows = result["batch"]["input_ids"][0] // {"dpo": 2, "grpo": recipe.grpo.num_generations}.get(
            stage, 1
        )
        assert result["batch"]["image_sizes"][0] >= rows  # every fixture row shows at least one image
        for part in PARTS:  # exactly the recipe's trained parts train
            assert (result["parameters"][part]["trainable"] > 0) == (part in result["trained_parts"]), (
                stage,
                part,
            )
    if "dpo" in summary["stages"] and plain_sigmoid(recipe):
        # A fresh LoRA: the policy equals its reference (the adapter disabled), so every margin is 0.
        assert summary["stages"]["dpo"]["loss"] == pytest.approx(math.log(2), abs=1e-5)


def plain_sigmoid(recipe) -> bool:
    return [loss.type for loss in recipe.dpo.losses] == ["sigmoid"] and not recipe.dpo.sft_weight


def test_multi_image_recipe_batches_a_two_image_row():
    batch = summary_of(RECIPES / "phi35v_multi_image.yaml")["stages"]["sft"]["batch"]
    assert batch["input_ids"][0] == 2 and batch["image_sizes"][0] == 3  # rows of one and two images


def test_the_documented_mpo_mix_dry_runs():
    summary = dry_run(load_recipe(RECIPES / "rlaif_v.yaml", MPO_OVERRIDES))
    loss = summary["stages"]["dpo"]["loss"]
    # 0.8 log 2 + 0.2 log 2 (bco_pair at zero margin) + the chosen answers' NLL (the tiny model is far from right).
    assert math.isfinite(loss) and loss > math.log(2) + 1


def test_fixture_rows_carry_the_raw_column_names():
    # The dry run builds rows under the dataset's own names; unless it reverses the renames, 'img' is missing.
    mapping = {
        **TINY_VQA,
        "data": {
            **TINY_VQA["data"],
            "train": [
                {
                    "format": "vqa",
                    "path": "org/charts",
                    "columns": {"img": "image", "q": "question", "ans": "answers"},
                }
            ],
        },
    }
    summary = dry_run(parse_recipe(mapping))
    assert summary["stages"]["sft"]["supervised_tokens"] > 0


def test_a_source_format_no_stage_reads_fails_at_parse_time():
    mapping = {**TINY_VQA, "stages": ["dpo"]}
    with pytest.raises(RecipeError) as caught:
        parse_recipe(mapping)
    assert any(
        "stage dpo needs a source in one of the formats" in problem for problem in caught.value.problems
    )
    assert any("data.train.0.format = 'vqa'" in problem for problem in caught.value.problems)


def test_a_recipe_changed_in_code_is_validated_again():
    recipe = parse_recipe(TINY_VQA)
    preference_only = dataclasses.replace(
        recipe, data=dataclasses.replace(recipe.data, train=(Source(format="rlaif_v", path="org/pairs"),))
    )
    with pytest.raises(RecipeError, match="stage sft needs a source in one of the formats"):
        dry_run(preference_only)


def test_max_length_must_hold_the_real_models_smallest_image():
    assert fewest_image_tokens(1, 336, 14) == 313  # one crop and the global view
    assert (
        fewest_image_tokens(16, 336, 14) == 1321
    )  # a 1 x 8 grid (a 17:2 strip), fewer than a square's 4 x 4
    with pytest.raises(RecipeError, match="the smallest image takes 1321 tokens"):
        dry_run(load_recipe(RECIPES / "chartqa.yaml", ["data.max_length=1024"]))


def test_an_unknown_eval_task_is_named():
    # Every entry point refuses it while parsing, before any training (not only the dry run).
    with pytest.raises(
        RecipeError, match=r"eval\.tasks\.0 = 'chartqa_v2': expected one of 'chartqa', .*'synthetic'"
    ):
        load_recipe(RECIPES / "chartqa.yaml", ["eval.tasks=[chartqa_v2]"])


def test_a_column_map_the_format_cannot_read_names_the_source_and_column():
    # Two raw columns mapped onto two answer columns: the vqa adapter cannot tell which one holds the answers.
    mapping = {
        **TINY_VQA,
        "data": {
            **TINY_VQA["data"],
            "train": [{"format": "vqa", "path": "org/charts", "columns": {"a1": "answers", "a2": "label"}}],
        },
    }
    with pytest.raises(
        DataError, match=r"dry-run fixture of data\.train\.0 \(org/charts:train\).*ambiguous column"
    ):
        dry_run(parse_recipe(mapping))


def test_cli_prints_the_summary_and_exits_1_on_a_bad_recipe(tmp_path, capsys):
    cli([str(RECIPES / "demo.yaml")])
    printed = json.loads(capsys.readouterr().out)
    assert list(printed["stages"]) == ["sft", "dpo"] and printed["recipe"].endswith("demo.yaml")

    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**TINY_VQA, "stages": ["dpo"]}))
    with pytest.raises(SystemExit) as exited:
        cli([str(bad)])
    assert exited.value.code == 1
    assert "stage dpo needs a source" in capsys.readouterr().err


@pytest.mark.parametrize("path", ACCELERATE_FILES, ids=lambda path: path.stem)
def test_accelerate_config_names_a_known_distributed_type(path):
    config = yaml.safe_load(path.read_text())
    assert isinstance(config, dict)
    assert config["distributed_type"] in {member.value for member in DistributedType}
