"""Resumable checkpoints: accelerate's full state (model, optimizer, scheduler, RNGs) plus the loop state, written
atomically (a temporary directory renamed into place once complete) and rotated."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

log = logging.getLogger(__name__)

PREFIX = "step-"
STATE_FILE = "loop_state.json"


class Checkpointer:
    def __init__(self, accelerator, directory: Path, keep: int):
        self.accelerator = accelerator
        self.directory = Path(directory)
        self.keep = keep

    def save(self, state) -> Path:
        final = self.directory / f"{PREFIX}{state.step:08d}"
        staging = self.directory / f".tmp-{PREFIX}{state.step:08d}"
        if self.accelerator.is_main_process:
            self.directory.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(staging, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        self.accelerator.save_state(str(staging))  # every rank writes its shard (DeepSpeed, FSDP)
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            state.save(staging / STATE_FILE)
            if final.exists():  # the same step saved before a restart: replace it whole
                shutil.rmtree(final)
            os.replace(staging, final)
            self.rotate()
        self.accelerator.wait_for_everyone()
        return final

    def rotate(self) -> None:
        for old in checkpoints(self.directory)[: -self.keep]:
            shutil.rmtree(old)
            log.info("removed old checkpoint %s", old)

    def restore(self, state_cls):
        """Load the newest complete checkpoint into the prepared objects; returns its loop state, or None."""
        found = checkpoints(self.directory)
        if not found:
            return None
        latest = found[-1]
        self.accelerator.load_state(str(latest))
        log.info("resumed from %s", latest)
        return state_cls.load(latest / STATE_FILE)


def checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a `.tmp-` directory is an interrupted save and is ignored)."""
    if not Path(directory).is_dir():
        return []
    return sorted(p for p in Path(directory).iterdir() if p.name.startswith(PREFIX) and (p / STATE_FILE).exists())
