"""Processor throughput: ours against Microsoft's official image processor, run side by side, and bytes per image.

    python benchmarks/processor_throughput.py                       # ours only; says the comparison was not run
    python benchmarks/processor_throughput.py --official /tmp/official_code --official-python /tmp/official/bin/python

The image mix: `--images` (60) in-memory RGB images of realistic sizes (phone photos, screenshots, charts, scanned
pages, thumbnails, banners; SIZE_MIX), random pixels from `--seed`, written once as .npy so that both sides read the
same arrays (decoding is not timed). Every measurement runs in a fresh process on one torch thread: per repeat, one
process of ours and one of the official processor, in alternating order, at num_crops 16 and 4. Each process warms
up on 3 images, then times every image of the mix, one call per image. Ratios are paired (ours / official of the same
repeat); the table prints the median over the repeats with min-max.

Comparisons:
1. same CPU work: ours producing what the official produces on the CPU, float32 normalised crops plus the global
   view (bicubic 336x336 of the normalised canvas), against `Phi3VImageProcessor.preprocess(return_tensors="pt")`.
   The official output also holds zero padding crops up to num_crops + 1 (an allocation and a copy, no arithmetic).
2. ours as used in training: uint8 real crops only (`do_normalize=False`); normalisation and the global view run on
   the model's device (`models.phi3v.vision`), so they cost no DataLoader CPU time.
3. ours float32 without the global view (the processor's default output), for reference.
4. bytes per image a DataLoader moves: official (num_crops + 1) float32 crops vs our uint8 real crops (exact arithmetic
   on the mix's shapes).

`--official PATH` is a folder holding the official `image_processing_phi3_v.py` (e.g. from the 2U1/Phi3-Vision-Finetune
mirror, `src/model/Phi3_vision/`); it needs the stack it was written for, so it runs in `--official-python`, an
interpreter with torch 2.3.0, torchvision 0.18.0, transformers 4.40.2 and numpy<2 (a throwaway venv, not part of
this repository). The first repeat also checks that both sides give the same pixels for the first images.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
# (width, height) of a realistic mix: phone photos, screenshots, charts, scanned pages, thumbnails, banners.
SIZE_MIX = [
    (4032, 3024),
    (3024, 4032),
    (1920, 1080),
    (1280, 720),
    (2560, 1440),
    (800, 600),
    (640, 480),
    (1700, 2200),
    (2480, 3508),
    (850, 1100),
    (336, 336),
    (224, 224),
    (1200, 300),
    (300, 1200),
    (96, 64),
]
CROP = 336
WARMUP = 3
CHECKED = 3  # images whose pixels both sides dump in the first repeat


def make_arrays(count: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    sizes = [SIZE_MIX[i % len(SIZE_MIX)] for i in range(count)]
    random.Random(seed).shuffle(sizes)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for w, h in sizes]


def load_images(folder: Path):
    from PIL import Image

    files = sorted(folder.glob("image-*.npy"))
    return [Image.fromarray(np.load(f), "RGB") for f in files]


def time_calls(fn, images) -> float:
    for image in images[:WARMUP]:
        fn(image)
    start = time.perf_counter()
    for image in images:
        fn(image)
    return len(images) / (time.perf_counter() - start)


# --- the two sides, each run in its own process ---------------------------------------------------------------


def worker_official(folder: Path, num_crops: int, official: Path, dump: Path | None) -> dict:
    sys.path.insert(0, str(official))
    from image_processing_phi3_v import Phi3VImageProcessor  # the official file, in the official stack

    processor = Phi3VImageProcessor(num_crops=num_crops)
    images = load_images(folder)
    if dump is not None:
        for i, image in enumerate(images[:CHECKED]):
            out = processor.preprocess([image], return_tensors="pt")
            h, w = (int(v) for v in out["image_sizes"][0])
            real = 1 + (h // CROP) * (w // CROP)
            np.save(dump / f"official-{i}.npy", out["pixel_values"][0, :real].numpy())
    rate = time_calls(lambda image: processor.preprocess([image], return_tensors="pt"), images)
    return {"official": rate}


def worker_ours(folder: Path, num_crops: int, dump: Path | None, order: int) -> dict:
    sys.path.insert(0, str(REPO))
    import torch.nn.functional as F

    from models.phi3v import Phi3VImageProcessor

    processor = Phi3VImageProcessor(num_crops=num_crops)
    images = load_images(folder)

    def same_work(image):
        """float32 normalised crops + the global view on the CPU: what the official processor computes."""
        out = processor([image], do_normalize=True)
        crops = out["pixel_values"]
        h, w = (int(v) for v in out["image_sizes"][0])
        rows, cols = h // CROP, w // CROP
        canvas = crops.reshape(rows, cols, 3, CROP, CROP).permute(2, 0, 3, 1, 4).reshape(1, 3, h, w)
        view = F.interpolate(canvas, size=(CROP, CROP), mode="bicubic", align_corners=False)
        return torch.cat([view, crops])

    if dump is not None:
        for i, image in enumerate(images[:CHECKED]):
            np.save(dump / f"ours-{i}.npy", same_work(image).numpy())
    modes = {
        "same_work": same_work,
        "uint8": lambda image: processor([image], do_normalize=False),
        "float32": lambda image: processor([image], do_normalize=True),
    }
    names = list(modes) if order % 2 == 0 else list(reversed(modes))
    result = {name: time_calls(modes[name], images) for name in names}
    result["crops"] = [_crops(processor, im) for im in images]
    return result


def _crops(processor, image) -> int:
    from models.phi3v import crop_grid

    rows, cols = crop_grid(image.width, image.height, processor.num_crops)
    return rows * cols


def run_worker(python: str, args: list[str]) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    done = subprocess.run(
        [python, str(Path(__file__).resolve()), *args], capture_output=True, text=True, env=env, cwd=REPO
    )
    if done.returncode != 0:
        raise SystemExit(f"worker {args} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def spread(values: list[float], fmt: str = "{:.2f}") -> str:
    return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=5, help="fresh processes per side and num_crops")
    parser.add_argument("--num-crops", type=int, nargs="+", default=[16, 4])
    parser.add_argument(
        "--official", type=Path, help="folder holding the official image_processing_phi3_v.py"
    )
    parser.add_argument("--official-python", default=None, help="interpreter of the official stack")
    parser.add_argument("--worker", choices=["ours", "official"], help=argparse.SUPPRESS)
    parser.add_argument("--dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--dump", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--order", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(1)

    if args.worker:
        nc = args.num_crops[0]
        out = (
            worker_official(args.dir, nc, args.official, args.dump)
            if args.worker == "official"
            else worker_ours(args.dir, nc, args.dump, args.order)
        )
        out["torch"] = torch.__version__
        print(json.dumps(out))
        return

    if args.official is not None:
        if not (args.official / "image_processing_phi3_v.py").is_file():
            raise SystemExit(f"--official {args.official}: no image_processing_phi3_v.py there")
        if not args.official_python:
            raise SystemExit(
                "--official needs --official-python: an interpreter with torch 2.3.0, torchvision "
                "0.18.0, transformers 4.40.2, numpy<2 (see the docstring)"
            )
    print(f"# processor throughput, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    print(
        f"machine: {platform.platform()}, {os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.2f}/"
        f"{os.getloadavg()[1]:.2f}/{os.getloadavg()[2]:.2f}; ours: python {platform.python_version()}, "
        f"torch {torch.__version__}; one torch thread per process"
    )
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        arrays = make_arrays(args.images, args.seed)
        for i, array in enumerate(arrays):
            np.save(folder / f"image-{i:03d}.npy", array)
        print(
            f"{len(arrays)} images ({sum(a.shape[0] * a.shape[1] for a in arrays) / len(arrays) / 1e6:.1f} MP "
            f"mean), sizes from SIZE_MIX, random pixels, seed {args.seed}; {args.repeats} repeat(s)"
        )
        if args.official is not None:
            version = subprocess.run(
                [
                    args.official_python,
                    "-c",
                    "import torch, torchvision, transformers, numpy, "
                    "PIL; print(torch.__version__, torchvision.__version__, transformers.__version__,"
                    " numpy.__version__, PIL.__version__)",
                ],
                capture_output=True,
                text=True,
            )
            print(
                f"official: {args.official / 'image_processing_phi3_v.py'} in {args.official_python} "
                f"(torch, torchvision, transformers, numpy, pillow: {version.stdout.strip()})"
            )
        for nc in args.num_crops:
            runs = []
            for r in range(args.repeats):
                dump = folder / f"dump-{nc}" if r == 0 and args.official is not None else None
                if dump:
                    dump.mkdir()
                common = [
                    "--dir",
                    str(folder),
                    "--num-crops",
                    str(nc),
                    *(["--dump", str(dump)] if dump else []),
                ]
                sides = ["ours", "official"] if args.official is not None else ["ours"]
                if r % 2:
                    sides.reverse()
                run = {}
                for side in sides:
                    if side == "ours":
                        run.update(
                            run_worker(sys.executable, ["--worker", "ours", "--order", str(r), *common])
                        )
                    else:
                        run.update(
                            run_worker(
                                args.official_python,
                                ["--worker", "official", "--official", str(args.official), *common],
                            )
                        )
                runs.append(run)
                print(
                    f"  num_crops {nc} repeat {r + 1}: "
                    + ", ".join(f"{k} {v:.1f}" for k, v in run.items() if isinstance(v, float))
                    + " images/s",
                    flush=True,
                )
            report(nc, runs, folder / f"dump-{nc}" if args.official is not None else None)
    if args.official is None:
        print(
            "comparison with the official processor: NOT RUN (pass --official PATH --official-python PYTHON)"
        )


def report(nc: int, runs: list[dict], dump: Path | None) -> None:
    crops = runs[0]["crops"]
    crop_bytes = 3 * CROP * CROP
    official_mb = (nc + 1) * crop_bytes * 4 / 1e6
    ours_mb = statistics.mean(crops) * crop_bytes / 1e6
    print(f"\n## num_crops {nc}: images/s, median (min-max) over {len(runs)} fresh process(es) per side")
    print(f"{'comparison':<52} {'official':>18} {'ours':>18} {'ours/official (paired)':>24}")
    rows = [
        ("1. same CPU work: float32 + global view on the CPU", "same_work"),
        ("2. as used in training: uint8, global view on device", "uint8"),
        ("3. ours float32, no global view (default output)", "float32"),
    ]
    for label, key in rows:
        ours = [r[key] for r in runs]
        if "official" in runs[0]:
            official = [r["official"] for r in runs]
            ratios = [r[key] / r["official"] for r in runs]
            print(
                f"{label:<52} {spread(official, '{:.1f}'):>18} {spread(ours, '{:.1f}'):>18} "
                f"{spread(ratios) + 'x':>24}"
            )
        else:
            print(f"{label:<52} {'not run':>18} {spread(ours, '{:.1f}'):>18} {'not run':>24}")
    print(
        f"4. bytes per image: official {nc + 1} float32 crops = {official_mb:.2f} MB; ours uint8 real crops "
        f"({statistics.mean(crops):.2f} per image) = {ours_mb:.2f} MB; {official_mb / ours_mb:.1f}x fewer"
    )
    if dump is not None and dump.is_dir():
        diffs = []
        for i in range(CHECKED):
            a, b = np.load(dump / f"official-{i}.npy"), np.load(dump / f"ours-{i}.npy")
            if a.shape != b.shape:
                print(f"   pixels of image {i}: shapes differ, official {a.shape} vs ours {b.shape}")
                continue
            diffs.append((float(np.abs(a[1:] - b[1:]).max()), float(np.abs(a[:1] - b[:1]).max())))
        print(
            f"   same pixels? first {CHECKED} images, max |official - ours|: crops "
            f"{max(d[0] for d in diffs):.3g}, global view {max(d[1] for d in diffs):.3g}"
        )


if __name__ == "__main__":
    main()
