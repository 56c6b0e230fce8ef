"""Typed recipes: one YAML file -> the frozen dataclasses of `config/schema.py`, validated once.

    recipe = load_recipe("recipes/demo.yaml", ["train.lr=2.0e-4", "data.train.0.weight=2"])
    print(recipe_help())             # every key with its type, default and documentation
    resolved_yaml(recipe)            # every value, secrets redacted, with where each came from (rundir/layout.py
                                     # writes it into the run directory; load_recipe reads it back)

Parsing collects every problem (unknown keys with the nearest valid key, wrong types, bad overrides), then checks
the fields against each other, and raises one `RecipeError` listing them all: key path, value, consequence, fix.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import json
import re
import types
import typing
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml

from config.checks import issue, recipe_problems, recipe_warnings, show
from config.schema import Recipe
from config.strict_yaml import DuplicateKeys, duplicate_message, strict_safe_load
from runtime.user_errors import REDACTED, SECRET_KEY, URL_CREDENTIALS, redact_message, redact_secrets  # noqa: F401 (re-exported)

DEFAULT = "default"
OVERRIDE = "override"
IN_CODE = "set in code"
# A number PyYAML (YAML 1.1) reads as a string: no dot, or an exponent without a sign (1e-4, 5E-5, 1.0e4).
EXPONENT_NUMBER = re.compile(r"([-+]?)(\d+)(?:\.(\d*))?[eE]([-+]?)(\d+)")
YAML_KINDS = {type(None): "null", bool: "a boolean", int: "an integer", float: "a float", str: "a string"}
YAML_KINDS |= {list: "a list", dict: "a mapping"}


class RecipeError(ValueError):
    """Every problem of one recipe; `.problems` holds one self-contained line per problem."""

    def __init__(self, source: str, problems: Sequence[str]):
        self.problems = tuple(problems)
        listing = "\n".join(f"  - {problem}" for problem in self.problems)
        super().__init__(f"{source}: {len(self.problems)} problem(s) in the recipe:\n{listing}")


class RecipeWarning(UserWarning):
    """A recipe setting that has no effect on the run."""


# ----------------------------------------------------------------------------------------------- schema walking


def _join(parent: str, key: object) -> str:
    return f"{parent}.{key}" if parent else str(key)


def _schema_fields(cls: type) -> list[dataclasses.Field]:
    """The recipe keys of a section (fields with init=False, like Recipe._provenance, are internal)."""
    return [f for f in dataclasses.fields(cls) if f.init]


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in _schema_fields(cls)}


def _field_default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def _without_none(tp: Any) -> tuple[Any, bool]:
    """(X, True) for `X | None`, else (tp, False)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [arg for arg in typing.get_args(tp) if arg is not type(None)]
        assert len(args) == 1, f"the schema only uses `X | None` unions, got {tp}"
        return args[0], True
    return tp, False


def _item_section(tp: Any) -> type | None:
    """The section class of a `tuple[Section, ...]` type, else None."""
    if typing.get_origin(tp) is tuple and dataclasses.is_dataclass(typing.get_args(tp)[0]):
        return typing.get_args(tp)[0]
    return None


def _type_name(tp: Any, bounds: object = None) -> str:
    """How the recipe spells a type, e.g. `float > 0 or null`."""
    inner, optional = _without_none(tp)
    origin = typing.get_origin(inner)
    if dataclasses.is_dataclass(inner):
        name = "mapping"
    elif origin is Literal:
        name = "one of " + ", ".join(repr(choice) for choice in typing.get_args(inner))
    elif origin is tuple:
        name = f"list of {_type_name(typing.get_args(inner)[0])}"
    elif origin is dict:
        name = "mapping of str to str"
    else:
        name = inner.__name__
    name = f"{name} {bounds}" if bounds is not None else name
    return f"{name} or null" if optional else name


def _schema_walk(cls: type, path: str = "") -> Iterator[tuple[str, dataclasses.Field, Any]]:
    """(dotted path, field, type) of every key the schema knows; list items appear as `.N`."""
    for f in _schema_fields(cls):
        sub, tp = _join(path, f.name), _field_types(cls)[f.name]
        yield sub, f, tp
        inner = _without_none(tp)[0]
        if dataclasses.is_dataclass(inner):
            yield from _schema_walk(inner, sub)
        elif _item_section(inner) is not None:
            yield from _schema_walk(_item_section(inner), f"{sub}.N")


def _leaves(obj: Any, path: str = "") -> Iterator[tuple[str, Any, dataclasses.Field]]:
    """(dotted path, value, field) of every leaf value of a built recipe; list-of-section items by index."""
    for f in _schema_fields(type(obj)):
        sub, value = _join(path, f.name), getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from _leaves(value, sub)
        elif value and isinstance(value, tuple) and dataclasses.is_dataclass(value[0]):
            for index, item in enumerate(value):
                yield from _leaves(item, f"{sub}.{index}")
        else:
            yield sub, value, f


def _plain(value: Any) -> Any:
    """A recipe value as plain YAML data: sections -> dicts, tuples -> lists."""
    if dataclasses.is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in _schema_fields(type(value))}
    if isinstance(value, tuple):
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        return dict(value)
    return value


def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    """The recipe as plain data; `parse_recipe(recipe_to_dict(r)) == r`."""
    return _plain(recipe)


# ----------------------------------------------------------------------------------------------- messages


def _yaml_kind(value: Any) -> str:
    return YAML_KINDS.get(type(value), type(value).__name__)


def _unknown_key(parent: str, key: object, value: Any, names: list[str]) -> str:
    """Names the nearest valid key: a sibling spelt alike, else the same name in another section."""
    close = difflib.get_close_matches(str(key), names, n=1)
    elsewhere = [path for path, _, _ in _schema_walk(Recipe) if path.rsplit(".", 1)[-1] == str(key)]
    if close:
        hint = f" — did you mean '{_join(parent, close[0])}'?"
    elif elsewhere:
        hint = " — did you mean " + " or ".join(f"'{path}'" for path in elsewhere) + "?"
    else:
        hint = f" (valid keys{f' in {parent!r}' if parent else ''}: {', '.join(names)})."
    shown = REDACTED if SECRET_KEY.search(str(key)) else show(redact_secrets(value))
    return (
        f"unknown key '{_join(parent, key)}'{hint} Its value {shown} would be ignored: rename or delete it."
    )


def _number_string_fix(text: str) -> str | None:
    """Why PyYAML kept a number as a string, and how to write it; None if `text` is no number."""
    match = EXPONENT_NUMBER.fullmatch(text.strip())
    if match:
        sign, whole, fraction, exponent_sign, exponent = match.groups()
        missing = {"no dot": fraction is None, "no sign after e": not exponent_sign}
        reason = ", ".join(why for why, absent in missing.items() if absent)
        written = f"{sign}{whole}.{fraction or 0}e{exponent_sign or '+'}{exponent}"
        return f"PyYAML reads {text} ({reason}) as a string: write {written}"
    try:
        float(text)
    except ValueError:
        return None
    return f"the number is quoted: write {text} without quotes"


def _wrong_type(path: str, value: Any, tp: Any) -> str:
    inner = _without_none(tp)[0]
    fix = _number_string_fix(value) if isinstance(value, str) and inner in (int, float) else None
    if fix is None and typing.get_origin(inner) is tuple and not isinstance(value, (list, dict)):
        fix = f"write a YAML list, e.g. [{value}]"
    if fix is None and inner is str and isinstance(value, (int, float)):
        fix = f"quote it: '{value}'"
    if fix is None and dataclasses.is_dataclass(inner):
        fix = f"write {path} as a mapping of its keys ({', '.join(_field_types(inner))})"
    what = f"expected {_type_name(tp)}, got {_yaml_kind(value)}"
    return issue(path, value, what, fix or f"write {_type_name(tp)}")


def _bound_problems(path: str, value: Any, f: dataclasses.Field) -> list[str]:
    """Numbers outside the field's range (each item, for a list), named with the field's doc and default."""
    bounds, problems = f.metadata["bounds"], []
    items = (
        {_join(path, i): item for i, item in enumerate(value)} if isinstance(value, tuple) else {path: value}
    )
    for item_path, item in items.items():
        if bounds is not None and isinstance(item, (int, float)) and not bounds.admits(item):
            what = f"out of range: {f.metadata['doc'].rstrip('.')} must be {bounds}"
            fix = f"set a value {bounds}; the default is {show(_field_default(f))}"
            problems.append(issue(item_path, item, what, fix))
    return problems


# ----------------------------------------------------------------------------------------------- parsing


@dataclasses.dataclass
class _Parse:
    """What one parse found: problems, keys present, override paths, keys filled from defaults for an override."""

    source: str
    problems: list[str] = dataclasses.field(default_factory=list)
    present: set[str] = dataclasses.field(default_factory=set)
    overridden: set[str] = dataclasses.field(default_factory=set)
    materialized: set[str] = dataclasses.field(default_factory=set)

    def origin(self, path: str) -> str:
        """Where a leaf's value came from; an override of a list item or mapping key marks the whole leaf."""
        if path not in self.present:
            return DEFAULT
        if any(path == o or path.startswith(f"{o}.") or o.startswith(f"{path}.") for o in self.overridden):
            return OVERRIDE
        if any(path == m or path.startswith(f"{m}.") for m in self.materialized):
            return DEFAULT
        return self.source


def _convert(value: Any, tp: Any, path: str, state: _Parse) -> Any:
    """`value` as schema type `tp`; on a mismatch, records the problem and returns None."""
    inner, optional = _without_none(tp)
    origin = typing.get_origin(inner)
    if value is None and optional:
        return None
    if dataclasses.is_dataclass(inner):
        return _build_section({} if value is None else value, inner, path, state)
    if origin is tuple and isinstance(value, list):
        item_tp = typing.get_args(inner)[0]
        return tuple(_convert(item, item_tp, f"{path}.{i}", state) for i, item in enumerate(value))
    if origin is dict and isinstance(value, dict):
        return {str(key): _convert(item, str, _join(path, key), state) for key, item in value.items()}
    if origin is Literal and isinstance(value, str) and value in typing.get_args(inner):
        return value
    if origin is Literal and isinstance(value, str):
        close = difflib.get_close_matches(value, typing.get_args(inner), n=1)
        fix = f"write '{close[0]}'" if close else "write one of them"
        state.problems.append(issue(path, value, f"expected {_type_name(tp)}", fix))
        return None
    if inner is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if inner in (int, str, bool) and type(value) is inner:
        return value
    state.problems.append(_wrong_type(path, value, tp))
    return None


def _build_section(value: Any, cls: type, path: str, state: _Parse) -> Any:
    """A section from a mapping; absent keys keep their defaults, unknown keys are problems."""
    if not isinstance(value, dict):
        state.problems.append(_wrong_type(path, value, cls))
        return None
    field_types = _field_types(cls)
    for key in value:
        if key not in field_types:
            state.problems.append(_unknown_key(path, key, value[key], list(field_types)))
    kwargs = {}
    for f in _schema_fields(cls):
        if f.name in value:
            sub = _join(path, f.name)
            state.present.add(sub)
            kwargs[f.name] = _convert(value[f.name], field_types[f.name], sub, state)
            state.problems += _bound_problems(sub, kwargs[f.name], f)
    return cls(**kwargs)


def _step(tp: Any, node: Any, part: str) -> tuple[Any, Any] | str:
    """One step of an override path: (key, child type) inside `node` of type `tp`, or why it cannot go there."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp) and isinstance(node, dict):
        return (part, _field_types(tp)[part]) if part in _field_types(tp) else "unknown"
    if origin is tuple and isinstance(node, list):
        if part.isdigit() and int(part) < len(node):
            return int(part), typing.get_args(tp)[0]
        return f"it has {len(node)} item(s), indexed from 0, so there is no item {part!r}"
    if origin is dict and isinstance(node, dict):
        return part, str
    return f"it holds {_type_name(tp)}, which has no key {part!r}"


def _override_slot(raw: dict, path: str, value: Any, state: _Parse) -> tuple[Any, Any] | None:
    """The container and key that `path=value` writes to, filling absent keys on the way; None on a problem."""
    node, tp, parent = raw, Recipe, ""
    parts = path.split(".")
    for depth, part in enumerate(parts):
        tp = _without_none(tp)[0]
        step = _step(tp, node, part)
        if step == "unknown":
            unknown = _unknown_key(parent, part, value, list(_field_types(tp)))
            state.problems.append(f"override {path}: {unknown}")
            return None
        if isinstance(step, str):
            what, fix = f"'{parent}' cannot be addressed so: {step}", f"set the whole of '{parent}' instead"
            state.problems.append(issue(f"override {path}", value, what, fix))
            return None
        key, child_tp = step
        if depth == len(parts) - 1:
            return node, key
        if isinstance(node, dict) and node.get(key) is None:
            node[key] = _raw_default(tp, key)
            if node[key]:  # a default list or mapping, copied in so that one item of it can be overridden
                state.materialized.add(_join(parent, key))
        node, tp, parent = node[key], child_tp, _join(parent, key)
    raise AssertionError("unreachable: the loop returns at the last part")


def _raw_default(tp: Any, name: str) -> Any:
    """What an absent key stands for in raw YAML data: {} for a section (its keys stay default), else the default."""
    if not dataclasses.is_dataclass(tp):
        return {}
    default = _field_default(next(f for f in _schema_fields(tp) if f.name == name))
    return {} if dataclasses.is_dataclass(default) else _plain(default)


def _apply_override(raw: dict, text: str, state: _Parse) -> None:
    path, sep, literal = text.partition("=")
    path = path.strip()
    if not sep or not path:
        fix = "write a dotted key, '=' and a YAML value, e.g. train.lr=2.0e-4 or data.train.0.weight=2"
        state.problems.append(f"override {text!r}: not key=value, so it cannot be applied. Fix: {fix}.")
        return
    try:
        value = strict_safe_load(literal)
    except yaml.YAMLError as error:
        what = f"the value is not valid YAML ({str(error).splitlines()[0]})"
        state.problems.append(issue(f"override {path}", literal, what, f"quote it: {path}='...'"))
        return
    slot = _override_slot(raw, path, value, state)
    if slot is not None:
        container, key = slot
        container[key] = value
        state.overridden.add(path)


def _repeated_overrides(overrides: Sequence[str]) -> list[str]:
    """One warning per key given more than once on the command line. The last one wins (documented in
    `recipe_help`): scripts append overrides to a user's (launch.sh adds output_dir=, a test its train.resume=true),
    so the later one is the one meant; the warning names every value so that a typo'd repeat is still seen."""
    given: dict[str, list[str]] = {}
    for text in overrides:
        path, sep, _ = text.partition("=")
        if sep and path.strip():
            given.setdefault(path.strip(), []).append(text)
    return [
        f"override {path} is given {len(texts)} times ({redact_message(', '.join(texts))}): the last one "
        f"applies"
        for path, texts in given.items()
        if len(texts) > 1
    ]


def parse_recipe(
    mapping: dict,
    overrides: Sequence[str] = (),
    source: str = "<dict>",
) -> Recipe:
    """Build a Recipe from plain data plus `path=value` overrides; raise one RecipeError listing every problem.

    `source` names the data in errors and provenance (load_recipe passes "recipe file <path>"). Unknown keys, bad
    overrides, types and ranges are all reported together; the cross-field checks (config/checks.py) run once those
    pass, as they need a well-typed recipe. Settings without effect warn.
    """
    if not isinstance(mapping, dict):
        what = f"the recipe is {_yaml_kind(mapping)}, not a mapping of sections"
        fix = "start with sections such as model: and data:"
        raise RecipeError(source, [issue("<top level>", mapping, what, fix)])
    state = _Parse(source=source)
    raw = copy.deepcopy(mapping)
    for text in overrides:
        _apply_override(raw, text, state)
    recipe = _build_section(raw, Recipe, "", state)
    problems = state.problems or recipe_problems(recipe)
    if problems:
        raise RecipeError(source, problems)
    origins = {path: state.origin(path) for path, _, _ in _leaves(recipe)}
    object.__setattr__(recipe, "_provenance", tuple(origins.items()))  # a tuple: immutable and picklable
    for message in _repeated_overrides(overrides) + recipe_warnings(recipe, origins):
        warnings.warn(message, RecipeWarning, stacklevel=2)
    return recipe


def load_recipe(path: str | Path, overrides: Sequence[str] = ()) -> Recipe:
    """Read a YAML recipe as yaml.safe_load does (a key given twice in one mapping is an error), apply `path=value`
    overrides and validate; see parse_recipe."""
    source = f"recipe file {path}"
    try:
        with Path(path).open(encoding="utf-8") as stream:  # a stream, so that YAML errors name the file
            mapping = strict_safe_load(stream)
    except DuplicateKeys as error:
        raise RecipeError(source, [f"{duplicate_message(*d)}." for d in error.duplicates]) from error
    except yaml.YAMLError as error:
        raise RecipeError(source, [f"not valid YAML: {error}. Fix: correct the syntax there."]) from error
    mapping = {} if mapping is None else mapping  # an empty file is a recipe of defaults
    return parse_recipe(mapping, overrides, source)


def provenance(recipe: Recipe) -> dict[str, str]:
    """Where each leaf value came from: 'default', the parse source ('recipe file <path>') or 'override'.

    A Recipe built in Python (or changed with dataclasses.replace) has no parse record: its values read 'default'
    where they equal the schema default, else 'set in code'.
    """
    if recipe._provenance is not None:
        return dict(recipe._provenance)
    return {path: DEFAULT if value == _field_default(f) else IN_CODE for path, value, f in _leaves(recipe)}


# ----------------------------------------------------------------------------------------------- output


def resolved_yaml(recipe: Recipe) -> str:
    """Every value the run uses (secrets redacted) as YAML, under a comment block saying where each came from;
    `load_recipe` reads it back to an equal Recipe."""
    header = "# Resolved recipe: every value this run used (secrets redacted); load_recipe reads it back.\n"
    header += "# Where each value came from:\n"
    header += "".join(f"#   {key}: {origin}\n" for key, origin in provenance(recipe).items())
    return header + yaml.safe_dump(
        redact_secrets(recipe_to_dict(recipe)), sort_keys=False, allow_unicode=True
    )


def recipe_help() -> str:
    """Every recipe key with its type, range, default and documentation, for `--help`."""
    lines = ["Recipe keys. Override any on the command line by its dotted path, e.g. train.lr=2.0e-4 or"]
    lines += [
        "data.train.0.weight=2 (values are read as YAML). A key given twice on the command line takes its last",
        "value (with a warning); a key given twice in one mapping of the YAML file is an error.",
    ]
    for path, f, tp in _schema_walk(Recipe):
        if dataclasses.is_dataclass(_without_none(tp)[0]):
            lines += ["", f"{path}: {f.metadata['doc']}"]
            continue
        default = json.dumps(_plain(_field_default(f)))  # JSON is YAML flow syntax: null, true, [..]
        indent = "  " if "." in path else ""
        lines += [] if indent else [""]  # a top-level key stands apart from the section before it
        lines += [f"{indent}{path} ({_type_name(tp, f.metadata['bounds'])}; default {default})"]
        lines += [f"{indent}    {f.metadata['doc']}"]
    return "\n".join(lines)
