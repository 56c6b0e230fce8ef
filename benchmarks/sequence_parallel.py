"""Sequence parallelism on CPU processes: peak memory per rank, step time, the all-to-all share and the tower time
per rank, at N = 1, 2 (and 4) for one long sequence.

    python benchmarks/sequence_parallel.py --tokens 8192 16384 --groups 1 2 4 [--repeats 3] [--out FILE.json]

Each (tokens, N) runs in N fresh processes over gloo (one intra-op thread each), in interleaved order, `--repeats`
times; a run builds the demo's tiny-width model (hidden 128, 2 layers, 4 heads, CLIP 64 wide on 32-pixel crops) with
LoRA-free full training of the language model, gradient checkpointing on, and one sample of `tokens` tokens holding
`--images` images of 2 x 2 crops, the last 64 tokens supervised. It times one SFT forward + backward (after one
warm-up step) and reports per rank: the step's wall time, the time inside the all-to-alls and the gather (forward
and backward, the recomputation included), the CLIP tower's time, and the growth of peak RSS over the step (what the
step itself allocated beyond the process's earlier peak). N = 1 runs the model whole (no group).

What it measures is the split's arithmetic and memory at tiny width, not a GPU's: on 2 cores N = 4 oversubscribes
(4 processes, 2 cores), so its times are not comparable; its memory is.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from models.phi3v import sequence_parallel as spmod
from models.phi3v.modeling import enable_sequence_parallel
from models.phi3v.sequence_parallel import SequenceParallel
from models.phi3v.tiny import DEMO_MODEL, build_tiny_tokenizer, tiny_config

IGNORE = -100


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


class Timer:
    """Wall seconds spent inside wrapped callables (communication and the tower)."""

    def __init__(self):
        self.seconds = {"communication": 0.0, "tower": 0.0}

    def wrap(self, key: str, fn):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[key] += time.perf_counter() - start

        return timed


def build(tokens: int, images: int):
    from models.phi3v import Phi3VForCausalLM

    tokenizer = build_tiny_tokenizer(["What colour is the shape on page one?", "red"])
    dims = dict(DEMO_MODEL)
    crop, patch = dims.pop("crop_size"), dims.pop("patch_size")
    config = tiny_config(tokenizer, crop_size=crop, patch_size=patch, **dims)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = Phi3VForCausalLM(config)
    model.gradient_checkpointing_enable()
    model.train()
    embedding = model.model.vision_embed_tokens
    per_image = embedding.num_tokens(2, 2)
    ids = torch.randint(10, 200, (1, tokens))
    slots = torch.arange(images) * (tokens // max(images, 1))
    for start in slots.tolist():
        ids[0, start + 1 : start + 1 + per_image] = config.image_token_id
    labels = torch.full_like(ids, IGNORE)
    labels[0, -64:] = ids[0, -64:]
    batch = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "pixel_values": torch.randint(0, 255, (4 * images, 3, crop, crop), dtype=torch.uint8),
        "image_sizes": torch.tensor([[2 * crop, 2 * crop]] * images),
    }
    return model, batch, labels


def step(model, batch, labels, sp):
    keep = F.pad(labels[:, 1:] != IGNORE, (0, 1))
    targets = labels[:, 1:][labels[:, 1:] != IGNORE]
    if sp is None:
        logits = model(**batch, logits_to_keep=keep, use_cache=False).logits
    else:
        with sp.splitting():
            logits = model(**batch, logits_to_keep=keep, use_cache=False).logits
        targets = targets[sp.local_rows(keep) >= 0]
    loss = F.cross_entropy(logits.float(), targets, reduction="sum")
    loss.backward()
    model.zero_grad(set_to_none=True)


def worker(rank: int, world: int, port: int, tokens: int, images: int, out: str) -> None:
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    model, batch, labels = build(tokens, images)
    timer = Timer()
    for name in ("AllToAll", "AllReduceSum", "GatherRows"):
        cls = getattr(spmod, name)
        cls.forward = staticmethod(timer.wrap("communication", cls.forward))
        cls.backward = staticmethod(timer.wrap("communication", cls.backward))
    trunk = model.model.vision_embed_tokens.img_processor
    trunk.forward = timer.wrap("tower", trunk.forward)
    sp = None
    if world > 1:
        sp = SequenceParallel(dist.group.WORLD, world, rank)
        enable_sequence_parallel(model, sp)
    step(model, batch, labels, sp)  # warm-up
    timer.seconds = dict.fromkeys(timer.seconds, 0.0)
    before = rss_mib()
    if world > 1:
        dist.barrier()
    start = time.perf_counter()
    step(model, batch, labels, sp)
    seconds = time.perf_counter() - start
    result = {
        "rank": rank,
        "seconds": seconds,
        **{f"{k}_s": v for k, v in timer.seconds.items()},
        "peak_rss_mib": rss_mib(),
        "step_rss_growth_mib": rss_mib() - before,
    }
    Path(out).with_suffix(f".rank{rank}.json").write_text(json.dumps(result))
    if world > 1:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(tokens: int, group: int, images: int, folder: Path, index: int) -> list[dict]:
    out = folder / f"t{tokens}-n{group}-{index}"
    mp.spawn(worker, args=(group, free_port(), tokens, images, str(out)), nprocs=group, join=True)
    return [json.loads(out.with_suffix(f".rank{r}.json").read_text()) for r in range(group)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="benchmarks/sequence_parallel.py", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--tokens", type=int, nargs="+", default=[8192, 16384])
    parser.add_argument("--groups", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    folder = Path(os.environ.get("TMPDIR", "/tmp")) / f"sp-bench-{os.getpid()}"
    folder.mkdir(parents=True, exist_ok=True)
    runs: dict[tuple[int, int], list[list[dict]]] = {}
    for index in range(args.repeats):  # interleaved: every (tokens, N) once per round
        for tokens in args.tokens:
            for group in args.groups:
                runs.setdefault((tokens, group), []).append(run(tokens, group, args.images, folder, index))
    rows = []
    for (tokens, group), repeats in runs.items():

        def med(
            key: str, repeats=repeats
        ) -> float:  # the slowest rank of each run, then the median over runs
            return statistics.median(max(rank[key] for rank in ranks) for ranks in repeats)

        rows.append(
            {
                "tokens": tokens,
                "group": group,
                "step_s": med("seconds"),
                "communication_s": med("communication_s"),
                "tower_s": med("tower_s"),
                "step_rss_growth_mib": med("step_rss_growth_mib"),
                "peak_rss_mib": med("peak_rss_mib"),
                "step_s_range": [
                    min(max(r["seconds"] for r in ranks) for ranks in repeats),
                    max(max(r["seconds"] for r in ranks) for ranks in repeats),
                ],
            }
        )
    print(
        f"{'tokens':>8} {'N':>3} {'step s':>8} {'range':>15} {'comm s':>8} {'comm %':>7} {'tower s/rank':>13} "
        f"{'step RSS MiB':>13} {'peak RSS MiB':>13}"
    )
    for row in rows:
        low, high = row["step_s_range"]
        print(
            f"{row['tokens']:>8} {row['group']:>3} {row['step_s']:>8.2f} {f'{low:.2f}-{high:.2f}':>15} "
            f"{row['communication_s']:>8.2f} {100 * row['communication_s'] / row['step_s']:>6.1f}% "
            f"{row['tower_s']:>13.3f} {row['step_rss_growth_mib']:>13.0f} {row['peak_rss_mib']:>13.0f}"
        )
    if args.out:
        args.out.write_text(
            json.dumps(
                {
                    "machine": f"{os.cpu_count()} CPUs",
                    "torch": torch.__version__,
                    "command": " ".join(sys.argv),
                    "rows": rows,
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
