"""The plan of a stage: the compact table equals the planned samples, the on-disk cache equals the computed plan and
is invalidated by any setting or file that shapes it, and planning shared out over processes and ranks gives the
same samples, skips and errors as one process planning alone."""

from __future__ import annotations

import json
import logging
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as torch_mp

from config import load_recipe
from data import length as length_module
from data.length import plan_lengths
from data.loaders import plan_stage
from data.plan_table import PlanTable
from data.sample import ImagePart, ImageRef, Origin, PreferenceSample, SFTSample, TextPart, Turn
from data.sources import SkipCounter
from rundir.layout import PLANS_DIR
from tests.conftest import drawn_image
from train.core.checkpoint import data_fingerprint

from ..conftest import REPO

DEMO = REPO / "recipes" / "demo.yaml"


def write_source(folder: Path, rows: int = 24) -> Path:
    """A trl_messages jsonl of `rows` rows over 3 PNGs, one text-only row in four, one broken image file, one
    over-long row (for data.max_length=160), one row the adapter refuses."""
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    for k, size in enumerate(((40, 30), (64, 64), (30, 90))):
        drawn_image(*size, seed=k).save(images / f"{k}.png")
    (images / "broken.png").write_bytes((images / "0.png").read_bytes()[:60])
    lines = []
    for i in range(rows):
        image = "images/broken.png" if i == 5 else f"images/{i % 3}.png"
        answer = " ".join(str(n) for n in range(200)) if i == 7 else "red " * (1 + i % 4)
        if i % 4 == 3:
            row = {
                "messages": [
                    {"role": "user", "content": f"Say {i}."},
                    {"role": "assistant", "content": answer},
                ],
                "images": [],
            }
        else:
            row = {
                "messages": [
                    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": f"Q{i}?"}]},
                    {"role": "assistant", "content": answer},
                ],
                "images": [image],
            }
        if i == 10:
            row = {
                "messages": [{"role": "assistant", "content": "no question"}],
                "images": [],
            }  # the adapter refuses it
        lines.append(json.dumps(row))
    path = folder / "train.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def recipe_for(source: Path, *overrides: str):
    return load_recipe(
        DEMO,
        [
            "data.train.0.format=trl_messages",
            f"data.train.0.path={source}",
            f"data.train.0.image_root={source.parent}",
            "data.on_bad_sample=skip",
            "data.max_length=160",
            "stages=[sft]",
            *overrides,
        ],
    )


def planned_of(recipe, processor, cache: Path):
    skips = SkipCounter()
    table = plan_stage(recipe, processor, "sft", skips, cache_dir=cache)
    return table, skips


def test_the_table_rebuilds_every_planned_sample_and_its_fingerprint(tiny_processor, tmp_path):
    drawn_image(40, 30).save(tmp_path / "a.png")
    drawn_image(50, 20).save(tmp_path / "b.png")
    user = Turn(role="user", parts=(ImagePart(), TextPart("Which is better?")))
    samples = [
        SFTSample(
            turns=(
                Turn(role="system", parts=(TextPart("Be brief — ü"),)),
                user,
                Turn(role="assistant", parts=(TextPart("the left"),)),
            ),
            images=(ImageRef(path=tmp_path / "a.png"),),
            origin=Origin(dataset="d1", row=4),
        ),
        PreferenceSample(
            prompt=(user,),
            chosen=Turn(role="assistant", parts=(TextPart("A"),)),
            rejected=Turn(role="assistant", parts=(TextPart("B"),)),
            images=(ImageRef(data=(tmp_path / "b.png").read_bytes()),),
            origin=Origin(dataset="d2", row=0),
            rejected_images=(ImageRef(path=tmp_path / "a.png"),),
        ),
        PreferenceSample(
            prompt=(user,),
            chosen=Turn(role="assistant", parts=(TextPart("yes"),)),
            rejected=Turn(role="assistant", parts=(TextPart("no"),)),
            images=(ImageRef(path=tmp_path / "b.png"),),
            origin=Origin(dataset="d2", row=1),
        ),
    ]
    planned = plan_lengths(samples, tiny_processor, max_length=4096, skips=SkipCounter())
    table = PlanTable.from_planned(planned)
    assert (
        len(table) == 3 and list(table) == planned and table[-1] == planned[-1] and table[0:2] == planned[0:2]
    )
    assert table.lengths().tolist() == [p.num_tokens for p in planned]
    assert table.lengths(shared=True).tolist() == [p.shared_tokens or p.num_tokens for p in planned]
    assert data_fingerprint(table) == data_fingerprint(planned)
    assert 0 < table.bytes_per_row() < 2000
    with pytest.raises(IndexError):
        table[3]


def test_the_cached_plan_equals_the_computed_plan(tiny_processor, tmp_path, caplog):
    source = write_source(tmp_path / "data")
    recipe, cache = recipe_for(source), tmp_path / "cache"
    computed, computed_skips = planned_of(recipe, tiny_processor, cache)
    [written] = (cache / PLANS_DIR).glob("sft-*.npz")
    assert computed_skips.total == 3  # the refused row, the broken image and the over-long row
    with caplog.at_level(logging.INFO, logger="data.loaders"):
        cached, cached_skips = planned_of(recipe, tiny_processor, cache)
    assert "read from" in caplog.text
    assert list(cached) == list(computed) and len(cached) == 24 - 3
    assert cached_skips.counts() == computed_skips.counts() and cached_skips.records == computed_skips.records
    assert data_fingerprint(cached) == data_fingerprint(list(computed))
    assert list((cache / PLANS_DIR).glob("sft-*.npz")) == [written]


@pytest.mark.parametrize("change", ["setting", "source file", "image file", "tokenizer"])
def test_a_changed_setting_source_or_image_plans_again(
    tiny_processor, tiny_tokenizer, tmp_path, caplog, change
):
    source = write_source(tmp_path / "data")
    cache = tmp_path / "cache"
    first, _ = planned_of(recipe_for(source), tiny_processor, cache)
    recipe, processor = recipe_for(source), tiny_processor
    if change == "setting":
        recipe = recipe_for(source, "data.max_length=4096")  # the over-long row is kept now
    elif change == "source file":
        text = source.read_text().replace("Q0?", "Q0, longer question?")
        source.write_text(text)
    elif change == "image file":
        drawn_image(80, 30).save(source.parent / "images" / "0.png")
    else:
        from models.phi3v import Phi3VProcessor

        processor = Phi3VProcessor(tiny_processor.image_processor, tiny_tokenizer)
        processor.image_processor = type(tiny_processor.image_processor).from_dict(
            {**tiny_processor.image_processor.to_dict(), "num_crops": 1}
        )
    with caplog.at_level(logging.INFO, logger="data"):
        second, _ = planned_of(recipe, processor, cache)
    assert "read from" not in caplog.text
    if change == "image file":
        assert "image files changed" in caplog.text
    assert list(second) != list(first)
    fresh, _ = planned_of(recipe, processor, tmp_path / "fresh-cache")  # what no cache at all gives
    assert list(second) == list(fresh)


def test_a_corrupt_cache_is_recomputed_with_a_warning(tiny_processor, tmp_path, caplog):
    source = write_source(tmp_path / "data")
    recipe, cache = recipe_for(source), tmp_path / "cache"
    computed, _ = planned_of(recipe, tiny_processor, cache)
    [written] = (cache / PLANS_DIR).glob("sft-*.npz")
    written.write_bytes(written.read_bytes()[: written.stat().st_size // 2])
    with caplog.at_level(logging.WARNING):
        again, _ = planned_of(recipe, tiny_processor, cache)
    assert "cannot be used" in caplog.text and list(again) == list(computed)
    assert (
        written.stat().st_size > 0
        and planned_of(recipe, tiny_processor, cache)[0].data_fingerprint() == computed.data_fingerprint()
    )


@pytest.mark.parametrize("workers", [1, 2])
def test_planning_by_row_ranges_equals_reading_then_planning(tiny_processor, tmp_path, monkeypatch, workers):
    """The one-source path (data/plan_build.py, rows read and planned in ranges, here in 1 or 2 processes) gives
    what reading every sample and planning them gives: samples, order, skips, and the first error."""
    from data import length as length_module
    from data.loaders import plan, read_samples
    from runtime.processes import cores_per_rank

    monkeypatch.setattr(length_module, "MIN_ROWS_PER_WORKER", 2)
    monkeypatch.setattr("data.plan_build.MIN_ROWS_PER_WORKER", 2)
    monkeypatch.setattr("data.loaders.cores_per_rank", lambda world: workers)
    assert cores_per_rank(1) >= 1
    source = write_source(tmp_path / "data", rows=40)
    for on_bad_sample in ("skip", "error"):
        recipe = recipe_for(source, f"data.on_bad_sample={on_bad_sample}")
        [concrete] = recipe.data.train
        outcomes = []
        for way in ("ranges", "samples"):
            skips = SkipCounter()
            try:
                if way == "ranges":
                    planned = list(plan_stage(recipe, tiny_processor, "sft", skips, cache_dir=None))
                else:
                    samples = read_samples([concrete], recipe.data, seed=recipe.seed, skips=skips)
                    planned = plan(samples, tiny_processor, recipe.data, skips, progress=False)
                outcomes.append((planned, skips.records))
            except ValueError as error:
                outcomes.append((type(error).__name__, str(error)))
        assert outcomes[0] == outcomes[1]
        if on_bad_sample == "skip":
            assert len(outcomes[0][0]) == 40 - 3 and len(outcomes[0][1]) == 3
        else:
            assert (
                "row 10" in outcomes[0][1]
            )  # every row is adapted before any is planned: the refused row comes first


def test_the_one_source_plan_equals_planning_each_sample_straightforwardly(
    tiny_processor, tmp_path, monkeypatch
):
    """The fast path (rows read in Arrow batches, chunks tokenised a batch at a time, in 2 worker processes) keeps
    exactly the samples, lengths and image plans that `plan_sample` gives each adapted row alone (a transformers
    tokenizer call per chunk), less the over-long rows and the rows whose image does not decode."""
    from data.loaders import read_samples
    from data.sample import DataError

    monkeypatch.setattr("data.plan_build.MIN_ROWS_PER_WORKER", 2)
    monkeypatch.setattr("data.plan_build.PLAN_BATCH", 3)
    monkeypatch.setattr("data.loaders.cores_per_rank", lambda world: 2)
    source = write_source(tmp_path / "data", rows=40)
    recipe = recipe_for(source)
    table = plan_stage(recipe, tiny_processor, "sft", SkipCounter(), cache_dir=None)
    samples = read_samples(list(recipe.data.train), recipe.data, seed=recipe.seed, skips=SkipCounter())
    expected = []
    for sample in samples:
        try:
            plan = length_module.plan_sample(sample, tiny_processor)
        except DataError:
            continue
        broken = any(ref.path is not None and ref.path.name == "broken.png" for ref in sample.images)
        if plan.num_tokens <= recipe.data.max_length and not broken:
            expected.append(plan)
    assert list(table) == expected and len(expected) == 40 - 3


def test_rows_in_range_reads_what_the_iterable_dataset_yields(tmp_path):
    """Rows read in Arrow batches equal the rows of the iterable dataset they replace: JSON columns of mixed types
    decoded, image columns left encoded, any range, a `limit`ed source."""
    import datasets

    from config.schema import Source
    from data.sources import _with_undecoded_images, indexed_rows, rows_in_range

    def iterable(dataset, start, stop):
        rows = dataset.select(range(start, stop)).to_iterable_dataset()
        return list(rows.cast(_with_undecoded_images(rows.features)))

    source = write_source(tmp_path / "data", rows=40)
    buffer = tmp_path / "a.png"
    drawn_image(20, 10).save(buffer)
    with_images = datasets.Dataset.from_dict(
        {
            "image": [{"bytes": buffer.read_bytes(), "path": None}, {"bytes": None, "path": str(buffer)}] * 5,
            "images": [[{"bytes": buffer.read_bytes(), "path": None}], []] * 5,
            "n": list(range(10)),
        },
        features=datasets.Features(
            image=datasets.Image(), images=datasets.List(datasets.Image()), n=datasets.Value("int64")
        ),
    )
    for dataset in (
        indexed_rows(Source(format="trl_messages", path=str(source))),
        indexed_rows(Source(format="trl_messages", path=str(source), limit=25)),
        with_images,
    ):
        for start, stop in ((0, len(dataset)), (3, 7), (len(dataset) - 1, len(dataset))):
            assert list(rows_in_range(dataset, start, stop)) == iterable(dataset, start, stop)
        assert list(rows_in_range(dataset, 5, 5)) == []  # (the iterable dataset cannot even be made)
    assert isinstance(next(rows_in_range(with_images, 0, 1))["image"], dict)


def many_samples(tmp_path: Path, count: int) -> list[SFTSample]:
    drawn_image(40, 30).save(tmp_path / "a.png")
    (tmp_path / "bad.png").write_bytes(b"not a png")
    samples = []
    for i in range(count):
        ref = ImageRef(path=tmp_path / ("bad.png" if i % 7 == 3 else "a.png"))
        user = Turn(role="user", parts=(ImagePart(), TextPart(f"question {i}?")))
        answer = Turn(role="assistant", parts=(TextPart("word " * (50 if i % 5 == 1 else 1 + i % 3)),))
        samples.append(SFTSample(turns=(user, answer), images=(ref,), origin=Origin(dataset="d", row=i)))
    return samples


def test_planning_in_worker_processes_gives_the_same_plan_and_skips(tiny_processor, tmp_path, monkeypatch):
    samples = many_samples(tmp_path, 40)
    alone, alone_skips = SkipCounter(), SkipCounter()
    expected = plan_lengths(samples, tiny_processor, max_length=90, on_bad_sample="skip", skips=alone_skips)
    monkeypatch.setattr(length_module, "MIN_ROWS_PER_WORKER", 4)
    shared = plan_lengths(
        samples, tiny_processor, max_length=90, on_bad_sample="skip", skips=alone, workers=2
    )
    assert shared == expected and alone.records == alone_skips.records and alone.total > 5
    with pytest.raises(Exception) as sequential:
        plan_lengths(samples, tiny_processor, max_length=90, on_bad_sample="error", skips=SkipCounter())
    with pytest.raises(Exception) as forked:
        plan_lengths(
            samples, tiny_processor, max_length=90, on_bad_sample="error", skips=SkipCounter(), workers=2
        )
    assert str(forked.value) == str(sequential.value) and "row 3" in str(forked.value)


def _two_ranks(rank: int, port: int, folder: str, results: dict) -> None:
    import torch.distributed as dist

    from config.schema import DataSection
    from data.loaders import plan
    from models.phi3v import Phi3VImageProcessor, Phi3VProcessor
    from models.phi3v.tiny import build_tiny_tokenizer
    from runtime.processes import Ranks
    from tests.conftest import TINY_TEXTS

    torch.set_num_threads(1)

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        processor = Phi3VProcessor(
            Phi3VImageProcessor(num_crops=4, crop_size=32, patch_size=8), build_tiny_tokenizer(TINY_TEXTS)
        )
        samples = many_samples(Path(folder), 30)
        data = DataSection(max_length=90, on_bad_sample="skip")
        skips = SkipCounter()
        planned = plan(
            samples,
            processor,
            data,
            skips,
            cache_dir=Path(folder) / f"cache-{rank}",
            progress=False,
            ranks=Ranks.current(),
        )
        results[rank] = (
            [p.sample.origin.row for p in planned],
            skips.records,
            sorted(p.name for p in Path(folder).glob("cache-*")),
        )
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow  # two spawned processes importing torch: ~20 s on 2 loaded cores
def test_two_ranks_share_planning_and_decoding_and_agree(tiny_processor, tmp_path):
    samples = many_samples(tmp_path, 30)
    skips = SkipCounter()
    from config.schema import DataSection
    from data.loaders import plan

    expected = plan(
        samples, tiny_processor, DataSection(max_length=90, on_bad_sample="skip"), skips, progress=False
    )
    manager = torch_mp.get_context("spawn").Manager()
    results = manager.dict()
    torch_mp.start_processes(
        _two_ranks, args=(free_port(), str(tmp_path), results), nprocs=2, join=True, start_method="spawn"
    )
    rows = [p.sample.origin.row for p in expected]
    assert results[0][0] == results[1][0] == rows
    assert results[0][1] == results[1][1] == skips.records
    assert results[0][2] == ["cache-0"]  # only rank 0 writes the decode verdicts
