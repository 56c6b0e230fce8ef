"""Property-based fuzzing (hypothesis) of what reads user input: the recipe parser and its overrides, every dataset
adapter, the image loader, the manifest reader. The property, for any input: a result, or the project's own error
type (RecipeError, DataError, ManifestError) with a message; never another exception, never a hang (each example has
a deadline). Inputs that found a bug stay as `@example`s: regression cases that run every time.

Each test is bounded (`max_examples`, `deadline`) so that the file runs in well under 30 s on one core.
"""

from __future__ import annotations

import io
import json
import string
from datetime import timedelta

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from config.parse import RecipeError, _schema_walk, load_recipe, parse_recipe
from config.schema import Recipe
from config.strict_yaml import strict_safe_load
from data.adapters import ADAPTERS, adapt_row
from data.images import image_size, load_rgb
from data.sample import DataError, ImageRef, Origin
from rundir.manifest import ManifestError, read_manifest, verify_manifest, write_manifest

FUZZ = settings(
    max_examples=300,
    deadline=timedelta(seconds=5),
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
MINIMAL = {"data": {"train": [{"format": "synthetic"}]}, "train": {"max_steps": 2}}
KEYS = sorted({path.replace(".N", ".0") for path, _, _ in _schema_walk(Recipe)})
ORIGIN = Origin(dataset="fuzz", row=0)

# JSON-like values: what a YAML file, a JSON line or a parquet row can hold.
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(10**6), 10**6), st.floats(allow_nan=True), st.text(max_size=12)
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


def assert_message(error: Exception) -> None:
    assert str(error).strip(), f"{type(error).__name__} without a message"


# ----------------------------------------------------------------------------------------------- recipes


@FUZZ
@given(st.text(alphabet=string.printable + "\u00e9\u200f\x00\ufeff", max_size=200))
@example("a: 1\na: 2\n")  # a key twice: refused (PyYAML kept the last silently)
@example("? [a]\n: 1\n")  # a key that is no scalar: PyYAML's own refusal (unhashable key)
@example("a: &x [*x]\n")  # an alias inside its own anchor: a cycle the duplicate walk must not follow forever
def test_strict_yaml_reads_what_safe_load_reads_or_raises_a_yaml_error(text):
    try:
        expected = yaml.safe_load(text)
    except yaml.YAMLError:
        expected = yaml.YAMLError
    except RecursionError:
        return  # PyYAML's own limit on nesting, the same in both
    try:
        got = strict_safe_load(text)
    except yaml.YAMLError as error:
        assert_message(error)
        return
    assert expected is not yaml.YAMLError
    assert repr(got) == repr(expected)


@FUZZ
@given(
    st.dictionaries(
        st.sampled_from(["model", "data", "train", "lora", "dpo", "eval", "stages", "seed", "x"]),
        values,
        max_size=5,
    ),
    st.lists(st.tuples(st.sampled_from(KEYS), values), max_size=3),
)
@example({"train": {"lr": "1e-4"}}, [])  # PyYAML's 1e-4 is a string: named, with the fix
@example({"data": {"train": [None]}}, [])
@example({}, [("data.train.0.columns", {"a": None})])
def test_any_recipe_mapping_and_overrides_give_a_recipe_or_a_recipe_error(
    tmp_path_factory, mapping, overrides
):
    texts = [
        f"{key}={json.dumps(value)}" for key, value in overrides
    ]  # JSON is YAML: the value read back as is
    path = tmp_path_factory.mktemp("recipe") / "recipe.yaml"
    path.write_text(yaml.safe_dump({**MINIMAL, **mapping}), encoding="utf-8")
    try:
        load_recipe(path, texts)
    except RecipeError as error:
        assert_message(error)


@FUZZ
@given(st.lists(st.text(alphabet=string.printable + "\u00e9", max_size=30), max_size=4))
@example(["=1"])
@example(["train.lr=[", "train.lr={a: 1, a: 2}"])
@example(["data.train.99.weight=1"])
def test_any_override_text_gives_a_recipe_or_a_recipe_error(overrides):
    try:
        parse_recipe(MINIMAL, overrides)
    except RecipeError as error:
        assert_message(error)


# ----------------------------------------------------------------------------------------------- adapters


rows = st.dictionaries(
    st.sampled_from(
        [
            "messages",
            "images",
            "image",
            "conversations",
            "question",
            "query",
            "answers",
            "answer",
            "label",
            "prompt",
            "chosen",
            "rejected",
            "rejected_images",
            "x",
        ]
    ),
    st.one_of(
        values,
        st.lists(
            st.fixed_dictionaries(
                {
                    "role": st.sampled_from(["user", "assistant", "system", "tool"]),
                    "content": st.one_of(
                        st.text(max_size=10),
                        st.lists(
                            st.fixed_dictionaries(
                                {
                                    "type": st.sampled_from(["text", "image", "video"]),
                                    "text": st.text(max_size=8),
                                }
                            ),
                            max_size=3,
                        ),
                    ),
                }
            ),
            max_size=4,
        ),
        st.lists(
            st.fixed_dictionaries(
                {
                    "from": st.sampled_from(["human", "gpt", "system", "bot"]),
                    "value": st.text(alphabet="ab <image>\n", max_size=20),
                }
            ),
            max_size=4,
        ),
    ),
    max_size=6,
)


@FUZZ
@given(
    st.sampled_from(sorted(ADAPTERS)),
    rows,
    st.lists(st.text(alphabet="ab./\x00\ud800", max_size=6), max_size=2),
)
@example(
    "vqa", {"image": "a\x00.png", "question": "q", "answer": "a"}, []
)  # a NUL in a name: named, not ValueError
@example("vqa", {"image": "\ud800.png", "question": "q", "answer": "a"}, [])  # a lone surrogate in a name
@example("trl_messages", {"messages": [{"role": "user", "content": [{"type": "image"}]}], "images": [{}]}, [])
def test_every_adapter_gives_a_sample_or_a_data_error(tmp_path_factory, fmt, row, image_names):
    root = tmp_path_factory.mktemp("images")
    (root / "a.png").write_bytes(PNG)
    row = {**row, **({"images": image_names} if image_names and "images" in row else {})}
    try:
        adapt_row(row, format=fmt, columns={}, origin=ORIGIN, image_root=root)
    except DataError as error:
        assert_message(error)


# ----------------------------------------------------------------------------------------------- images


def png(size=(8, 6), mode="RGB") -> bytes:
    stream = io.BytesIO()
    pixels = np.random.default_rng(0).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).convert(mode).save(stream, "PNG")
    return stream.getvalue()


PNG = png()


@FUZZ
@given(
    st.one_of(
        st.binary(max_size=300),
        st.tuples(st.integers(0, len(PNG) - 1), st.binary(min_size=1, max_size=8)).map(
            lambda cut: PNG[: cut[0]] + cut[1] + PNG[cut[0] + len(cut[1]) :]
        ),
        st.integers(1, len(PNG) - 1).map(lambda n: PNG[:n]),
    )
)
@example(b"\x89PNG\r\n\x1a\n")  # a PNG signature and nothing else
@example(b"GIF89a\xff\xff\xff\xff")  # a GIF header claiming 65535 x 65535
@example(png(mode="P"))
def test_the_image_loader_gives_an_rgb_image_or_a_data_error(data):
    for read in (
        lambda: image_size(ImageRef(data=data), ORIGIN, "image", max_pixels=10**6),
        lambda: load_rgb(ImageRef(data=data), ORIGIN, "image", max_pixels=10**6),
    ):
        try:
            result = read()
        except DataError as error:
            assert_message(error)
            continue
        assert isinstance(result, tuple) or result.mode == "RGB"


# ----------------------------------------------------------------------------------------------- manifests


@FUZZ
@given(
    st.one_of(
        st.binary(max_size=200).map(lambda b: ("bytes", b)),
        values.map(lambda v: ("json", v)),
        st.dictionaries(
            st.text(alphabet="ab./\\\x00", max_size=8),
            st.fixed_dictionaries(
                {
                    "size": st.integers(-2, 40),
                    "sha256": st.text(alphabet="0123456789abcdef", min_size=0, max_size=64),
                }
            ),
            max_size=3,
        ).map(lambda f: ("manifest", {"format": 1, "files": f})),
    )
)
@example(("manifest", {"format": 1, "files": {"../outside": {"size": 1, "sha256": "0" * 64}}}))
@example(("manifest", {"format": 1, "files": {"a": {"size": True, "sha256": "0" * 64}}}))
@example(("json", [[[[[]]]]]))
def test_the_manifest_reader_gives_files_or_a_manifest_error(tmp_path_factory, content):
    folder = tmp_path_factory.mktemp("checkpoint")
    (folder / "a").write_bytes(b"tensor bytes")
    kind, value = content
    path = folder / "manifest.json"
    path.write_bytes(value if kind == "bytes" else json.dumps(value).encode())
    try:
        verify_manifest(folder, path)
    except ManifestError as error:
        assert_message(error)


def test_a_written_manifest_verifies_and_names_any_change(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.safetensors").write_bytes(b"x" * 10)
    (tmp_path / "sub" / "b.pkl").write_bytes(b"y")
    path = write_manifest(tmp_path, tmp_path / "manifest.json")
    assert set(read_manifest(path)) == {"a.safetensors", "sub/b.pkl"}
    verify_manifest(tmp_path, path, closed=("sub",))
    (tmp_path / "sub" / "planted.pkl").write_bytes(b"z")
    with pytest.raises(ManifestError, match="sub/planted.pkl .* is not a file this run wrote"):
        verify_manifest(tmp_path, path, closed=("sub",))
    (tmp_path / "a.safetensors").write_bytes(b"x" * 9 + b"z")
    with pytest.raises(ManifestError, match="a.safetensors .* has changed since it was written"):
        verify_manifest(tmp_path, path)
