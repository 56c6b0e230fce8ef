"""The recipe contract every package may import (it imports only `models`): the typed schema (`schema`), reading
YAML with overrides, provenance and `--help` (`parse`), every cross-field rule (`checks`), and the run directory's
layout, weights and atomic writes (`run_dir`)."""

from recipe.parse import (
    RecipeError,
    RecipeWarning,
    load_recipe,
    parse_recipe,
    provenance,
    recipe_help,
    recipe_to_dict,
)
from recipe.schema import (
    DataSection,
    DpoSection,
    EvalSection,
    ExportSection,
    LoggingSection,
    LoraSection,
    ModelSection,
    Recipe,
    Source,
    TrainSection,
)

__all__ = [
    "DataSection",
    "DpoSection",
    "EvalSection",
    "ExportSection",
    "LoggingSection",
    "LoraSection",
    "ModelSection",
    "Recipe",
    "RecipeError",
    "RecipeWarning",
    "Source",
    "TrainSection",
    "load_recipe",
    "parse_recipe",
    "provenance",
    "recipe_help",
    "recipe_to_dict",
]
