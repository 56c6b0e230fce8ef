"""The recipe contract every package above it reads (it imports only `runtime` and `models`): the typed schema
(`schema`), reading YAML with overrides, provenance and `--help` (`parse`, `strict_yaml`), and every cross-field
rule (`checks`). A recipe file lives in `recipes/`; this package is what a recipe means."""

from config.parse import (
    RecipeError,
    RecipeWarning,
    load_recipe,
    parse_recipe,
    provenance,
    recipe_help,
    recipe_to_dict,
)
from config.schema import (
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
