"""The bad-input corpus: what a new user gets wrong (recipes, data files, rows, images, preference rows, model paths,
run-directory states), each through a real entry point. Every case asserts the exit code, that the message names
what it should (the key, file, row or field), that no traceback is printed, and (for the training stages) that no
half-made run directory is left behind.

Most cases call the entry point's `main` in-process through `runtime.user_errors.run_main`, exactly what its `__main__`
block does (the subprocess cases at the end check those blocks and `--debug`). The model is a tiny Phi-3-V built
once into a folder (what `model.name_or_path=tiny` builds into each run), so a case costs a recipe parse, a model
load and the data it reads.
"""

from __future__ import annotations

import importlib
import io
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from config import load_recipe
from config.parse import resolved_yaml
from data.synthetic import synthetic_texts, write_synthetic
from models.phi3v.tiny import build_demo_model
from runtime.user_errors import message_of, redact_message, run_main

from ..conftest import REPO

DEMO = str(REPO / "recipes" / "demo.yaml")

ENTRIES = {  # entry -> (prog, module, function): what each `__main__` runs
    "sft": ("train/sft.py", "train.sft", "cli"),
    "dpo": ("train/dpo.py", "train.dpo", "cli"),
    "eval": ("python -m eval", "eval.__main__", "main"),
    "export": ("python -m train.export", "train.export.merge", "main"),
    "inspect": ("python -m data.inspect", "data.inspect", "main"),
    "dry_run": ("python -m train.dry_run", "train.tools.dry_run", "cli"),
    "launch_plan": ("launch.sh", "train.tools.launch_plan", "main"),
    "summary": ("python -m eval.summary", "eval.summary", "main"),
}


def png_bytes(seed: int = 0, size: int = 48) -> bytes:
    """A PNG of noise (so that it does not compress to a few bytes, and half of it is a truly truncated file)."""
    pixels = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    stream = io.BytesIO()
    Image.fromarray(pixels).save(stream, "PNG")
    return stream.getvalue()


def sft_row(
    image: str | None = "img0.png", question: str = "What colour is the shape?", answer: str = "red"
) -> dict:
    content = ([{"type": "image"}] if image else []) + [{"type": "text", "text": question}]
    return {
        "messages": [
            {"role": "user", "content": content},
            {"role": "assistant", "content": [{"type": "text", "text": answer}]},
        ],
        "images": [image] if image else [],
    }


def pref_row(image: str = "img0.png", chosen: str | None = "red", rejected: str | None = "blue") -> dict:
    row = {
        "prompt": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]}
        ],
        "images": [image],
    }
    if chosen is not None:
        row["chosen"] = [{"role": "assistant", "content": [{"type": "text", "text": chosen}]}]
    if rejected is not None:
        row["rejected"] = [{"role": "assistant", "content": [{"type": "text", "text": rejected}]}]
    return row


class World:
    """Shared inputs of the corpus: a tiny model folder, a small synthetic dataset, a finished-looking run dir."""

    def __init__(self, root: Path):
        self.root = root
        self.base = root / "tiny-base"
        model, processor = build_demo_model(synthetic_texts(), num_crops=4, seed=0)
        model.save_pretrained(self.base)
        processor.save_pretrained(self.base)
        self.syn = write_synthetic(
            root / "syn", seed=0, n_train=16, n_eval=4, n_pref_train=8, n_pref_eval=4
        ).root
        self.counter = 0
        # A run directory holding a resolved recipe and an sft/ folder without adapter (a run stopped early).
        self.stopped_run = root / "stopped-run"
        (self.stopped_run / "sft").mkdir(parents=True)
        recipe = load_recipe(DEMO, [f"output_dir={self.stopped_run}"])
        (self.stopped_run / "recipe.resolved.yaml").write_text(resolved_yaml(recipe), encoding="utf-8")

    def folder(self) -> Path:
        self.counter += 1
        folder = self.root / f"case-{self.counter:02d}"
        folder.mkdir()
        return folder

    def dataset(
        self,
        rows: list[dict] | bytes,
        images: dict[str, bytes | None] | None = None,
        name: str = "data.jsonl",
    ) -> Path:
        """A dataset folder: `name` holding `rows` (or raw bytes), and images (None: not written)."""
        folder = self.folder()
        data = rows if isinstance(rows, bytes) else "".join(json.dumps(row) + "\n" for row in rows).encode()
        (folder / name).write_bytes(data)
        default = {f"img{i}.png": png_bytes(i) for i in range(4)}
        for file, content in {**default, **(images or {})}.items():
            if content is not None:
                (folder / file).write_bytes(content)
        return folder / name

    def run_dir(self) -> Path:
        return self.root / f"run-{self.counter:02d}"

    def sft(
        self, data: Path | str | None = None, *extra: str, fmt: str = "trl_messages", stage: str = "sft"
    ) -> list[str]:
        """A one-step run of `stage` over `data` (default: the synthetic set) with the shared tiny model."""
        self.counter += 1
        if data is None:
            source = [f"data.train.0.path={self.syn}"]
        else:
            image_root = Path(data).parent if Path(data).suffix else Path(data)
            source = [
                f"data.train.0.format={fmt}",
                f"data.train.0.path={data}",
                f"data.train.0.image_root={image_root}",
            ]
        return [
            DEMO,
            f"output_dir={self.run_dir()}",
            f"model.name_or_path={self.base}",
            *source,
            "data.eval=[]",
            f"stages=[{stage}]",
            "train.max_steps=1",
            "train.micro_batch_size=2",
            "dpo.max_steps=null",
            "data.max_length=1024",
            *extra,
        ]


GOOD = [sft_row(f"img{i}.png") for i in range(4)]
PNG = png_bytes(7)

# (case id, entry, argv builder, exit code, what the message must name). The builder gets the World; what the
# message names is checked case-insensitively against the whole of stderr.
CASES = [
    # ---------------------------------------------------------------------------------------------- recipes
    (
        "recipe-typo-key",
        "sft",
        lambda w: w.sft(None, "lora.dropuot=0.1"),
        2,
        ["lora.dropuot", "lora.dropout"],
    ),
    ("recipe-typo-section", "sft", lambda w: w.sft(None, "trian.lr=0.1"), 2, ["trian", "train"]),
    (
        "recipe-yaml-error",
        "sft",
        lambda w: [str(w.dataset(b"model:\n  name_or_path: [tiny\n", name="bad.yaml"))],
        2,
        ["bad.yaml", "not valid YAML"],
    ),
    (
        "recipe-not-a-mapping",
        "launch_plan",
        lambda w: [str(w.dataset(b"- a\n- b\n", name="list.yaml")), "--field", "stages"],
        2,
        ["list.yaml", "not a mapping"],
    ),
    ("recipe-missing-file", "sft", lambda w: [str(w.root / "nope.yaml")], 2, ["nope.yaml"]),
    (
        "recipe-wrong-type",
        "sft",
        lambda w: w.sft(None, "train.micro_batch_size=two"),
        2,
        ["train.micro_batch_size", "expected int"],
    ),
    (
        "recipe-number-as-string",
        "launch_plan",
        lambda w: [DEMO, "train.lr=1e-4", "--field", "stages"],
        2,
        ["train.lr", "1.0e-4"],
    ),
    (
        "recipe-out-of-range",
        "sft",
        lambda w: w.sft(None, "train.micro_batch_size=0"),
        2,
        ["train.micro_batch_size"],
    ),
    (
        "recipe-bad-choice",
        "sft",
        lambda w: w.sft(None, "train.scheduler=cosin"),
        2,
        ["train.scheduler", "cosine"],
    ),
    (
        "recipe-bad-format",
        "sft",
        lambda w: w.sft(None, "data.train.0.format=jsonl"),
        2,
        ["data.train.0.format"],
    ),
    ("recipe-bad-override", "sft", lambda w: w.sft(None, "train.lr"), 2, ["train.lr", "key=value"]),
    (
        "recipe-secret-redacted",
        "sft",
        lambda w: w.sft(None, "model.hf_token=hf_SeCrEt123"),
        2,
        ["model.hf_token", "<redacted>"],
    ),
    (
        "recipe-eval-no-tasks",
        "eval",
        lambda w: [
            str(
                w.dataset(Path(DEMO).read_bytes().replace(b"tasks: [synthetic]", b"tasks: []"), name="r.yaml")
            ),
            "--model",
            str(w.base),
        ],
        2,
        ["r.yaml", "eval.tasks"],
    ),
    ("dry-run-bad-recipe", "dry_run", lambda w: [DEMO, "lora.r=0"], 1, ["lora.r"]),
    # ---------------------------------------------------------------------------------------------- data files
    (
        "data-missing-file",
        "sft",
        lambda w: w.sft(w.root / "missing.jsonl"),
        2,
        ["missing.jsonl", "no such file"],
    ),
    (
        "data-missing-folder",
        "sft",
        lambda w: w.sft(w.root / "missing_dir", fmt="vqa"),
        2,
        ["missing_dir", "no such folder"],
    ),
    ("data-empty-file", "sft", lambda w: w.sft(w.dataset(b"")), 2, ["data.jsonl", "empty"]),
    ("data-blank-lines", "sft", lambda w: w.sft(w.dataset(b"\n\n  \n")), 2, ["data.jsonl", "no rows"]),
    (
        "data-not-utf8",
        "sft",
        lambda w: w.sft(w.dataset(json.dumps(GOOD[0]).encode() + b"\n" + b'{"messages": "caf\xe9"}\n')),
        2,
        ["data.jsonl", "line 2", "UTF-8"],
    ),
    (
        "data-bad-json-line",
        "sft",
        lambda w: w.sft(
            w.dataset(b"".join(json.dumps(r).encode() + b"\n" for r in GOOD[:2]) + b'{"messages": [\n')
        ),
        2,
        ["data.jsonl", "line 3", "row 2", "not valid JSON"],
    ),
    (
        "data-hub-offline",
        "sft",
        lambda w: w.sft("someorg/no-such-dataset", fmt="vqa"),
        2,
        ["someorg/no-such-dataset", "HF_HUB_OFFLINE"],
    ),
    (
        "data-missing-column",
        "sft",
        lambda w: w.sft(w.dataset([{"conversation": []}] * 4)),
        2,
        ["row 0", "messages"],
    ),
    (
        "data-roles-out-of-order",
        "sft",
        lambda w: w.sft(
            w.dataset(
                [
                    *GOOD,
                    {
                        "messages": [
                            {"role": "assistant", "content": "hi"},
                            {"role": "user", "content": "q"},
                        ],
                        "images": [],
                    },
                ]
            )
        ),
        2,
        ["data.jsonl", "row 4", "roles out of order"],
    ),
    (
        "data-image-count-mismatch",
        "sft",
        lambda w: w.sft(w.dataset([*GOOD[:2], {**GOOD[0], "images": []}])),
        2,
        ["row 2", "image count mismatch"],
    ),
    (
        "data-all-rows-bad-skip",
        "sft",
        lambda w: w.sft(w.dataset([{"conversation": []}] * 3), "data.on_bad_sample=skip"),
        2,
        ["all 3 rows are bad"],
    ),
    (
        "data-too-few-rows",
        "sft",
        lambda w: w.sft(w.dataset(GOOD[:1]), "train.micro_batch_size=4"),
        2,
        ["data.jsonl", "1 sft samples planned", "train.micro_batch_size 4"],
    ),
    (
        "data-too-few-after-skips",
        "sft",
        lambda w: w.sft(
            w.dataset([GOOD[0], {"conversation": []}, {"conversation": []}]), "data.on_bad_sample=skip"
        ),
        2,
        ["1 sft samples planned", "2 rows left out"],
    ),
    (
        "data-inspect-missing-file",
        "inspect",
        lambda w: [
            DEMO,
            "stages=[sft]",
            "data.max_length=1024",
            f"model.name_or_path={w.base}",
            "data.train.0.format=trl_messages",
            f"data.train.0.path={w.root / 'gone.jsonl'}",
        ],
        2,
        ["gone.jsonl", "no such file"],
    ),
    # ---------------------------------------------------------------------------------------------- images
    (
        "image-missing",
        "sft",
        lambda w: w.sft(w.dataset(GOOD, {"img2.png": None})),
        2,
        ["row 2", "images[0]", "img2.png"],
    ),
    (
        "image-zero-bytes",
        "sft",
        lambda w: w.sft(w.dataset(GOOD, {"img1.png": b""})),
        2,
        ["row 1", "images[0]", "img1.png", "0 bytes"],
    ),
    (
        "image-truncated",
        "sft",
        lambda w: w.sft(w.dataset(GOOD, {"img3.png": PNG[: len(PNG) // 2]})),
        2,
        ["row 3", "images[0]", "img3.png", "truncated"],
    ),
    (
        "image-not-an-image",
        "sft",
        lambda w: w.sft(w.dataset(GOOD, {"img0.png": b"this is text, not a PNG"})),
        2,
        ["row 0", "img0.png", "not a readable image"],
    ),
    (
        "image-escapes-root",
        "sft",
        lambda w: w.sft(w.dataset([*GOOD[:2], sft_row("../../etc/passwd")])),
        2,
        ["row 2", "escapes image_root"],
    ),
    (
        "image-is-a-folder",
        "sft",
        lambda w: w.sft(w.dataset([*GOOD[:2], sft_row(".")])),
        2,
        ["row 2", "images"],
    ),
    (
        "image-remote-url",
        "sft",
        lambda w: w.sft(w.dataset([*GOOD[:2], sft_row("https://example.org/a.png")])),
        2,
        ["row 2", "remote image path"],
    ),
    (
        "image-symlink-loop",
        "sft",
        lambda w: w.sft(with_odd_file(w, "img2.png", symlink_loop)),
        2,
        ["row 2", "images[0]", "img2.png", "loop of symbolic links"],
    ),
    (
        "image-dangling-symlink",
        "sft",
        lambda w: w.sft(with_odd_file(w, "img2.png", dangling_symlink)),
        2,
        ["row 2", "images[0]", "img2.png", "not found"],
    ),
    (
        "image-socket",
        "sft",
        lambda w: w.sft(with_odd_file(w, "img1.png", unix_socket)),
        2,
        ["row 1", "images[0]", "img1.png", "is a socket"],
    ),
    (
        "image-fifo",
        "sft",
        lambda w: w.sft(with_odd_file(w, "img3.png", os.mkfifo)),
        2,
        ["row 3", "images[0]", "img3.png", "named pipe"],
    ),
    (
        "image-name-nul",
        "sft",
        lambda w: w.sft(w.dataset([*GOOD[:2], sft_row("img\x00.png")])),
        2,
        ["row 2", "images[0]", "NUL character"],
    ),
    (
        "data-lone-surrogate",
        "sft",
        lambda w: w.sft(w.dataset([*GOOD[:2], sft_row("img\ud800.png")])),
        2,
        ["data.jsonl", "line 3", "row 2", "lone surrogate"],
    ),
    ("data-source-fifo", "sft", lambda w: w.sft(odd_source(w, os.mkfifo)), 2, ["odd.jsonl", "named pipe"]),
    (
        "data-source-symlink-loop",
        "sft",
        lambda w: w.sft(odd_source(w, symlink_loop)),
        2,
        ["odd.jsonl", "loop of symbolic links"],
    ),
    # ---------------------------------------------------------------------------------------------- preference rows
    (
        "pref-missing-rejected",
        "dpo",
        lambda w: w.sft(w.dataset([pref_row(), pref_row(rejected=None)]), fmt="trl_preference", stage="dpo"),
        2,
        ["row 1", "rejected"],
    ),
    (
        "pref-empty-chosen",
        "dpo",
        lambda w: w.sft(w.dataset([pref_row(chosen=" "), pref_row()]), fmt="trl_preference", stage="dpo"),
        2,
        ["row 0", "chosen"],
    ),
    (
        "pref-identical",
        "dpo",
        lambda w: w.sft(
            w.dataset([pref_row(), pref_row(chosen="red", rejected="red")]), fmt="trl_preference", stage="dpo"
        ),
        2,
        ["row 1", "identical"],
    ),
    (
        "pref-truncated-image",
        "dpo",
        lambda w: w.sft(
            w.dataset([pref_row("img0.png"), pref_row("img1.png")], {"img1.png": PNG[:200]}),
            fmt="trl_preference",
            stage="dpo",
        ),
        2,
        ["row 1", "images[0]", "img1.png"],
    ),
    (
        "pref-empty-file",
        "dpo",
        lambda w: w.sft(w.dataset(b""), fmt="trl_preference", stage="dpo"),
        2,
        ["data.jsonl", "empty"],
    ),
    (
        "pref-from-sft-nothing",
        "dpo",
        lambda w: w.sft(None, f"dpo.from_sft={w.folder()}", stage="dpo"),
        2,
        ["dpo.from_sft", "holds no SFT model"],
    ),
    # ---------------------------------------------------------------------------------------------- models
    (
        "model-no-such-folder",
        "sft",
        lambda w: [*w.sft(None), "model.name_or_path=./no_such_model"],
        2,
        ["./no_such_model", "no such folder"],
    ),
    (
        "model-hub-offline",
        "sft",
        lambda w: [*w.sft(None), "model.name_or_path=someorg/no-such-model"],
        2,
        ["someorg/no-such-model", "HF_HUB_OFFLINE"],
    ),
    (
        "model-folder-without-config",
        "sft",
        lambda w: [*w.sft(None), f"model.name_or_path={w.folder()}"],
        2,
        ["no config.json"],
    ),
    ("model-not-phi3v", "eval", lambda w: [DEMO, "--model", str(other_model(w))], 2, ["model_type", "llama"]),
    # ---------------------------------------------------------------------------------------------- run directories
    ("run-export-without-adapter", "export", lambda w: [str(w.stopped_run)], 2, ["sft", "no PEFT adapter"]),
    ("run-export-not-a-run", "export", lambda w: [str(w.folder())], 2, ["no run directory"]),
    (
        "run-eval-missing-stage",
        "eval",
        lambda w: [DEMO, "--model", str(w.stopped_run), "--stage", "dpo"],
        2,
        ["no dpo model", "run the dpo stage"],
    ),
    (
        "run-summary-missing",
        "summary",
        lambda w: [str(w.root / "no-run")],
        2,
        ["no-run", "no such run directory"],
    ),
    (
        "run-export-cut-short-weights",
        "export",
        lambda w: [str(run_with_weights(w, "cut"))],
        2,
        ["adapter_model.safetensors", "cut short", "restore the folder"],
    ),
    (
        "run-eval-changed-weights",
        "eval",
        lambda w: [DEMO, "--model", str(run_with_weights(w, "changed")), "--stage", "sft"],
        2,
        ["adapter_model.safetensors", "has changed"],
    ),
    (
        "run-locked",
        "sft",
        lambda w: w.sft(None, f"output_dir={locked_run(w)}"),
        2,
        ["is in use by another run", "pid 1,", "run.lock"],
    ),
    (
        "run-resume-nothing-intact",
        "sft",
        lambda w: w.sft(None, f"output_dir={broken_checkpoint_run(w)}", "train.resume=true"),
        2,
        ["no checkpoint there is intact", "step-00000001", "holds no manifest.json"],
    ),
    (
        "run-stage-exists",
        "sft",
        lambda w: w.sft(None, f"output_dir={occupied_run(w)}"),
        2,
        ["already holds a sft run", "overwrite_output_dir"],
    ),
]


def symlink_loop(path: Path) -> None:
    """`path` -> `path.b` -> `path`: resolving it never ends (Python 3.11 raised a bare RuntimeError)."""
    os.symlink(path.name + ".b", path)
    os.symlink(path.name, path.with_name(path.name + ".b"))


def dangling_symlink(path: Path) -> None:
    os.symlink(path.name + ".gone", path)


def unix_socket(path: Path) -> None:
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(path))  # the socket file stays after the socket closes


def with_odd_file(world: World, name: str, make) -> Path:
    """A dataset of GOOD rows whose image `name` is made by `make(path)` instead of written."""
    data = world.dataset(GOOD, {name: None})
    make(data.parent / name)
    return data


def odd_source(world: World, make) -> Path:
    path = world.folder() / "odd.jsonl"
    make(path)
    return path


def run_with_weights(world: World, damage: str) -> Path:
    """A run directory whose SFT adapter's weight file was cut short or changed after its manifest was written."""
    from rundir.weights import write_weights_manifest

    run = world.folder()
    shutil.copy(world.stopped_run / "recipe.resolved.yaml", run)
    (run / "base").mkdir()
    (run / "base" / "config.json").write_text("{}")
    adapter = run / "sft" / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "adapter_model.safetensors").write_bytes(bytes(range(256)) * 4)
    write_weights_manifest(adapter)
    data = (adapter / "adapter_model.safetensors").read_bytes()
    (adapter / "adapter_model.safetensors").write_bytes(data[:100] if damage == "cut" else data[::-1])
    return run


def locked_run(world: World) -> Path:
    """A run directory whose lock is held by a live process of this host (pid 1, which outlives every test)."""
    from rundir.layout import lock_file
    from rundir.run_lock import process_start

    run = world.folder()
    lock_file(run).write_text(
        json.dumps(
            {
                "host": socket.gethostname(),
                "pid": 1,
                "pid_start": process_start(1),
                "started": "2026-01-01T00:00:00+00:00",
                "command": "launch.sh other.yaml",
                "token": "theirs",
                "lease_until": 0,
            }
        )
    )
    return run


def broken_checkpoint_run(world: World) -> Path:
    """A run directory whose only SFT checkpoint has no manifest (copied without it, or cut off by a crash of an old
    version)."""
    run = world.folder()
    checkpoint = run / "sft" / "checkpoints" / "step-00000001"
    checkpoint.mkdir(parents=True)
    (checkpoint / "loop_state.json").write_text(json.dumps({"step": 1}))
    return run


def other_model(world: World) -> Path:
    folder = world.folder()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return folder


def occupied_run(world: World) -> Path:
    run = world.root / "occupied-run"
    (run / "sft").mkdir(parents=True, exist_ok=True)
    (run / "sft" / "summary.json").write_text("{}")
    return run


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return World(tmp_path_factory.mktemp("bad-inputs"))


def call(entry: str, argv: list[str], capsys) -> tuple[int, str]:
    prog, module, function = ENTRIES[entry]
    with pytest.raises(SystemExit) as exited:
        run_main(prog, getattr(importlib.import_module(module), function), argv)
    captured = capsys.readouterr()
    return exited.value.code, captured.err + captured.out


def test_the_corpus_has_at_least_40_cases():
    assert len(CASES) >= 40 and len({case[0] for case in CASES}) == len(CASES)


@pytest.mark.parametrize(("case", "entry", "argv", "code", "names"), CASES, ids=[c[0] for c in CASES])
def test_bad_input(world, capsys, monkeypatch, case, entry, argv, code, names):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("PHI3V_DEBUG", raising=False)
    monkeypatch.chdir(world.root)
    args = argv(world)
    exit_code, output = call(entry, args, capsys)
    assert exit_code == code, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    for name in names:
        assert name.lower() in output.lower(), f"{name!r} not in:\n{output[-3000:]}"
    if case == "recipe-secret-redacted":
        assert "hf_SeCrEt123" not in output and "unknown key 'model.hf_token'" in output
    if entry in ("sft", "dpo") and case != "run-stage-exists":
        assert not world.run_dir().exists(), f"{case} left a half-made run directory: {world.run_dir()}"
    if os.environ.get("PHI3V_CORPUS_TABLE"):  # collect each message's last line, for the corpus table
        last = [line for line in output.splitlines() if line.strip()][-1]
        with open(os.environ["PHI3V_CORPUS_TABLE"], "a", encoding="utf-8") as table:
            table.write(f"| {case} | {entry} | {exit_code} | {last.strip()} |\n")


def test_an_existing_run_keeps_its_files_when_a_stage_is_refused(world, capsys):
    run = occupied_run(world)
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    exit_code, _ = call("sft", world.sft(None, f"output_dir={run}"), capsys)
    assert exit_code == 2 and sorted(p.relative_to(run) for p in run.rglob("*")) == before


def test_a_failed_dpo_start_in_an_earlier_run_removes_only_its_own_files(world, capsys):
    """DPO failing on its data in a run directory SFT wrote: the dpo/ folder it made goes, SFT's files stay and
    the resolved recipe is the one SFT wrote."""
    run = world.root / "earlier-run"
    (run / "sft" / "adapter").mkdir(parents=True)
    (run / "sft" / "summary.json").write_text("{}")
    (run / "recipe.resolved.yaml").write_text("# from SFT\n")
    argv = world.sft(world.dataset(b""), f"output_dir={run}", fmt="trl_preference", stage="dpo")
    exit_code, _ = call("dpo", argv, capsys)
    assert exit_code == 2
    assert sorted(p.name for p in run.iterdir()) == ["recipe.resolved.yaml", "sft"]
    assert (run / "recipe.resolved.yaml").read_text() == "# from SFT\n"


def test_messages_redact_credentials_whatever_raised_them():
    text = redact_message("hf_token: hf_abc, max_new_tokens: 4, x.api_key = 'k', https://user:pw@host/a")
    assert "hf_abc" not in text and "'k'" not in text and "pw@" not in text and "max_new_tokens: 4" in text
    full = OSError(28, "No space left on device")
    assert message_of(full).startswith("no space left on device")


# ---------------------------------------------------------------------------------------------- real processes


def run_process(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    environment = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "WANDB_MODE": "disabled",
        "PYTHONPATH": str(REPO),
        **env,
    }
    environment.pop("PHI3V_DEBUG", None) if "PHI3V_DEBUG" not in env else None
    return subprocess.run(args, cwd=cwd, env=environment, capture_output=True, text=True, timeout=300)


def test_the_sft_script_prints_the_message_alone_and_leaves_no_run_directory(world):
    argv = world.sft(world.root / "missing.jsonl")
    result = run_process([sys.executable, str(REPO / "train" / "sft.py"), *argv], world.root)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("train/sft.py: error: data source")
    assert not world.run_dir().exists()


def test_debug_raises_the_error_itself(world, monkeypatch):
    """`--debug` (or PHI3V_DEBUG=1) lets the exception through, so Python prints its traceback."""
    with pytest.raises(FileNotFoundError, match="no PEFT adapter"):
        run_main(
            "python -m train.export",
            importlib.import_module("train.export.merge").main,
            [str(world.stopped_run), "--debug"],
        )
    monkeypatch.setenv("PHI3V_DEBUG", "1")
    with pytest.raises(FileNotFoundError, match="no PEFT adapter"):
        run_main(
            "python -m train.export",
            importlib.import_module("train.export.merge").main,
            [str(world.stopped_run)],
        )


def test_python_m_eval_names_the_missing_stage(world):
    result = run_process(
        [sys.executable, "-m", "eval", DEMO, "--model", str(world.stopped_run), "--stage", "dpo"], REPO
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr and "no dpo model" in result.stderr


def test_launch_sh_stops_on_a_bad_recipe_with_the_message_alone(tmp_path):
    result = run_process(
        [str(REPO / "launch.sh"), DEMO, f"output_dir={tmp_path / 'run'}", "lora.dropuot=0.1"],
        REPO,
        PYTHON=sys.executable,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "did you mean 'lora.dropout'" in result.stderr and not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------- the image loader


def test_the_image_loader_names_paths_that_changed_during_the_run(tmp_path):
    """The loader reads files the adapters accepted earlier: one deleted, replaced by a loop of links, by a folder,
    or a device in its place, is a DataError naming it."""
    from data.images import load_rgb
    from data.sample import DataError, ImageRef, Origin

    origin = Origin(dataset="data.train.0", row=5)
    path = tmp_path / "a.png"
    changes = {
        "does not exist": lambda: None,
        "loop of symbolic links": lambda: symlink_loop(path),
        "is a folder": lambda: path.mkdir(),
        "is a socket": lambda: unix_socket(path),
    }
    for expected, change in changes.items():
        path.write_bytes(PNG)
        assert load_rgb(ImageRef(path=path), origin, "images[0]").size == (48, 48)
        path.unlink()
        change()
        with pytest.raises(DataError, match=expected) as error:
            load_rgb(ImageRef(path=path), origin, "images[0]")
        assert "row 5" in str(error.value) and "images[0]" in str(error.value)
        path.rmdir() if path.is_dir() and not path.is_symlink() else path.unlink(missing_ok=True)
    with pytest.raises(DataError, match="is a character device"):
        load_rgb(ImageRef(path=Path("/dev/null")), origin, "images[0]")
    with pytest.raises(DataError, match="not valid text"):
        load_rgb(ImageRef(path=Path("img\ud800.png")), origin, "images[0]")


def message_as(uid: int | None, check) -> str:
    """`check()`'s result, run in a forked child as user `uid` (None: this user): root reads every file, so a
    permission is tested as `nobody`."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop to uid, run the check, send its text back
        try:
            if uid is not None:
                os.setgid(uid)
                os.setuid(uid)
            os.write(write, check().encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as stream:
        text = stream.read()
    os.waitpid(pid, 0)
    return text


def test_an_image_without_read_permission_is_a_message():
    from data.adapters import confined_image_path
    from data.sample import DataError, Origin

    folder = Path(tempfile.mkdtemp(prefix="perm-"))
    try:
        os.chmod(folder, 0o755)
        (folder / "a.png").write_bytes(PNG)
        os.chmod(folder / "a.png", 0)
        (folder / "locked").mkdir(mode=0o700)
        (folder / "locked" / "b.png").write_bytes(PNG)
        for name in ("a.png", "locked/b.png"):

            def check(name=name) -> str:
                try:
                    confined_image_path(
                        name, image_root=folder, origin=Origin(dataset="d", row=1), field="image"
                    )
                except DataError as error:
                    return str(error)
                return "accepted"

            text = message_as(65534 if os.geteuid() == 0 else None, check)
            assert "row 1" in text and "permission denied" in text, text
    finally:
        for path in sorted(folder.rglob("*"), reverse=True):
            os.chmod(path, stat.S_IRWXU)
        shutil.rmtree(folder)
