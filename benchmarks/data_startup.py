"""Data start-up: seconds from launch to the end of a one-step SFT run, and peak memory, at N rows.

    python benchmarks/data_startup.py --rows 100000                  # cold + warm, 1 and 2 processes
    python benchmarks/data_startup.py --rows 1000000 --runs cold --processes 1
    python benchmarks/data_startup.py --rows 100000 --trees before=/tmp/base,after=. --repeats 3   # paired

Generates, under `--workdir` (a temporary folder unless given), a pool of `--images` PNG files of real sizes (200 to
1400 px a side, drawn once, seeded) and a `trl_messages` jsonl of `--rows` rows that reference them (images are
re-used: length planning reads headers, and validation decodes each distinct file once, so the pool size sets the
decoding cost and the row count the planning cost). Each run is `train/sft.py recipes/demo.yaml` (the tiny model)
with that file as `data.train`, `train.max_steps=1`, stages [sft] and a fresh `output_dir`:

- **cold**: a fresh runs root (no `runs/.cache`: no plan cache, no decode verdicts) and a fresh `HF_DATASETS_CACHE`
  (the jsonl is converted to Arrow again). The image files and the jsonl stay in the OS page cache (dropping it needs
  root): a cold run on a cold disk also pays the reads.
- **warm**: the same runs root and datasets cache again, with a new `output_dir` (a second run, a resume, another
  stage).

Per run: the seconds from launch to rank 0's log line "first batch: ..." (the preflight batch, drawn right before
step 1: imports, the tiny model, the whole data start-up, the DataLoader's first batches), to its line "N samples
planned", and to the end of the whole command (plus one step, the adapter save and the demo's validation loss on its
held-out split), the peak
resident memory of the largest process (`ru_maxrss` of the waited-for children, so per rank, not summed), and the
CPU seconds of every process of the run to its end (user + system of the waited-for children, forked planning
workers and ranks included: what the work costs, much less moved by other jobs on the machine than the seconds). The machine
line says what else was running: figures taken while other jobs load the machine are noted as such.

`--trees before=PATH,after=PATH` runs two checkouts (e.g. `git worktree add /tmp/base <commit>`) on the same data,
interleaved (each configuration's runs of one tree back to back with the other's, the order alternating per repeat),
each in its own runs root and datasets cache, and prints the median (min-max) per tree and the paired ratio.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parents[1]
WORDS = (
    "the",
    "chart",
    "shows",
    "a",
    "bar",
    "line",
    "value",
    "of",
    "in",
    "year",
    "total",
    "rate",
    "sales",
    "what",
    "which",
    "is",
    "highest",
    "lowest",
    "between",
    "and",
    "percent",
    "growth",
    "region",
    "north",
    "south",
)
PEAK_WRAPPER = (
    "import resource, subprocess, sys; code = subprocess.run(sys.argv[1:]).returncode; "
    "usage = resource.getrusage(resource.RUSAGE_CHILDREN); "
    "print('PEAK_RSS_KB', usage.ru_maxrss, file=sys.stderr); "
    "print('CPU_S', usage.ru_utime + usage.ru_stime, file=sys.stderr); "
    "sys.exit(code)"
)
PLANNED_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) .* (\d+) samples planned")
FIRST_BATCH_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) .* first batch: ")


def write_images(folder: Path, count: int, seed: int) -> list[str]:
    """`count` PNGs of 200-1400 px a side (a chart-like drawing: flat background, bars, lines), named by index."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = []
    for i in range(count):
        name = f"img{i:05d}.png"
        path = folder / name
        if not path.exists():
            width, height = (int(v) for v in rng.integers(200, 1401, 2))
            image = Image.new("RGB", (width, height), tuple(int(v) for v in rng.integers(200, 256, 3)))
            draw = ImageDraw.Draw(image)
            for _ in range(int(rng.integers(3, 12))):
                x0, y0 = int(rng.integers(0, width - 20)), int(rng.integers(0, height - 20))
                draw.rectangle(
                    (x0, y0, x0 + int(rng.integers(10, width // 3 + 12)), height - 1),
                    fill=tuple(int(v) for v in rng.integers(0, 200, 3)),
                )
            image.save(path, optimize=False)
        names.append(f"images/{name}")
    return names


def sentence(rng: np.random.Generator, low: int, high: int) -> str:
    return " ".join(WORDS[int(i)] for i in rng.integers(0, len(WORDS), int(rng.integers(low, high + 1))))


def write_rows(path: Path, rows: int, images: list[str], seed: int) -> None:
    """`rows` trl_messages rows: nine in ten with one image (picked at random from the pool), one in ten text-only."""
    rng = np.random.default_rng(seed + 1)
    with path.open("w", encoding="utf-8") as stream:
        for i in range(rows):
            question, answer = sentence(rng, 4, 30), sentence(rng, 1, 40)
            if i % 10 == 9:
                row = {
                    "messages": [
                        {"role": "user", "content": question},
                        {"role": "assistant", "content": answer},
                    ],
                    "images": [],
                }
            else:
                row = {
                    "messages": [
                        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]},
                        {"role": "assistant", "content": answer},
                    ],
                    "images": [images[int(rng.integers(0, len(images)))]],
                }
            stream.write(json.dumps(row) + "\n")


def prepare(workdir: Path, rows: int, num_images: int, seed: int) -> Path:
    data = workdir / "data"
    images = write_images(data / "images", num_images, seed)
    rows_file = data / f"rows-{rows}.jsonl"
    if not rows_file.exists():
        tmp = rows_file.with_suffix(".tmp")
        write_rows(tmp, rows, images, seed)
        tmp.rename(rows_file)
    return rows_file


def command(tree: Path, processes: int, overrides: list[str], port: int) -> tuple[list[str], dict[str, str]]:
    """The one-step SFT run of the code in `tree` (this checkout, or another one to compare with)."""
    env = {
        **os.environ,
        "WANDB_MODE": "disabled",
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": str(tree),
    }
    recipe = tree / "recipes" / "demo.yaml"
    if processes == 1:
        return [sys.executable, str(tree / "train" / "sft.py"), str(recipe), *overrides], env
    env["ACCELERATE_USE_CPU"] = "1"
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        str(processes),
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--main_process_port",
        str(port),
        str(tree / "train" / "sft.py"),
        str(recipe),
        *overrides,
    ], env


def stamp(match: re.Match, launched: float) -> float:
    return datetime.datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp() - launched


def log_times(log: Path, launched: float) -> tuple[float | None, int | None, float | None]:
    """Seconds from launch to rank 0's 'N samples planned' line, N, and seconds to its 'first batch' line (the
    preflight batch, right before step 1)."""
    planned_s = planned = first_s = None
    if log.is_file():
        for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
            if planned_s is None and (match := PLANNED_LINE.match(line)):
                planned_s, planned = stamp(match, launched), int(match.group(2))
            elif first_s is None and (match := FIRST_BATCH_LINE.match(line)):
                first_s = stamp(match, launched)
    return planned_s, planned, first_s


def run_once(
    workdir: Path, rows_file: Path, processes: int, kind: str, tag: str, port: int, tree: Path = REPO
) -> dict:
    root = workdir / f"runs-{tag}-p{processes}"
    hf_cache = workdir / f"hf-{tag}-p{processes}"
    if kind == "cold":
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(hf_cache, ignore_errors=True)
    run_dir = root / f"run-{kind}-{time.time_ns()}"
    overrides = [
        f"output_dir={run_dir}",
        "data.train.0.format=trl_messages",
        f"data.train.0.path={rows_file}",
        f"data.train.0.image_root={rows_file.parent}",
        "stages=[sft]",
        "train.max_steps=1",
        "train.checkpoint_every=100",
        "train.log_every=1",
        "data.max_length=2048",
    ]
    argv, env = command(tree, processes, overrides, port)
    env["HF_DATASETS_CACHE"] = str(hf_cache)
    launched = time.time()
    started = time.perf_counter()
    # A fresh wrapper per run, so that its children's ru_maxrss is this run's peak (it only grows within a process).
    result = subprocess.run(
        [sys.executable, "-c", PEAK_WRAPPER, *argv], cwd=REPO, env=env, capture_output=True, text=True
    )
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"run failed ({' '.join(argv)}):\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}")
    peak_kb = int(re.findall(r"^PEAK_RSS_KB (\d+)$", result.stderr, re.MULTILINE)[-1])
    cpu_s = float(re.findall(r"^CPU_S ([\d.]+)$", result.stderr, re.MULTILINE)[-1])
    planned_s, planned, first_s = log_times(run_dir / "logs" / "rank-0.log", launched)
    return {
        "kind": kind,
        "processes": processes,
        "wall_s": round(wall, 2),
        "planned_s": None if planned_s is None else round(planned_s, 2),
        "planned": planned,
        "first_batch_s": None if first_s is None else round(first_s, 2),
        "peak_rss_mb": round(peak_kb / 1024, 1),
        "cpu_s": round(cpu_s, 1),
    }


def parse_trees(text: str) -> dict[str, Path]:
    """'name=path,name=path' -> {name: path}; the default is this checkout alone."""
    trees = {}
    for item in filter(None, text.split(",")):
        name, _, path = item.partition("=")
        tree = Path(path or name).resolve()
        if not (tree / "train" / "sft.py").is_file():
            raise SystemExit(f"--trees: {tree} holds no train/sft.py")
        trees[name if path else tree.name] = tree
    return trees


def spread(values: list[float], fmt: str = ".1f") -> str:
    return f"{format(statistics.median(values), fmt)} ({format(min(values), fmt)}-{format(max(values), fmt)})"


def print_summary(results: list[dict], names: list[str]) -> None:
    """Per (processes, kind): median (min-max) seconds and peak per tree, and the paired ratio first / other."""
    print(
        "\n## seconds from launch to the first batch (planned at; the whole run), peak RSS MB, CPU seconds of all "
        "processes to the end of the run: median (min-max)"
    )
    keys = sorted({(r["processes"], r["kind"]) for r in results}, key=lambda k: (k[0], k[1] != "cold"))
    for processes, kind in keys:
        cells = []
        for name in names:
            runs = [r for r in results if (r["processes"], r["kind"], r["tree"]) == (processes, kind, name)]
            planned = [r["planned_s"] for r in runs if r["planned_s"] is not None]
            cells.append(
                f"{name}: {spread([r['first_batch_s'] for r in runs])} s (planned at "
                f"{spread(planned) if planned else '-'}; {spread([r['wall_s'] for r in runs])}), "
                f"{spread([r['peak_rss_mb'] for r in runs], '.0f')} MB, "
                f"{spread([r['cpu_s'] for r in runs])} CPU s"
            )
        line = f"{processes} process(es), {kind}: " + "; ".join(cells)
        if len(names) == 2:
            pairs = [
                (a["first_batch_s"], b["first_batch_s"])
                for a in results
                for b in results
                if a["tree"] == names[0]
                and b["tree"] == names[1]
                and a["repeat"] == b["repeat"]
                and (a["processes"], a["kind"]) == (b["processes"], b["kind"]) == (processes, kind)
            ]
            line += f"; first batch {names[0]}/{names[1]} paired {spread([a / b for a, b in pairs], '.2f')}x"
            cpu = [
                a["cpu_s"] / b["cpu_s"]
                for a in results
                for b in results
                if a["tree"] == names[0]
                and b["tree"] == names[1]
                and a["repeat"] == b["repeat"]
                and (a["processes"], a["kind"]) == (b["processes"], b["kind"]) == (processes, kind)
            ]
            line += f", CPU seconds paired {spread(cpu, '.2f')}x"
        print(line)


def machine_line() -> str:
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    return (
        f"{platform.platform()}, {os.cpu_count()} CPUs, load average {load}; python "
        f"{platform.python_version()}, torch {__import__('torch').__version__}, datasets "
        f"{__import__('datasets').__version__}"
    )


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--images", type=int, default=500, help="distinct PNG files the rows reference")
    parser.add_argument("--processes", default="1,2", help="comma-separated process counts")
    parser.add_argument(
        "--runs", default="cold,warm", help="cold, warm or both, in this order per process count"
    )
    parser.add_argument(
        "--workdir", type=Path, default=None, help="keeps the generated data between invocations"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument(
        "--trees",
        default=f"this={REPO}",
        help="name=path,name=path: compare checkouts (e.g. before=/tmp/base,after=.), interleaved",
    )
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="data-startup-"))
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    rows_file = prepare(workdir, args.rows, args.images, args.seed)
    print(f"# data start-up, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
    print(f"command: python benchmarks/data_startup.py {' '.join(sys.argv[1:] if argv is None else argv)}")
    print(f"machine: {machine_line()}")
    print(
        f"data: {args.rows} rows referencing {args.images} PNGs (200-1400 px), {rows_file.stat().st_size / 1e6:.0f} MB "
        f"jsonl, generated in {time.perf_counter() - started:.0f} s under {workdir}"
    )
    trees = parse_trees(args.trees)
    print(
        f"trees: {', '.join(f'{name} = {path}' for name, path in trees.items())}; order alternates per repeat"
    )
    results = []
    for repeat in range(args.repeats):
        order = list(trees.items()) if repeat % 2 == 0 else list(reversed(trees.items()))
        for processes in [int(p) for p in args.processes.split(",")]:
            for (
                name,
                tree,
            ) in order:  # interleaved: each tree's cold (then warm) run back to back with the other's
                for kind in args.runs.split(","):
                    result = run_once(
                        workdir,
                        rows_file,
                        processes,
                        kind,
                        f"r{args.rows}-{name}",
                        port=29500 + os.getpid() % 500,
                        tree=tree,
                    )
                    result.update(tree=name, repeat=repeat)
                    results.append(result)
                    planned = "-" if result["planned_s"] is None else f"{result['planned_s']:.1f} s"
                    first = "-" if result["first_batch_s"] is None else f"{result['first_batch_s']:.1f} s"
                    print(
                        f"repeat {repeat + 1}, {name}, {processes} process(es), {kind}: first batch at {first}, "
                        f"planned ({result['planned']} samples) at {planned}, {result['wall_s']:.1f} s to the end of "
                        f"the run, peak RSS {result['peak_rss_mb']:.0f} MB, {result['cpu_s']:.1f} CPU s (all "
                        "processes, to the end of the run)",
                        flush=True,
                    )
    print_summary(results, list(trees))
    if args.json is not None:
        args.json.write_text(
            json.dumps({"rows": args.rows, "images": args.images, "results": results}, indent=1)
        )
    return results


if __name__ == "__main__":
    main()
