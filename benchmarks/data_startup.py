"""Data start-up: seconds from launch to the end of a one-step SFT run, and peak memory, at N rows.

    python benchmarks/data_startup.py --rows 100000                  # cold + warm, 1 and 2 processes
    python benchmarks/data_startup.py --rows 1000000 --runs cold --processes 1

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

Per run: wall seconds of the whole command (launch, imports, the tiny model, data start-up, one step, the adapter
save), the seconds from launch to the log line "N samples planned" (start-up up to the DataLoaders), and the peak
resident memory of the largest process (`ru_maxrss` of the waited-for children, so per rank, not summed). The machine
line says what else was running: figures taken while other jobs load the machine are noted as such.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "recipes" / "demo.yaml"
WORDS = ("the", "chart", "shows", "a", "bar", "line", "value", "of", "in", "year", "total", "rate", "sales", "what",
         "which", "is", "highest", "lowest", "between", "and", "percent", "growth", "region", "north", "south")
PEAK_WRAPPER = ("import resource, subprocess, sys; code = subprocess.run(sys.argv[1:]).returncode; "
                "print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); "
                "sys.exit(code)")
PLANNED_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) .* (\d+) samples planned")


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
                draw.rectangle((x0, y0, x0 + int(rng.integers(10, width // 3 + 12)), height - 1),
                               fill=tuple(int(v) for v in rng.integers(0, 200, 3)))
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
                row = {"messages": [{"role": "user", "content": question},
                                    {"role": "assistant", "content": answer}], "images": []}
            else:
                row = {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]},
                                    {"role": "assistant", "content": answer}],
                       "images": [images[int(rng.integers(0, len(images)))]]}
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


def command(processes: int, overrides: list[str], port: int) -> tuple[list[str], dict[str, str]]:
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    if processes == 1:
        return [sys.executable, str(REPO / "train" / "sft.py"), str(DEMO), *overrides], env
    env["ACCELERATE_USE_CPU"] = "1"
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
            "--num_machines", "1", "--mixed_precision", "no", "--main_process_port", str(port),
            str(REPO / "train" / "sft.py"), str(DEMO), *overrides], env


def planned_at(log: Path, launched: float) -> tuple[float | None, int | None]:
    """Seconds from launch to the 'N samples planned' line of rank 0's log, and N."""
    if not log.is_file():
        return None, None
    for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
        match = PLANNED_LINE.match(line)
        if match:
            stamp = datetime.datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
            return stamp - launched, int(match.group(2))
    return None, None


def run_once(workdir: Path, rows_file: Path, processes: int, kind: str, tag: str, port: int) -> dict:
    root = workdir / f"runs-{tag}-p{processes}"
    hf_cache = workdir / f"hf-{tag}-p{processes}"
    if kind == "cold":
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(hf_cache, ignore_errors=True)
    run_dir = root / f"run-{kind}-{time.time_ns()}"
    overrides = [f"output_dir={run_dir}", "data.train.0.format=trl_messages", f"data.train.0.path={rows_file}",
                 f"data.train.0.image_root={rows_file.parent}", "stages=[sft]", "train.max_steps=1",
                 "train.checkpoint_every=100", "train.log_every=1", "data.max_length=2048"]
    argv, env = command(processes, overrides, port)
    env["HF_DATASETS_CACHE"] = str(hf_cache)
    launched = time.time()
    started = time.perf_counter()
    # A fresh wrapper per run, so that its children's ru_maxrss is this run's peak (it only grows within a process).
    result = subprocess.run([sys.executable, "-c", PEAK_WRAPPER, *argv], cwd=REPO, env=env, capture_output=True,
                            text=True)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"run failed ({' '.join(argv)}):\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}")
    peak_kb = int(re.findall(r"^PEAK_RSS_KB (\d+)$", result.stderr, re.MULTILINE)[-1])
    planned_s, planned = planned_at(run_dir / "logs" / "rank-0.log", launched)
    return {"kind": kind, "processes": processes, "wall_s": round(wall, 2),
            "planned_s": None if planned_s is None else round(planned_s, 2), "planned": planned,
            "peak_rss_mb": round(peak_kb / 1024, 1)}


def machine_line() -> str:
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    return (f"{platform.platform()}, {os.cpu_count()} CPUs, load average {load}; python "
            f"{platform.python_version()}, torch {__import__('torch').__version__}, datasets "
            f"{__import__('datasets').__version__}")


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--images", type=int, default=500, help="distinct PNG files the rows reference")
    parser.add_argument("--processes", default="1,2", help="comma-separated process counts")
    parser.add_argument("--runs", default="cold,warm", help="cold, warm or both, in this order per process count")
    parser.add_argument("--workdir", type=Path, default=None, help="keeps the generated data between invocations")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="data-startup-"))
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    rows_file = prepare(workdir, args.rows, args.images, args.seed)
    print(f"# data start-up, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
    print(f"command: python benchmarks/data_startup.py {' '.join(sys.argv[1:] if argv is None else argv)}")
    print(f"machine: {machine_line()}")
    print(f"data: {args.rows} rows referencing {args.images} PNGs (200-1400 px), {rows_file.stat().st_size / 1e6:.0f} MB "
          f"jsonl, generated in {time.perf_counter() - started:.0f} s under {workdir}")
    results = []
    tag = f"r{args.rows}"
    for processes in [int(p) for p in args.processes.split(",")]:
        for kind in args.runs.split(","):
            result = run_once(workdir, rows_file, processes, kind, tag, port=29500 + os.getpid() % 500)
            results.append(result)
            planned = "-" if result["planned_s"] is None else f"{result['planned_s']:.1f} s"
            peak = f"{result['peak_rss_mb']:.0f} MB"
            print(f"{args.rows} rows, {processes} process(es), {kind}: {result['wall_s']:.1f} s to the end of step 1, "
                  f"planned ({result['planned']} samples) at {planned}, peak RSS {peak}", flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps({"rows": args.rows, "images": args.images, "results": results}, indent=1))
    return results


if __name__ == "__main__":
    main()
