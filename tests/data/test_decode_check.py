"""Decode before you train (data/decode_check.py): a corrupt image is an error or a counted skip before step 1, the
decode cache spares known-good files, and a decode that still fails in a DataLoader worker follows the skip policy."""

from __future__ import annotations

import io
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import data.decode_check as decode_check
from config import Source, load_recipe
from data.loaders import SKIPPED_KEY, load_samples, loader_factory, plan
from data.sample import DataError
from data.sources import SkipCounter
from rundir.layout import DECODED_IMAGES, summary_file
from train import sft

from ..conftest import REPO

DEMO = REPO / "recipes" / "demo.yaml"


def png(seed: int, size: int = 48) -> bytes:
    stream = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)).save(
        stream, "PNG"
    )
    return stream.getvalue()


def dataset(folder: Path, rows: int, truncated: int | None = None) -> Path:
    """`rows` one-image conversations over their own PNGs; image `truncated` has only the first half of its bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(rows):
        data = png(i)
        (folder / f"{i:03d}.png").write_bytes(data[: len(data) // 2] if i == truncated else data)
        lines.append(
            json.dumps(
                {
                    "messages": [
                        {
                            "role": "user",
                            "content": [
                                {"type": "image"},
                                {"type": "text", "text": "What colour is the shape?"},
                            ],
                        },
                        {
                            "role": "assistant",
                            "content": [{"type": "text", "text": ["red", "blue", "green"][i % 3]}],
                        },
                    ],
                    "images": [f"{i:03d}.png"],
                }
            )
        )
    (folder / "train.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "train.jsonl"


def overrides(run: Path, data: Path, policy: str) -> list[str]:
    return [
        f"output_dir={run}",
        "data.train.0.format=trl_messages",
        f"data.train.0.path={data}",
        f"data.train.0.image_root={data.parent}",
        "data.eval=[]",
        "stages=[sft]",
        "train.max_steps=2",
        "train.micro_batch_size=4",
        "train.log_every=1",
        f"data.on_bad_sample={policy}",
    ]


def test_one_truncated_png_among_60_is_skipped_and_counted_or_stops_the_run_before_step_1(tmp_path, capsys):
    data = dataset(tmp_path / "data", 60, truncated=17)
    run = sft.main(load_recipe(DEMO, overrides(tmp_path / "runs" / "skip", data, "skip")), DEMO)
    summary = json.loads(summary_file(run, "sft").read_text())
    assert summary["steps"] == 2
    assert summary["skipped_rows"] == {f"{data}:train": {decode_check.UNDECODABLE: 1}}
    assert "sft: 1 rows skipped" in capsys.readouterr().out  # the end-of-stage summary
    # 59 good files are remembered next to the runs; the truncated one is not.
    cache = (tmp_path / "runs" / ".cache" / DECODED_IMAGES).read_text().split()
    assert len(cache) == 59

    with pytest.raises(SystemExit) as exited:
        sft.cli([str(DEMO), *overrides(tmp_path / "runs" / "error", data, "error")])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and "Traceback" not in err
    assert "row 17, field 'images[0]'" in err and "017.png" in err and "truncated" in err
    assert "step" not in err.splitlines()[-1] and not (tmp_path / "runs" / "error").exists()


def test_known_good_files_are_not_decoded_again(tmp_path, tiny_processor, monkeypatch):
    data = dataset(tmp_path / "data", 6)
    section = replace(load_recipe(DEMO).data, on_bad_sample="error")
    samples = load_samples(
        (Source(format="trl_messages", path=str(data)),), "sft", section, seed=0, skips=SkipCounter()
    )
    decoded = []
    real = decode_check.load_rgb
    monkeypatch.setattr(decode_check, "load_rgb", lambda ref, *args: decoded.append(ref) or real(ref, *args))
    plan(samples, tiny_processor, section, SkipCounter(), cache_dir=tmp_path / "cache")
    assert len(decoded) == 6
    plan(samples, tiny_processor, section, SkipCounter(), cache_dir=tmp_path / "cache")
    assert len(decoded) == 6  # all six known good
    (tmp_path / "data" / "002.png").write_bytes(png(2, size=40))  # rewritten: a new fingerprint
    plan(samples, tiny_processor, section, SkipCounter(), cache_dir=tmp_path / "cache")
    assert len(decoded) == 7


def test_a_decode_that_fails_in_the_worker_is_replaced_and_counted(tmp_path, tiny_processor):
    data = dataset(tmp_path / "data", 8)
    section = replace(load_recipe(DEMO).data, on_bad_sample="skip")
    skips = SkipCounter()
    samples = load_samples(
        (Source(format="trl_messages", path=str(data)),), "sft", section, seed=0, skips=skips
    )
    planned = plan(samples, tiny_processor, section, skips)
    good = (tmp_path / "data" / "003.png").read_bytes()
    (tmp_path / "data" / "003.png").write_bytes(good[: len(good) // 2])  # broken after validation
    make_loader, batches = loader_factory(
        planned,
        tiny_processor,
        section,
        stage="sft",
        micro_batch_size=4,
        seed=0,
        num_replicas=1,
        rank=0,
        skips=skips,
    )
    seen = list(make_loader(0))
    assert len(seen) == batches == 2 and all(b["input_ids"].shape[0] == 4 for b in seen)
    assert skips.total == 1 and sum(len(b.get(SKIPPED_KEY, ())) for b in seen) == 1
    assert 3 not in {int(i) for b in seen for i in b["indices"]}  # the next sample stood in for it

    strict = replace(section, on_bad_sample="error")
    make_loader, _ = loader_factory(
        planned, tiny_processor, strict, stage="sft", micro_batch_size=4, seed=0, num_replicas=1, rank=0
    )
    with pytest.raises(DataError, match="truncated"):
        list(make_loader(0))
