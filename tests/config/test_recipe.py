"""The typed recipe: YAML -> frozen dataclasses, overrides, provenance, errors that say what to do."""

from __future__ import annotations

import copy
import dataclasses
import pickle
import warnings
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

import pytest
import yaml

from config.parse import (
    RecipeError,
    RecipeWarning,
    load_recipe,
    parse_recipe,
    provenance,
    recipe_help,
    recipe_to_dict,
    redact_secrets,
    resolved_yaml,
)
from config.schema import DpoLoss, LoraSection, Recipe, Source
from rundir.atomic import write_text_atomically
from rundir.layout import RESOLVED_RECIPE as RESOLVED_RECIPE_NAME
from rundir.layout import recipe_file, resolve_output_dir


def save_resolved(recipe, run_dir):
    """What the run directory writes at a stage's start (rundir.stage_dir.prepare_stage_dir)."""
    return write_text_atomically(recipe_file(run_dir), resolved_yaml(recipe))


# The smallest valid recipe: SFT needs a source and a length; everything else has a default.
MINIMAL = {"data": {"train": [{"format": "synthetic"}]}, "train": {"max_steps": 2}}

FULL_YAML = """\
model:
  name_or_path: tiny
  revision: null
  dtype: float32
  num_crops: 4
  vision: lora
lora:
  r: 8
  dropout: 0.0
  target_modules: [qkv_proj, o_proj]
data:
  train:
    - {format: vqa, path: data/charts.jsonl, columns: {q: question, a: answer}, image_root: data/img}
    - {format: trl_preference, path: org/prefs, split: 'train[:100]', weight: 0.5, limit: 100}
  eval:
    - {format: vqa, path: data/charts_eval.jsonl}
  max_length: 2048
  on_overlong: error
train:
  epochs: 2
  lr: 1.0e-4
  lr_vision: 2.0e-5
  adam_betas: [0.9, 0.95]
dpo:
  losses: [{type: sigmoid, weight: 0.8}, {type: bco_pair, weight: 0.2}]
  beta: 0.2
eval:
  tasks: [chartqa]
  when: [base, sft, dpo]
stages: [sft, dpo, eval, export]
output_dir: runs/full
seed: 7
logging: {report_to: [tensorboard, wandb], project: charts}
"""


def write(tmp_path: Path, text: str, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def problems_of(mapping: dict, overrides: Sequence[str] = (), **kwargs) -> tuple[str, ...]:
    with pytest.raises(RecipeError) as caught:
        parse_recipe(mapping, overrides, **kwargs)
    return caught.value.problems


def with_(base: dict, **sections) -> dict:
    """A deep copy of `base` with whole top-level keys replaced."""
    return {**copy.deepcopy(base), **sections}


def flat_keys(value, path: str = "") -> set[str]:
    """Dotted leaf keys of plain recipe data, list-of-mapping items by index (as provenance names them)."""
    if isinstance(value, dict) and (not path or not path.endswith("columns")):
        return set().union(
            *(flat_keys(item, f"{path}.{key}" if path else key) for key, item in value.items())
        )
    if isinstance(value, list) and value and isinstance(value[0], dict):
        return set().union(*(flat_keys(item, f"{path}.{i}") for i, item in enumerate(value)))
    return {path}


# ----------------------------------------------------------------------------------------------- shape


def test_full_recipe_maps_onto_typed_frozen_dataclasses(tmp_path):
    recipe = load_recipe(write(tmp_path, FULL_YAML))
    assert recipe.model.name_or_path == "tiny" and recipe.model.num_crops == 4
    assert recipe.lora.target_modules == ("qkv_proj", "o_proj")
    assert recipe.data.train[0] == Source(
        format="vqa",
        path="data/charts.jsonl",
        columns={"q": "question", "a": "answer"},
        image_root="data/img",
    )
    assert recipe.data.train[1].weight == 0.5 and recipe.data.train[1].split == "train[:100]"
    assert recipe.train.epochs == 2.0 and isinstance(recipe.train.epochs, float)  # YAML int accepted as float
    assert recipe.train.adam_betas == (0.9, 0.95)
    assert [(loss.type, loss.weight) for loss in recipe.dpo.losses] == [("sigmoid", 0.8), ("bco_pair", 0.2)]
    assert recipe.stages == ("sft", "dpo", "eval", "export")
    assert recipe.logging.report_to == ("tensorboard", "wandb")
    with pytest.raises(dataclasses.FrozenInstanceError):
        recipe.seed = 1
    with pytest.raises(TypeError):
        LoraSection(8)  # keyword-only
    assert not hasattr(recipe.lora, "__dict__")  # slotted


def test_absent_keys_and_empty_sections_take_the_documented_defaults():
    recipe = parse_recipe({**MINIMAL, "lora": None})
    assert recipe.lora == LoraSection()
    assert recipe.lora.target_modules == ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
    assert (recipe.lora.r, recipe.lora.alpha, recipe.lora.dropout) == (16, 32, 0.05)
    assert recipe.data.max_length == 4096 and recipe.data.max_image_pixels == 89_478_485
    assert recipe.train.lr == 2.0e-4 and recipe.dpo.beta == 0.1 and recipe.seed == 42


def test_round_trip_through_plain_data_and_the_resolved_file(tmp_path):
    recipe = load_recipe(write(tmp_path, FULL_YAML))
    assert parse_recipe(recipe_to_dict(recipe)) == recipe
    resolved = save_resolved(recipe, tmp_path / "run")
    assert resolved == tmp_path / "run" / RESOLVED_RECIPE_NAME
    assert load_recipe(resolved) == recipe


def test_parse_does_not_mutate_the_callers_mapping():
    mapping = copy.deepcopy(MINIMAL)
    parse_recipe(mapping, ["data.train.0.weight=3", "lora.target_modules.0=q"])
    assert mapping == MINIMAL


# ----------------------------------------------------------------------------------------------- type errors


def test_unknown_key_names_its_path_and_the_nearest_key():
    (problem,) = problems_of(with_(MINIMAL, lora={"dropuot": 0.1}))
    assert problem == (
        "unknown key 'lora.dropuot' — did you mean 'lora.dropout'? Its value 0.1 would be ignored: rename or delete it."
    )


def test_unknown_key_inside_a_list_item_keeps_the_index():
    (problem,) = problems_of({**MINIMAL, "data": {"train": [{"format": "synthetic", "wieght": 2}]}})
    assert problem.startswith("unknown key 'data.train.0.wieght' — did you mean 'data.train.0.weight'?")


def test_key_in_the_wrong_section_points_to_where_it_belongs():
    (problem,) = problems_of(with_(MINIMAL, model={"lr": 1.0e-4}))
    assert problem.startswith("unknown key 'model.lr' — did you mean 'train.lr' or 'dpo.lr' or 'grpo.lr'?")


def test_unknown_key_without_a_near_match_lists_the_valid_keys():
    (problem,) = problems_of(with_(MINIMAL, export={"zzz": 1}))
    assert problem.startswith(
        "unknown key 'export.zzz' (valid keys in 'export': adapter, merged, merged_dtype, hub_id, private, "
        "base_model_id, merge_base)."
    )


def test_wrong_type_names_path_value_and_expected_type():
    (problem,) = problems_of(with_(MINIMAL, model={"num_crops": "many"}))
    assert problem == "model.num_crops = 'many': expected int, got a string. Fix: write int."


def test_booleans_are_not_numbers_and_numbers_are_not_strings():
    problems = problems_of(with_(MINIMAL, model={"num_crops": True, "revision": 2024}))
    assert problems == (
        "model.revision = 2024: expected str or null, got an integer. Fix: quote it: '2024'.",
        "model.num_crops = True: expected int, got a boolean. Fix: write int.",
    )


@pytest.mark.parametrize(
    ("written", "hint"),
    [
        ("1e-4", "PyYAML reads 1e-4 (no dot) as a string: write 1.0e-4"),
        ("5E-5", "PyYAML reads 5E-5 (no dot) as a string: write 5.0e-5"),
        ("1.0e4", "PyYAML reads 1.0e4 (no sign after e) as a string: write 1.0e+4"),
        ("2e4", "PyYAML reads 2e4 (no dot, no sign after e) as a string: write 2.0e+4"),
    ],
)
def test_a_number_pyyaml_reads_as_a_string_says_how_to_write_it(tmp_path, written, hint):
    path = write(
        tmp_path, f"data: {{train: [{{format: synthetic}}]}}\ntrain: {{max_steps: 2, lr: {written}}}\n"
    )
    with pytest.raises(RecipeError) as caught:
        load_recipe(path)
    assert caught.value.problems == (f"train.lr = '{written}': expected float, got a string. Fix: {hint}.",)
    assert str(caught.value).startswith(f"recipe file {path}: 1 problem(s) in the recipe:\n  - train.lr")
    assert load_recipe(path, [f"train.lr={hint.rsplit(' ', 1)[1]}"]).train.lr == float(written)


def test_a_quoted_number_says_to_drop_the_quotes():
    (problem,) = problems_of(with_(MINIMAL, train={"max_steps": 2, "lr": "0.001"}))
    assert (
        problem
        == "train.lr = '0.001': expected float, got a string. Fix: the number is quoted: write 0.001 without quotes."
    )


def test_literal_fields_list_the_allowed_values_and_suggest_the_nearest():
    problems = problems_of(with_(MINIMAL, model={"dtype": "bf16", "vision": "thawed"}))
    assert problems == (
        "model.dtype = 'bf16': expected one of 'bfloat16', 'float16', 'float32'. Fix: write 'bfloat16'.",
        "model.vision = 'thawed': expected one of 'frozen', 'lora', 'full'. Fix: write one of them.",
    )


def test_lists_mappings_and_sections_are_checked_item_by_item():
    problems = problems_of(
        with_(
            MINIMAL,
            lora={"target_modules": "qkv_proj"},
            data={"train": [{"format": "synthetic", "columns": {"q": 1}}]},
            stages=["sft", "train"],
            eval=[1],
        )
    )
    assert problems == (
        "lora.target_modules = 'qkv_proj': expected list of str, got a string. Fix: write a YAML list, e.g. [qkv_proj].",
        "data.train.0.columns.q = 1: expected str, got an integer. Fix: quote it: '1'.",
        "eval = [1]: expected mapping, got a list. Fix: write eval as a mapping of its keys (tasks, limit, when, "
        "every_steps, max_new_tokens, batch_size, gate_margin).",
        "stages.1 = 'train': expected one of 'sft', 'dpo', 'grpo', 'eval', 'export'. Fix: write one of them.",
    )


def test_out_of_range_numbers_name_the_range_and_the_default():
    problems = problems_of(
        with_(MINIMAL, lora={"r": 0}, train={"max_steps": 2, "lr": 0, "adam_betas": [0.9, 1.0]})
    )
    assert problems == (
        "lora.r = 0: out of range: LoRA rank must be >= 1. Fix: set a value >= 1; the default is 16.",
        "train.lr = 0.0: out of range: Peak learning rate of the language model (LoRA or full) must be > 0. "
        "Fix: set a value > 0; the default is 0.0002.",
        "train.adam_betas.1 = 1.0: out of range: AdamW [beta1, beta2] must be in [0, 1). "
        "Fix: set a value in [0, 1); the default is [0.9, 0.999].",
    )


def test_nan_is_in_no_range(tmp_path):
    path = write(tmp_path, "data: {train: [{format: synthetic}]}\ntrain: {max_steps: 2, lr: .nan}\n")
    with pytest.raises(RecipeError, match=r"train.lr = nan: out of range: .* must be > 0"):
        load_recipe(path)


def test_a_recipe_that_is_not_a_mapping_or_not_yaml_is_refused(tmp_path):
    with pytest.raises(RecipeError, match=r"<top level> = \['sft'\]: the recipe is a list, not a mapping"):
        parse_recipe(["sft"])
    with pytest.raises(
        RecipeError, match=r"(?s)recipe file .*bad.yaml: 1 problem.*not valid YAML.*bad.yaml\", line 2"
    ):
        load_recipe(write(tmp_path, "model:\n  name_or_path: [tiny\n", "bad.yaml"))


# ----------------------------------------------------------------------------------------------- overrides


def test_overrides_use_dotted_paths_yaml_values_and_list_indices(tmp_path):
    path = write(tmp_path, FULL_YAML)
    recipe = load_recipe(
        path,
        [
            "train.lr=2.0e-4",
            "data.train.1.weight=2",
            "lora.target_modules.1=v_proj",
            "data.train.0.columns.a=label",
            "dpo.losses.1.type=ipo",
            "eval.limit=null",
            "stages=[sft, dpo]",
            "model.revision='2024'",
        ],
    )
    assert recipe.train.lr == 2.0e-4
    assert recipe.data.train[1].weight == 2.0 and isinstance(recipe.data.train[1].weight, float)
    assert recipe.lora.target_modules == ("qkv_proj", "v_proj")
    assert recipe.data.train[0].columns == {"q": "question", "a": "label"}
    assert recipe.dpo.losses[1].type == "ipo"
    assert recipe.stages == ("sft", "dpo") and recipe.model.revision == "2024"


def test_override_of_a_default_list_item_starts_from_the_default():
    recipe = parse_recipe(MINIMAL, ["lora.target_modules.3=mlp", "dpo.losses.0.weight=0.5"])
    assert recipe.lora.target_modules == ("qkv_proj", "o_proj", "gate_up_proj", "mlp")
    assert recipe.dpo.losses[0].type == "sigmoid" and recipe.dpo.losses[0].weight == 0.5


def test_bad_overrides_are_reported_with_the_file_problems():
    problems = problems_of(
        with_(MINIMAL, seed="x"),
        [
            "lora.dropuot=0.1",
            "data.train.2.weight=1",
            "lora.r.x=1",
            "train.lr",
            "train.lr=[",
            "train.lr=1e-4",
        ],
    )
    assert problems == (
        "override lora.dropuot: unknown key 'lora.dropuot' — did you mean 'lora.dropout'? Its value 0.1 would be "
        "ignored: rename or delete it.",
        "override data.train.2.weight = 1: 'data.train' cannot be addressed so: it has 1 item(s), indexed from 0, "
        "so there is no item '2'. Fix: set the whole of 'data.train' instead.",
        "override lora.r.x = 1: 'lora.r' cannot be addressed so: it holds int, which has no key 'x'. "
        "Fix: set the whole of 'lora.r' instead.",
        "override 'train.lr': not key=value, so it cannot be applied. Fix: write a dotted key, '=' and a YAML "
        "value, e.g. train.lr=2.0e-4 or data.train.0.weight=2.",
        "override train.lr = '[': the value is not valid YAML (while parsing a flow node). "
        "Fix: quote it: train.lr='...'.",
        "train.lr = '1e-4': expected float, got a string. Fix: PyYAML reads 1e-4 (no dot) as a string: write 1.0e-4.",
        "seed = 'x': expected int, got a string. Fix: write int.",
    )


# ----------------------------------------------------------------------------------------------- cross-field checks


def test_cross_field_problems_are_collected_into_one_error():
    mapping = with_(
        MINIMAL,
        stages=["dpo", "sft", "eval"],
        data={"train": [{"format": "vqa", "path": "x"}], "max_length": 1024},
        dpo={"label_smoothing": 0.1, "losses": [{"type": "sigmoid"}, {"type": "ipo"}]},
        train={"max_steps": 10, "epochs": 1},
    )
    with pytest.raises(RecipeError) as caught:
        parse_recipe(mapping)
    assert caught.value.problems == (
        "stages = ['dpo', 'sft', 'eval']: stages run in the order sft, dpo, grpo, eval, export: each uses the output of "
        "the one before. Fix: write ['sft', 'dpo', 'eval'].",
        "data.max_length = 1024: the smallest image takes 1321 tokens at model.num_crops=16, so no sample with an "
        "image would fit. Fix: raise data.max_length above that plus the text, or lower model.num_crops.",
        "data.train = ['vqa']: stage dpo needs a source in one of the formats rlaif_v, synthetic, trl_preference. "
        "Fix: add such a source, or remove dpo from stages.",
        "train.max_steps = 10: train.epochs is set too (1.0), so it is unclear which one ends training. "
        "Fix: keep one and set the other to null (on the command line: train.epochs=null).",
        "dpo.label_smoothing = 0.1: the 'ipo' loss (dpo.losses.1) has no label smoothing, so it would be ignored. "
        "Fix: set dpo.label_smoothing: 0.0, or use only the sigmoid and robust losses.",
        "eval.tasks = []: the eval stage would score nothing. Fix: list task names, or remove eval from stages.",
    )
    assert str(caught.value).startswith("<dict>: 6 problem(s) in the recipe:\n  - stages = ")
    fits = with_(
        MINIMAL, model={"num_crops": 1}, data={"train": [{"format": "synthetic"}], "max_length": 1024}
    )
    assert parse_recipe(fits).data.max_length == 1024  # 313 tokens at one crop


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"stages": []}, "stages = []: nothing would run. Fix: list some of sft, dpo, grpo, eval, export."),
        (
            {"stages": ["export", "sft", "sft"]},
            "stages = ['export', 'sft', 'sft']: 'sft' is listed twice, so it would run twice. Fix: list it once.",
        ),
        (
            {"stages": ["export", "sft", "sft"]},
            "stages = ['export', 'sft', 'sft']: stages run in the order sft, dpo, grpo, eval, export: each uses the "
            "output of the one before. Fix: write ['sft', 'export'].",
        ),
        (
            {"train": {}},
            "train.max_steps = None: train.epochs is null too, so training has no length. "
            "Fix: set one, e.g. train.epochs: 1.0.",
        ),
        (
            {"data": {"train": [{"format": "rlaif_v", "path": "openbmb/RLAIF-V-Dataset"}]}},
            "data.train = ['rlaif_v']: stage sft needs a source in one of the formats llava, sharegpt, synthetic, "
            "trl_messages, vqa. Fix: add such a source, or remove sft from stages.",
        ),
        (
            {"data": {"train": [{"format": "synthetic"}, {"format": "trl_preference", "path": "p"}]}},
            "data.train.1.format = 'trl_preference': no stage in stages ['sft', 'export'] reads this format, so the "
            "source would be ignored. Fix: remove the source, or add the stage that reads it.",
        ),
        (
            {"data": {"train": [{"format": "vqa"}]}},
            "data.train.0.path = '': the source has nothing to read. "
            "Fix: give a hub dataset id or a local file or directory.",
        ),
        (
            {"model": {"attn_implementation": "flash_attention_2", "dtype": "float32"}},
            "model.attn_implementation = 'flash_attention_2': flash-attention runs only in 16 bits, but model.dtype "
            "is 'float32'. Fix: set model.dtype: bfloat16, or model.attn_implementation: sdpa.",
        ),
        (
            {"lora": {"target_modules": []}},
            "lora.target_modules = []: model.language is lora but no module would get an adapter. "
            "Fix: list module names, or delete lora.target_modules to get the defaults.",
        ),
        (
            {"model": {"language": "full"}},
            "export.adapter = True: no part of the model trains with LoRA, so there is no adapter to save. "
            "Fix: set export.adapter: false and export.merged: true.",
        ),
        (
            {"export": {"adapter": False}},
            "export.adapter = False: export.merged is false too, so the export stage would write nothing. "
            "Fix: set export.adapter or export.merged to true.",
        ),
        (
            {"train": {"max_steps": 2, "resume": True}, "output_dir": "runs/x", "overwrite_output_dir": True},
            "train.resume = True: overwrite_output_dir is true too, and overwriting deletes the checkpoints to "
            "resume from. Fix: set overwrite_output_dir: false.",
        ),
        (
            {"train": {"max_steps": 2, "resume": True}},
            "train.resume = True: output_dir is null, so the run gets a fresh directory without checkpoints. "
            "Fix: set output_dir to the run directory to resume.",
        ),
        (
            {"train": {"max_steps": 2, "adam_betas": [0.9]}},
            "train.adam_betas = [0.9]: AdamW takes two betas. Fix: write [0.9, 0.999].",
        ),
        (
            {"stages": ["sft", "eval"], "eval": {"tasks": ["chartqa"], "when": ["base", "dpo", "base"]}},
            "eval.when = ['base', 'dpo', 'base']: 'base' is listed twice, so it would be scored twice. "
            "Fix: list it once.",
        ),
        (
            {
                "stages": ["sft", "dpo"],
                "data": {"train": [{"format": "synthetic"}]},
                "dpo": {"from_sft": "runs/a"},
            },
            "dpo.from_sft = 'runs/a': stages run sft too, so DPO would have two starting points. "
            "Fix: set dpo.from_sft: null to start from this run's SFT, or remove sft from stages.",
        ),
        (
            {"logging": {"report_to": ["wandb", "wandb"]}},
            "logging.report_to = ['wandb', 'wandb']: 'wandb' is listed twice, so it would log twice. "
            "Fix: list it once.",
        ),
    ],
)
def test_each_cross_field_check_says_what_breaks_and_how_to_fix_it(changes, expected):
    assert expected in problems_of(with_(MINIMAL, **changes))


def test_eval_when_must_name_stages_that_run():
    problems = problems_of(
        with_(MINIMAL, stages=["sft", "eval"], eval={"tasks": ["chartqa"], "when": ["dpo"]})
    )
    assert problems == (
        "eval.when = ['dpo']: stage dpo does not run, so there is no dpo model to score. "
        "Fix: add dpo to stages, or remove it from eval.when.",
    )


def test_an_eval_only_recipe_needs_no_training_data_or_length():
    recipe = parse_recipe({"stages": ["eval"], "eval": {"tasks": ["chartqa"], "when": ["base"]}})
    assert recipe.stages == ("eval",) and recipe.data.train == ()


def test_settings_without_effect_warn():
    full = with_(MINIMAL, model={"language": "full"}, export={"adapter": False, "merged": True})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        parse_recipe(full)  # an untouched lora section says nothing
    with pytest.warns(RecipeWarning, match="the lora section is ignored: model.language is full"):
        parse_recipe(with_(full, lora={"r": 8}))
    with pytest.warns(RecipeWarning, match="train.lr_vision = 1e-05 is ignored: model.vision is frozen"):
        parse_recipe(with_(MINIMAL, train={"max_steps": 2, "lr_vision": 1.0e-5}))


# ----------------------------------------------------------------------------------------------- provenance


def test_provenance_names_default_file_or_override_for_every_key(tmp_path):
    path = write(tmp_path, FULL_YAML)
    recipe = load_recipe(path, ["train.lr=3.0e-4", "data.train.1.weight=2", "lora.target_modules.0=q_proj"])
    origins = provenance(recipe)
    assert set(origins) == flat_keys(recipe_to_dict(recipe))
    from_file = f"recipe file {path}"
    assert origins["model.name_or_path"] == from_file
    assert origins["model.attn_implementation"] == "default"
    assert origins["train.lr"] == "override"
    assert origins["data.train.1.weight"] == "override"
    assert origins["data.train.1.path"] == from_file
    assert origins["data.train.0.weight"] == "default"
    assert origins["lora.target_modules"] == "override"
    assert origins["data.train.0.columns"] == from_file
    assert origins["dpo.losses.1.type"] == from_file


def test_provenance_of_a_default_list_filled_in_for_an_override():
    origins = provenance(parse_recipe(MINIMAL, ["dpo.losses.0.weight=0.5"]))
    assert origins["dpo.losses.0.weight"] == "override"
    assert origins["dpo.losses.0.type"] == "default"
    assert origins["data.train.0.format"] == "<dict>"


def test_provenance_keeps_recipes_frozen_and_comparable_and_covers_code_built_ones(tmp_path):
    from_file = load_recipe(write(tmp_path, yaml.safe_dump(MINIMAL)))
    from_dict = parse_recipe(MINIMAL)
    assert from_file == from_dict and provenance(from_file) != provenance(from_dict)
    built = dataclasses.replace(from_dict, seed=3)
    origins = provenance(built)
    assert origins["seed"] == "set in code" and origins["model.dtype"] == "default"
    assert origins["data.train.0.format"] == "set in code"
    assert "_provenance" not in recipe_to_dict(from_file) and "_provenance" not in repr(from_file)
    unpickled = pickle.loads(pickle.dumps(from_file))  # DataLoader workers and launchers may pickle it
    assert unpickled == from_file and provenance(unpickled) == provenance(from_file)


def test_resolved_file_lists_provenance_and_redacts_secrets(tmp_path):
    mapping = with_(
        MINIMAL,
        data={
            "train": [
                {"format": "synthetic", "columns": {"hf_token": "hf_abc123", "q": "question"}},
                {"format": "vqa", "path": "https://me:s3cret@example.org/charts.jsonl"},
            ]
        },
    )
    recipe = parse_recipe(mapping, ["seed=9"], source="recipe file demo.yaml")
    text = save_resolved(recipe, tmp_path / "run").read_text()
    assert "hf_abc123" not in text and "s3cret" not in text
    assert "https://<redacted>@example.org/charts.jsonl" in text and "hf_token: <redacted>" in text
    assert "#   seed: override\n" in text
    assert "#   data.train.0.columns: recipe file demo.yaml\n" in text
    assert "#   model.dtype: default\n" in text
    assert yaml.safe_load(text)["data"]["train"][0]["columns"]["q"] == "question"


def test_redact_secrets_hides_credential_keys_only():
    plain = {
        "wandb_api_key": "k",
        "eval": {"max_new_tokens": 5, "password": "p", "token": None},
        "x": ["a://u@h"],
    }
    assert redact_secrets(plain) == {
        "wandb_api_key": "<redacted>",
        "eval": {"max_new_tokens": 5, "password": "<redacted>", "token": None},
        "x": ["a://<redacted>@h"],
    }


# ----------------------------------------------------------------------------------------------- help, run dir


LIST_OF_SECTIONS = {"data.train": Source, "data.eval": Source, "dpo.losses": DpoLoss}


def schema_fields(cls: type, path: str = ""):
    """(dotted path, field) of every schema field, read straight from the dataclasses."""
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        sub = f"{path}.{f.name}" if path else f.name
        yield sub, f
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            yield from schema_fields(type(default), sub)
        if sub in LIST_OF_SECTIONS:
            yield from schema_fields(LIST_OF_SECTIONS[sub], f"{sub}.N")


def test_help_lists_every_field_with_type_default_and_doc():
    text = recipe_help()
    fields = dict(schema_fields(Recipe))
    assert len(fields) > 90
    for path, f in fields.items():
        assert f.metadata["doc"], f"{path} has no doc"
        assert f"{path}: {f.metadata['doc']}\n" in text or f"{path} (" in text, path
        assert f.metadata["doc"] in text, path
    assert "  train.lr (float > 0; default 0.0002)\n      Peak learning rate" in text
    assert "  model.revision (str or null; default null)" in text
    assert "  dpo.losses.N.type (one of 'sigmoid', 'ipo'," in text
    assert "  data.train.N.columns (mapping of str to str; default {})" in text


def test_output_dir_is_the_recipes_or_runs_name_timestamp():
    recipe = parse_recipe(MINIMAL)
    now = datetime(2025, 1, 2, 3, 4, 5)
    assert resolve_output_dir(recipe, "recipes/demo.yaml", now=now) == Path("runs/demo-20250102-030405")
    assert resolve_output_dir(recipe, None, now=now) == Path("runs/recipe-20250102-030405")
    chosen = parse_recipe(with_(MINIMAL, output_dir="/scratch/run1"))
    assert resolve_output_dir(chosen, "recipes/demo.yaml") == Path("/scratch/run1")


def test_export_hub_id_must_be_org_slash_name():
    (problem,) = problems_of(with_(MINIMAL, export={"hub_id": "not a repo"}))
    assert problem.startswith("export.hub_id = 'not a repo': a hub repository id is ORG/NAME")
    assert (
        parse_recipe(with_(MINIMAL, export={"hub_id": "me/phi3v-chartqa"}), ()).export.hub_id
        == "me/phi3v-chartqa"
    )


# ----------------------------------------------------------------------------------------------- said twice


def test_a_key_given_twice_in_one_mapping_is_an_error_naming_the_key_and_both_lines(tmp_path):
    text = "train:\n  lr: 1.0e-4\n  max_steps: 2\n  lr: 2.0e-4\ndata:\n  train:\n    - {format: synthetic, limit: 1, limit: 2}\n"
    with pytest.raises(RecipeError) as error:
        load_recipe(write(tmp_path, text))
    message = str(error.value)
    assert "key 'train.lr' is given twice in one mapping (line 2 and line 4)" in message, message
    assert "key 'data.train.0.limit' is given twice in one mapping (line 7 and line 7)" in message, message
    assert "2 problem(s)" in message


def test_strict_yaml_reads_what_safe_load_reads_merge_keys_and_anchors_included(tmp_path):
    from config.strict_yaml import strict_safe_load

    text = (
        "base: &b {lr: 1, steps: 2}\nother:\n  <<: *b\n  lr: 3\nlist: [*b, *b]\nwhen: 2026-01-01\n"
        "n: 0x10\nyes_: yes\n"
    )
    assert strict_safe_load(text) == yaml.safe_load(text)
    with pytest.raises(yaml.YAMLError, match="key '1' is given twice"):
        strict_safe_load("1: a\n0x1: b\n")  # the same key once constructed, as safe_load would keep only one
    with pytest.raises(yaml.constructor.ConstructorError):  # what safe_load refuses stays refused
        strict_safe_load("!!python/object:os.system {}\n")


def test_an_override_given_twice_takes_the_last_value_with_a_warning_naming_both(tmp_path):
    path = write(tmp_path, yaml.safe_dump(MINIMAL))
    with pytest.warns(
        RecipeWarning, match=r"override train.lr is given 2 times \(train.lr=1.0e-3, train.lr=2.0e-3\)"
    ):
        recipe = load_recipe(path, ["train.lr=1.0e-3", "train.lr=2.0e-3"])
    assert recipe.train.lr == 2.0e-3


def test_an_override_value_with_a_key_twice_is_refused():
    with pytest.raises(RecipeError, match="given twice"):
        parse_recipe(MINIMAL, ["data.train.0.columns={q: a, q: b}"])
