"""Durable writes inside a run directory: a file or a folder is written beside its place and renamed into it, so a
crash leaves the old version or the new one, never half of either."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

# ----------------------------------------------------------------------------------------------- atomic writes


def write_file_atomically(path: Path, write: Callable[[Path], object]) -> Path:
    """`write(tmp)` fills a temporary sibling file, which then replaces `path` in one rename: readers see the old
    file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".tmp-{path.name}")
    write(staging)
    os.replace(staging, path)
    return path


def write_text_atomically(path: Path, text: str) -> Path:
    return write_file_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json_atomically(path: Path, value) -> Path:
    return write_text_atomically(path, json.dumps(value, indent=1) + "\n")


def replace_dir_atomically(folder: Path, write: Callable[[Path], object]) -> Path:
    """`write(tmp)` fills a temporary sibling folder, which then replaces `folder` in one rename."""
    folder = Path(folder)
    tmp = folder.with_name(f".tmp-{folder.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    return folder
