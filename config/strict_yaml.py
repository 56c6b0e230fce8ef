"""YAML as `yaml.safe_load` reads it, except that a key given twice in one mapping is an error.

PyYAML keeps the last of two equal keys and drops the first without a word; in a recipe the dropped one may be the
value the user is looking at. `StrictSafeLoader` constructs exactly what `yaml.SafeLoader` does (same tags, same
YAML 1.1 resolution, merge keys `<<:` still override as YAML specifies), after one walk over the composed document
that finds every duplicate key and raises `DuplicateKeys` naming each key's dotted path and both lines.

    data = strict_safe_load(stream)          # like yaml.safe_load(stream)
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

MERGE_TAG = "tag:yaml.org,2002:merge"


class DuplicateKeys(yaml.YAMLError):
    """Keys given twice in one mapping; `.duplicates` holds (dotted path, first line, second line), lines from 1."""

    def __init__(self, duplicates: list[tuple[str, int, int]]):
        self.duplicates = duplicates
        super().__init__("; ".join(duplicate_message(*d) for d in duplicates))


def duplicate_message(path: str, first: int, second: int) -> str:
    return (
        f"key '{path}' is given twice in one mapping (line {first} and line {second}); YAML would keep line "
        f"{second}'s value and drop line {first}'s without a word. Fix: delete one of them"
    )


class StrictSafeLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a document holding a key twice in one mapping (see the module docstring)."""

    def construct_document(self, node: Node) -> Any:
        duplicates: list[tuple[str, int, int]] = []
        self._find_duplicates(node, "", duplicates, set())
        if duplicates:
            raise DuplicateKeys(duplicates)
        return super().construct_document(node)

    def _find_duplicates(self, node: Node, path: str, found: list, seen: set[int]) -> None:
        if id(node) in seen:  # an alias to a node already walked (anchors may even form a cycle)
            return
        seen.add(id(node))
        if isinstance(node, SequenceNode):
            for index, item in enumerate(node.value):
                self._find_duplicates(item, f"{path}.{index}" if path else str(index), found, seen)
        elif isinstance(node, MappingNode):
            lines: dict[Hashable, int] = {}
            for key_node, value_node in node.value:
                key = self._plain_key(key_node)
                if key is None:
                    continue
                sub = f"{path}.{key}" if path else str(key)
                line = key_node.start_mark.line + 1
                if key in lines:
                    found.append((sub, lines[key], line))
                else:
                    lines[key] = line
                self._find_duplicates(value_node, sub, found, seen)

    def _plain_key(self, key_node: Node) -> Hashable | None:
        """A scalar key as safe_load would construct it (so `1` and `0x1` are the same key); None for a merge key
        or a key that is no scalar (those are left to the constructor, which reports them as it always did)."""
        if not isinstance(key_node, ScalarNode) or key_node.tag == MERGE_TAG:
            return None
        try:
            key = self.construct_object(key_node, deep=True)
        except yaml.YAMLError:
            return None
        finally:
            self.constructed_objects.pop(key_node, None)  # construct the document afresh below
        return key if isinstance(key, Hashable) else None


def strict_safe_load(stream) -> Any:
    """`yaml.safe_load(stream)`, refusing duplicate keys (DuplicateKeys, a yaml.YAMLError)."""
    loader = StrictSafeLoader(stream)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()
