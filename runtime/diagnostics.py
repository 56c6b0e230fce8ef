"""Where a distributed run says what went wrong: per-rank logs, and every rank's Python stacks when it hangs.

Set up once per stage by `train.core.trainer.open_stage` (`start(stacks_file, log_file, rank, world, timeout_s)`,
the paths given by the run directory's owner, `rundir.layout`):
- each rank logs to `<run>/logs/rank-<r>.log`; only rank 0 keeps printing to the console (the other ranks' console
  output is cut to errors);
- `<run>/diagnostics/rank-<r>.txt` receives this rank's Python stacks (all threads, `faulthandler`):
  * on SIGUSR1 (`kill -USR1 <pid>`, or `scancel --signal=USR1 --full JOB` on SLURM): a live look at a running job;
  * from the step watchdog, in runs of more than one process: `faulthandler.dump_traceback_later` is armed around
    each optimizer step (`step_guard`) and fires when a step outlasts 90% of `train.collective_timeout_s`, i.e.
    before a rank waiting in a collective gives up, so the stuck rank and the waiting ones all leave their stacks;
  * when a step raises: the exception's traceback is appended, and a collective timeout is re-raised as an error
    that names the files to read.
The collective timeout itself is given to the process group (`train.core.device.make_accelerator`).
"""

from __future__ import annotations

import faulthandler
import logging
import os
import re
import signal
import socket
import sys
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)

WATCHDOG_FRACTION = 0.9  # of the collective timeout: the stacks are written before the waiting ranks give up
TIMEOUT_PATTERN = re.compile(r"timed?[ _-]?out|timeout", re.IGNORECASE)
FORMAT = "%(asctime)s %(levelname)s rank{rank} %(name)s: %(message)s"


class CollectiveTimeout(RuntimeError):
    """A collective waited longer than train.collective_timeout_s; the message names the stack files."""


class _Diagnostics:
    def __init__(self, stacks_file: Callable[[int], Path], rank: int, world: int, timeout_s: float):
        self.stacks_file, self.rank, self.world, self.timeout_s = stacks_file, rank, world, timeout_s
        self.path = stacks_file(rank)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.stream = open(self.path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115 (kept open for faulthandler)
        self.stream.write(
            f"# rank {rank} of {world}, pid {os.getpid()}, host {socket.gethostname()}: Python stacks on "
            f"SIGUSR1, from the step watchdog ({self.watchdog_s:.0f} s) and on a failed step\n"
        )
        if hasattr(signal, "SIGUSR1"):
            # Chain to a handler installed before (e.g. a preemption handler); the default one would kill the process.
            chain = signal.getsignal(signal.SIGUSR1) not in (signal.SIG_DFL, signal.SIG_IGN, None)
            faulthandler.register(signal.SIGUSR1, file=self.stream, all_threads=True, chain=chain)

    @property
    def watchdog_s(self) -> float:
        return max(1.0, WATCHDOG_FRACTION * self.timeout_s)

    def close(self) -> None:
        faulthandler.cancel_dump_traceback_later()
        if hasattr(signal, "SIGUSR1"):
            faulthandler.unregister(signal.SIGUSR1)
        self.stream.close()


_current: _Diagnostics | None = None
_log_handler: logging.Handler | None = None


def start(
    stacks_file: Callable[[int], Path], log_file: Path, rank: int, world: int, timeout_s: float
) -> Path:
    """Per-rank log file and stack dumps for this stage (replacing an earlier stage's in the same process);
    `stacks_file(r)` is rank r's stack file. Returns this rank's."""
    global _current
    setup_logging(log_file, rank)
    if _current is not None:
        _current.close()
    _current = _Diagnostics(stacks_file, rank, world, timeout_s)
    log.info(
        "rank %d logs to %s; Python stacks (kill -USR1 %d, a hung step, a failed collective) go to %s",
        rank,
        log_file,
        os.getpid(),
        _current.path,
    )
    return _current.path


def setup_logging(path: Path, rank: int) -> None:
    """Add (once per stage) a handler writing this rank's log to `path`; on ranks other than 0 the console handlers
    keep errors only."""
    global _log_handler
    root = logging.getLogger()
    if _log_handler is not None:
        root.removeHandler(_log_handler)
        _log_handler.close()
    path.parent.mkdir(parents=True, exist_ok=True)
    _log_handler = logging.FileHandler(path, encoding="utf-8")
    _log_handler.setFormatter(logging.Formatter(FORMAT.format(rank=rank)))
    _log_handler.setLevel(logging.INFO)
    root.addHandler(_log_handler)
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)
    if rank != 0:
        for handler in root.handlers:
            if type(handler) is logging.StreamHandler and handler.stream in (sys.stderr, sys.stdout):
                handler.setLevel(logging.ERROR)


@contextmanager
def step_guard() -> Iterator[None]:
    """Around one optimizer step: arm the watchdog (runs of more than one process), and on an exception append its
    traceback to this rank's stack file; a collective timeout becomes a CollectiveTimeout naming the files."""
    current = _current
    if current is None:
        yield
        return
    if current.world > 1:
        faulthandler.dump_traceback_later(current.watchdog_s, repeat=False, file=current.stream, exit=False)
    try:
        yield
    except Exception as error:
        current.stream.write(f"\n# rank {current.rank}: the step raised\n")
        traceback.print_exception(error, file=current.stream)
        if current.world > 1 and TIMEOUT_PATTERN.search(str(error)):
            others = ", ".join(current.stacks_file(r).name for r in range(current.world))
            raise CollectiveTimeout(
                f"rank {current.rank}: a collective waited more than train.collective_timeout_s="
                f"{current.timeout_s:g} s for the other ranks (one is stuck or died). Every rank wrote its Python "
                f"stacks to {current.path.parent}/ ({others}): read the one whose stack is not in a "
                f"collective; this rank's is {current.path}. Cause: {error}"
            ) from error
        raise
    finally:
        if current.world > 1:
            faulthandler.cancel_dump_traceback_later()
