"""One writer per run directory: a lock file created atomically when a stage starts, released when it ends.

    lock = acquire(run_dir, command="train/sft.py recipes/demo.yaml")   # RunLocked (exit 2) when another holds it
    ...
    lock.release()

The lock file (`rundir.layout.lock_file`) is created whole: written to a private file and hard-linked into place
(the link fails when a lock exists), so of two launches racing for one run directory exactly one creates it, and
the other reads a complete record to name it; it holds the holder's host, pid (and the pid's start time, so that a
reused pid is not mistaken for it), start time, command, a token and a lease. A second launch refuses with a message
naming the holder. A lock is stale, and is taken over, when
- its host is this host and its process is gone (a crash, a SIGKILL: `train.resume=true` then just works), or
- its lease has run out: a holder on another host (a shared filesystem) renews the lease every LEASE_S / 4 seconds
  from a daemon thread; a holder that stopped renewing for LEASE_S seconds is gone. Hosts' clocks must agree to
  well within LEASE_S.

Who takes it: `launch.sh` takes it on node 0 for the whole launch (every stage, export included) and hands its token to
the stages in $PHI3V_RUN_LOCK; a stage whose token matches the lock joins it (renews its lease, does not release it).
A stage started alone (`accelerate launch train/sft.py`, `python train/sft.py`) takes it itself in its main process;
the other ranks of a job never take it, so they are never refused by their own job's lock. A process that already
holds the lock (a test calling `main` twice) holds it again. An elastic restart starts new rank processes under the
same launch.sh (same token), or, without launch.sh, finds the lock of its dead rank 0 stale.

    python -m rundir.run_lock acquire RUN_DIR --pid PID --command TEXT    # prints the token (launch.sh)
    python -m rundir.run_lock release RUN_DIR --token TOKEN
"""

from __future__ import annotations

import argparse
import atexit
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from rundir.layout import lock_file
from runtime.user_errors import run_main

log = logging.getLogger(__name__)

LEASE_S = 300.0  # a holder on another host that has not renewed for this long is gone
YOUNG_S = 30.0  # a lock file that cannot be read yet may be in the middle of being written
TOKEN_ENV = "PHI3V_RUN_LOCK"


class RunLocked(FileExistsError):
    """Another live process holds the run directory (an OSError: the message alone, exit 2)."""


@dataclass
class Holder:
    host: str
    pid: int
    pid_start: str | None
    started: str
    command: str
    token: str
    lease_until: float


def process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (/proc/<pid>/stat field 22), None where unknown: with the
    pid it names one process, even after the pid is reused."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[-1].split()[19]


def alive(pid: int, pid_start: str | None) -> bool:
    """Whether process `pid` of this host is still the one that took the lock."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        pass
    started = process_start(pid)
    return pid_start is None or started is None or started == pid_start


def read_holder(path: Path) -> Holder | None:
    """The lock's holder, or None when the file is not (yet) a readable lock."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        return Holder(**{key: record[key] for key in Holder.__dataclass_fields__})
    except (OSError, ValueError, TypeError, KeyError):
        return None


def describe(holder: Holder) -> str:
    return f"host {holder.host}, pid {holder.pid}, since {holder.started}, running {holder.command!r}"


def stale_reason(path: Path, holder: Holder | None) -> str | None:
    """Why the lock at `path` is stale, or None while its holder may still be running."""
    if holder is None:
        try:
            age = time.time() - path.stat().st_mtime
        except FileNotFoundError:
            return "it is gone"
        return f"it is unreadable and {age:.0f} s old" if age > YOUNG_S else None
    if holder.host == socket.gethostname():
        return None if alive(holder.pid, holder.pid_start) else f"its process {holder.pid} is gone"
    if time.time() > holder.lease_until:
        return f"its lease ran out at {_when(holder.lease_until)} (the holder on {holder.host} stopped renewing it)"
    return None


def _when(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, timezone.utc).isoformat(timespec="seconds")


class RunLock:
    """A held (or joined) lock; `release()` removes it when this process took it."""

    def __init__(self, path: Path, holder: Holder, *, owned: bool, lease_s: float):
        self.path, self.holder, self.owned, self.lease_s = path, holder, owned, lease_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew_forever, name="run-lock-lease", daemon=True)
        self._thread.start()

    def _renew_forever(self) -> None:
        while not self._stop.wait(self.lease_s / 4):
            try:
                self.renew()
            except (
                OSError
            ) as error:  # the run directory went away (a failed start removes it): nothing to renew
                log.warning("run lock %s: the lease could not be renewed (%s)", self.path, error)

    def renew(self) -> bool:
        """Push the lease forward, only while the lock is still this holder's (same token)."""
        current = read_holder(self.path)
        if current is None or current.token != self.holder.token:
            return False
        self.holder.lease_until = time.time() + self.lease_s
        _write(self.path.with_name(f".tmp-{self.path.name}-{os.getpid()}"), self.holder, replace=self.path)
        return True

    def release(self) -> None:
        self._stop.set()
        if self.owned:
            current = read_holder(self.path)
            if current is not None and current.token == self.holder.token:
                self.path.unlink(missing_ok=True)
        _HELD.pop(self.path.resolve(), None)


_HELD: dict[Path, RunLock] = {}


def _write(path: Path, holder: Holder, *, replace: Path | None = None, exclusive: bool = False) -> None:
    """Write the holder record. `exclusive`: create `path` only if absent, whole: the record is written to a
    private file first and hard-linked into place (atomic, and FileExistsError when a lock is there), so another
    launch never reads a lock file that exists but is still empty."""
    data = (json.dumps(asdict(holder), indent=1) + "\n").encode()
    target = path.with_name(f".{path.name}-{uuid.uuid4().hex[:8]}") if exclusive else path
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    if exclusive:
        try:
            os.link(target, path)
        finally:
            target.unlink(missing_ok=True)
    if replace is not None:
        os.replace(path, replace)


def acquire(run_dir: Path, *, command: str, pid: int | None = None, lease_s: float = LEASE_S) -> RunLock:
    """Take (or join, or hold again) the run directory's lock; RunLocked naming the holder when a live one has it."""
    path = lock_file(run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.resolve() in _HELD:
        return _HELD[path.resolve()]
    pid = os.getpid() if pid is None else pid
    token = os.environ.get(TOKEN_ENV)
    for _ in range(5):
        current = read_holder(path)
        if current is not None and token and current.token == token:  # our launch's lock (launch.sh)
            lock = RunLock(path, current, owned=False, lease_s=lease_s)
            break
        if current is not None and current.host == socket.gethostname() and current.pid == pid:
            lock = RunLock(path, current, owned=True, lease_s=lease_s)  # this process took it before
            break
        holder = Holder(
            host=socket.gethostname(),
            pid=pid,
            pid_start=process_start(pid),
            started=_when(time.time()),
            command=command,
            token=uuid.uuid4().hex,
            lease_until=time.time() + lease_s,
        )
        try:
            _write(path, holder, exclusive=True)
        except FileExistsError:
            current = read_holder(path)  # the one that was faster than this launch
            reason = stale_reason(path, current)
            if reason is None:
                raise RunLocked(_refusal(path, current, lease_s)) from None
            _break_stale(path, current, reason)
            continue
        lock = RunLock(path, holder, owned=True, lease_s=lease_s)
        break
    else:
        raise RunLocked(
            f"{path}: could not take the run directory's lock after 5 tries (other launches keep taking "
            "it). Fix: launch one run per output_dir"
        )
    _HELD[path.resolve()] = lock
    return lock


def _refusal(path: Path, holder: Holder | None, lease_s: float) -> str:
    who = describe(holder) if holder is not None else "a process that is writing it now"
    elsewhere = (
        ""
        if holder is None or holder.host == socket.gethostname()
        else (f"; if that process is gone, its lease runs out at {_when(holder.lease_until)}")
    )
    return (
        f"{path.parent} is in use by another run ({who}){elsewhere}: two runs writing one run directory would "
        f"interleave its checkpoints, logs and weights. Fix: wait for it to end, choose another output_dir, or, if "
        f"you know it is gone, remove {path}"
    )


def _break_stale(path: Path, seen: Holder | None, reason: str) -> None:
    """Move a stale lock out of the way, only if it is still the one judged stale (another launch may have broken it
    and taken the lock in between: that fresh lock is put back)."""
    aside = path.with_name(f".stale-{path.name}-{uuid.uuid4().hex[:8]}")
    try:
        os.replace(path, aside)
    except FileNotFoundError:
        return
    moved = read_holder(aside)
    if seen is not None and (moved is None or moved.token != seen.token):
        try:
            os.link(
                aside, path
            )  # a fresh lock taken meanwhile: back into place, unless yet another one is there
        except FileExistsError:
            pass
    elif seen is not None:
        log.warning("took over the run lock %s from %s: %s", path, describe(seen), reason)
    aside.unlink(missing_ok=True)


def release(run_dir: Path) -> None:
    """Release the lock this process took on `run_dir` (a joined one only stops renewing); nothing if none."""
    lock = _HELD.get(lock_file(run_dir).resolve())
    if lock is not None:
        lock.release()


def release_all() -> None:
    for lock in list(_HELD.values()):
        lock.release()


atexit.register(release_all)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m rundir.run_lock",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="action", required=True)
    take = sub.add_parser("acquire", help="take the lock for process PID; prints its token")
    take.add_argument("run_dir", type=Path)
    take.add_argument("--pid", type=int, required=True)
    take.add_argument("--command", required=True)
    give = sub.add_parser("release", help="remove the lock if TOKEN still holds it")
    give.add_argument("run_dir", type=Path)
    give.add_argument("--token", required=True)
    args = parser.parse_args(argv)
    if args.action == "acquire":
        lock = acquire(args.run_dir, command=args.command, pid=args.pid)
        _HELD.pop(
            lock.path.resolve(), None
        )  # held for PID, not for this short-lived helper: not released on exit
        lock._stop.set()
        print(lock.holder.token)
    else:
        current = read_holder(lock_file(args.run_dir))
        if current is not None and current.token == args.token:
            lock_file(args.run_dir).unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    run_main("python -m rundir.run_lock", main)
