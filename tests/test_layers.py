"""The house rules: packages import only downward (runtime <- models <- config <- rundir <- data <- eval <- train), nothing imports a
training entry point, the recipe's named choices equal the registries that implement them, and only the run-directory
module spells the layout of a run directory."""

from __future__ import annotations

import ast
import re
import typing
from pathlib import Path

import pytest

from .conftest import REPO

LAYERS = (
    "runtime",
    "models",
    "config",
    "rundir",
    "data",
    "eval",
    "train",
)  # each may import only itself and those before it
ENTRY_POINTS = {
    "train.sft",
    "train.dpo",
    "train.grpo",
    "train.memory",
    "train.dry_run",
    "train.export.__main__",
    "eval.__main__",
}
OWNER = REPO / "rundir" / "layout.py"  # the run directory's layout


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """Every project module `path` imports, at module level or inside functions (relative imports resolved)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return {name for name in found if name.split(".")[0] in LAYERS}


def project_files() -> list[Path]:
    return sorted(p for layer in LAYERS for p in (REPO / layer).rglob("*.py"))


def test_no_package_imports_a_higher_layer():
    upward = []
    for path in project_files():
        own = LAYERS.index(module_name(path).split(".")[0])
        for name in imported_modules(path):
            if LAYERS.index(name.split(".")[0]) > own:
                upward.append(f"{path.relative_to(REPO)} imports {name}")
    assert upward == []


def test_the_module_graph_has_no_cycle_and_no_module_imports_an_entry_point():
    modules = {module_name(p): p for p in project_files()}
    graph = {
        name: {m for m in imported_modules(path) if m in modules and m != name}
        for name, path in modules.items()
    }
    importers_of_entry_points = sorted(
        f"{name} -> {m}"
        for name, deps in graph.items()
        for m in deps
        if m in ENTRY_POINTS and not name.startswith(m)
    )
    assert importers_of_entry_points == []

    state: dict[str, str] = {}

    def visit(name: str, trail: list[str]) -> None:
        state[name] = "open"
        for dep in sorted(graph[name]):
            if state.get(dep) == "open":
                pytest.fail(
                    "import cycle: " + " -> ".join([*trail[trail.index(dep) :], dep])
                    if dep in trail
                    else f"import cycle through {dep}"
                )
            if dep not in state:
                visit(dep, [*trail, dep])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_no_train_module_is_named_for_nothing_or_shadows_a_package():
    names = {p.stem for layer in LAYERS for p in (REPO / layer).rglob("*.py")}
    assert not names & {"common", "parts", "stage", "plan", "utils", "helpers", "misc", *LAYERS}


def test_the_recipe_choices_equal_the_registries():
    from config import schema
    from data.adapters import PREFERENCE_ADAPTERS, SFT_ADAPTERS
    from eval.tasks import TASKS
    from train.preference.losses import LABEL_SMOOTHING_LOSS_TYPES, LOSS_TYPES

    assert typing.get_args(schema.DpoLossType) == LOSS_TYPES
    assert schema.LABEL_SMOOTHING_LOSSES == LABEL_SMOOTHING_LOSS_TYPES
    assert set(typing.get_args(schema.EvalTask)) == set(TASKS)
    assert schema.STAGE_FORMATS["sft"] == {*SFT_ADAPTERS, "synthetic"}
    assert schema.STAGE_FORMATS["dpo"] == {*PREFERENCE_ADAPTERS, "synthetic"}
    assert set(typing.get_args(schema.SourceFormat)) == {*SFT_ADAPTERS, *PREFERENCE_ADAPTERS, "synthetic"}


LAYOUT = re.compile(r"recipe\.resolved\.yaml|sft/adapter|sft/merged|start\.json|run\.lock")


def test_only_the_run_directory_package_spells_the_layout():
    spelled = [
        f"{p.relative_to(REPO)}:{i}"
        for p in project_files()
        if OWNER.parent not in p.parents
        for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
        if LAYOUT.search(line)
    ]
    assert spelled == []


# Names of the layout that are also ordinary words elsewhere, each for the reason given; every other name the run
# directory's owner exports must not be written as a string literal in any other module.
SHARED_WORDS = {
    "BASE": "'base' is also the stage name of the base model (results, reports)",
    "EVAL": "'eval' is also a data split and a stage name",
    "ADAPTER": "'adapter' is also the subfolder of an uploaded hub repository",
    "CHECKPOINT_CONFIG": "'config.json' is the hub checkpoint's own file (models/phi3v/export_files.py owns it)",
    "MANIFEST": "'manifest.json' is also the synthetic dataset's record (data/synthetic.py)",
    "PREDICTIONS": "'predictions' is also a key of the eval cache's entries",
    "EVAL_CACHE": "'cache' is also the KV cache's keyword in generation",
    "REFERENCE_LOGPS": "'ref_logps' is also the name of a tensor in that cache and in a GRPO batch",
    "TENSORBOARD": "'tensorboard' is also a tracker's name in the recipe (logging.report_to)",
    "WANDB": "'wandb' is also a tracker's name in the recipe and a package whose version env.json records",
}


def test_every_name_the_run_directory_owner_exports_is_spelled_only_there():
    import ast

    owner = OWNER
    names = {
        node.targets[0].id: node.value.value
        for node in ast.parse(owner.read_text()).body
        if isinstance(node, ast.Assign)
        and isinstance(node.value, ast.Constant)
        and isinstance(node.value.value, str)
    }
    assert {"RESULTS", "REPORT", "LOCK", "STEP", "PREFERENCE_EVAL", "DURING_TRAINING", "PLANS_DIR"} <= set(
        names
    )
    assert set(SHARED_WORDS) <= set(names)
    spelled = [
        f"{name} {value!r}: {p.relative_to(REPO)}:{i}"
        for name, value in names.items()
        if name not in SHARED_WORDS
        for p in project_files()
        if p != owner
        for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
        if f'"{value}"' in line or f"'{value}'" in line
    ]
    assert spelled == []


def test_no_code_comment_cites_a_document_outside_the_repository():
    cited = re.compile(r"REFERENCE\.md|DESIGN\.md|STYLE\.md")
    files = [*project_files(), *(REPO / "benchmarks").glob("*.py"), *(REPO / "tests").rglob("*.py")]
    hits = [
        str(p.relative_to(REPO)) for p in files if p.name != "test_layers.py" and cited.search(p.read_text())
    ]
    assert hits == []
    for path in files:
        for anchor in re.findall(r"docs/(\w+\.md)(?:#([\w-]+))?", path.read_text(encoding="utf-8")):
            doc = REPO / "docs" / anchor[0]
            assert doc.is_file(), f"{path} cites docs/{anchor[0]}, which does not exist"
            if anchor[1]:
                headings = {
                    re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
                    for h in re.findall(r"^#+ (.+)$", doc.read_text(encoding="utf-8"), flags=re.M)
                }
                assert anchor[1] in headings, f"{path} cites docs/{anchor[0]}#{anchor[1]}, no such heading"


def test_the_layout_document_lists_every_name_the_owner_exports():
    names = {
        node.targets[0].id: node.value.value
        for node in ast.parse(OWNER.read_text()).body
        if isinstance(node, ast.Assign)
        and isinstance(node.value, ast.Constant)
        and isinstance(node.value.value, str)
    }
    document = (REPO / "docs" / "architecture.md").read_text(encoding="utf-8")
    section = document[document.index("## Run directory") :]
    section = section[: section.index("\n## ", 1)]
    assert [f"{name} {value!r}" for name, value in names.items() if value not in section] == []
