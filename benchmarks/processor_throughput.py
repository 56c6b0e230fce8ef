"""Processor throughput: images/s on one core and bytes per sample, ours vs the official transform's layout.

    python benchmarks/processor_throughput.py [--images 60] [--seed 0]

Runs `Phi3VImageProcessor` on a fixed mix of image sizes (phone photos, screenshots, charts, documents, thumbnails)
at num_crops 16 and 4, single-threaded (torch.set_num_threads(1)), and prints a table: images/s, mean crops per
image, and the bytes a DataLoader moves per image for our uint8 crops, our float32 crops, and the official layout
(num_crops + 1 float32 crops per image, padding crops included: docs/phi3v.md#hd-transform). The comparison of bytes
is exact arithmetic on shapes; the throughput is measured.
"""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import time

import numpy as np
import torch
from PIL import Image

from models.phi3v import Phi3VImageProcessor

# (width, height) of a realistic mix: phone photos, screenshots, charts, scanned pages, thumbnails, banners.
SIZE_MIX = [(4032, 3024), (3024, 4032), (1920, 1080), (1280, 720), (2560, 1440), (800, 600), (640, 480),
            (1700, 2200), (2480, 3508), (850, 1100), (336, 336), (224, 224), (1200, 300), (300, 1200), (96, 64)]


def make_images(count: int, seed: int) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    sizes = [SIZE_MIX[i % len(SIZE_MIX)] for i in range(count)]
    random.Random(seed).shuffle(sizes)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB") for w, h in sizes]


def measure(images: list[Image.Image], num_crops: int, do_normalize: bool) -> tuple[float, list[int]]:
    processor = Phi3VImageProcessor(num_crops=num_crops)
    crops = []
    start = time.perf_counter()
    for image in images:
        out = processor([image], do_normalize=do_normalize)
        crops.append(out["pixel_values"].shape[0])
    return len(images) / (time.perf_counter() - start), crops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    images = make_images(args.images, args.seed)
    print(f"machine: {platform.processor() or platform.machine()}, python {platform.python_version()}, torch {torch.__version__}")
    print(f"{len(images)} images, sizes from {sorted(set(im.size for im in images))[:3]}... (see SIZE_MIX)")
    crop_bytes = 3 * 336 * 336
    header = f"{'num_crops':>9} {'output':>8} {'images/s':>9} {'crops/img':>9} {'MB/img':>7} {'official MB/img':>15} {'ratio':>6}"
    print(header)
    for num_crops in (16, 4):
        official_mb = (num_crops + 1) * crop_bytes * 4 / 1e6
        for normalize, label, width in ((False, "uint8", 1), (True, "float32", 4)):
            rate, crops = measure(images, num_crops, normalize)
            ours_mb = statistics.mean(crops) * crop_bytes * width / 1e6
            print(f"{num_crops:>9} {label:>8} {rate:>9.1f} {statistics.mean(crops):>9.2f} {ours_mb:>7.2f} "
                  f"{official_mb:>15.2f} {official_mb / ours_mb:>5.1f}x")


if __name__ == "__main__":
    main()
