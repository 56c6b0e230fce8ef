"""Manifests: the record of what a folder's files are (each file's relative path, size and sha256), written after
them, checked before any of them is trusted.

A checkpoint, a stage's adapter and a merged model each hold one (the file name is `rundir.layout.MANIFEST`; the
run directory's module writes and verifies them through `write_manifest` and `verify_manifest` here). A tensor file
cut short by a disk that lied or a copy that stopped, a file deleted or replaced, shows as a size or hash that differs
from the record, named in a `ManifestError` (a ValueError: the message alone, exit 2, runtime/user_errors.py).

    write_manifest(folder, path)                           # after every other file is written
    verify_manifest(folder, path)                          # raises ManifestError naming the first bad file
    verify_manifest(folder, path, closed=("deepspeed",))   # and refuses files there that it does not list

A folder whose files are loaded by unpickling (DeepSpeed's and FSDP's checkpoint folders) is `closed`: a file in it
that the manifest does not list is refused too, so what is unpickled is byte for byte what this project wrote.
Hashing reads every byte once: about a second per GB on a local disk.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

FORMAT = 1
_SHA256 = re.compile(r"[0-9a-f]{64}")
_BLOCK = 1 << 20


class ManifestError(ValueError):
    """A folder's files are not the ones its manifest records, or it has no readable manifest."""


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def _files(folder: Path, *, regular_only: bool = True) -> list[str]:
    """Every regular file under `folder` (with `regular_only=False`: every entry that is not a folder, symbolic
    links included, which are never followed), as sorted POSIX paths relative to it."""
    found = []
    for root, dirs, names in os.walk(folder):
        names += [
            d for d in dirs if (Path(root) / d).is_symlink()
        ]  # os.walk lists a link to a folder as a folder
        for name in names:
            path = Path(root) / name
            if not regular_only or stat.S_ISREG(path.lstat().st_mode):
                found.append(path.relative_to(folder).as_posix())
    return sorted(found)


def build_manifest(folder: Path, exclude: Sequence[str] = (), suffixes: tuple[str, ...] = ("",)) -> dict:
    """{"format": 1, "files": {relative path: {"size": bytes, "sha256": hex}}} of every file under `folder` whose
    name ends with one of `suffixes` (all files by default)."""
    folder = Path(folder)
    files = {
        rel: {"size": (folder / rel).stat().st_size, "sha256": file_sha256(folder / rel)}
        for rel in _files(folder)
        if rel not in exclude and rel.endswith(suffixes)
    }
    return {"format": FORMAT, "files": files}


def write_manifest(folder: Path, manifest_path: Path, suffixes: tuple[str, ...] = ("",)) -> Path:
    """Record every file under `folder` (but the manifest; only names ending with one of `suffixes`) in
    `manifest_path`, written in one rename."""
    folder, manifest_path = Path(folder), Path(manifest_path)
    staging = manifest_path.with_name(f".tmp-{manifest_path.name}")
    exclude = [p.relative_to(folder).as_posix() for p in (manifest_path, staging) if p.is_relative_to(folder)]
    record = build_manifest(folder, exclude, suffixes)
    staging.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    os.replace(staging, manifest_path)
    return manifest_path


def read_manifest(manifest_path: Path) -> dict[str, dict]:
    """The manifest's {relative path: {"size", "sha256"}}; ManifestError for anything that is not a manifest this
    project writes (unreadable, not JSON, other format, a path that leaves the folder, a size or hash of another
    form)."""
    manifest_path = Path(manifest_path)
    try:
        text = manifest_path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ManifestError(f"{manifest_path} is missing") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ManifestError(f"{manifest_path} cannot be read ({error})") from None
    try:
        record = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as error:
        raise ManifestError(
            f"{manifest_path} is not valid JSON ({error}): it was cut short or changed"
        ) from None
    if (
        not isinstance(record, dict)
        or record.get("format") != FORMAT
        or not isinstance(record.get("files"), dict)
    ):
        raise ManifestError(
            f"{manifest_path} is not a manifest of format {FORMAT} (a mapping with 'format' and 'files')"
        )
    files = record["files"]
    for rel, entry in files.items():
        parts = PurePosixPath(rel).parts
        if not rel or PurePosixPath(rel).is_absolute() or ".." in parts or "\\" in rel or "\x00" in rel:
            raise ManifestError(f"{manifest_path} lists {rel!r}, which is not a path inside its folder")
        size, digest = (entry.get("size"), entry.get("sha256")) if isinstance(entry, dict) else (None, None)
        if (
            isinstance(size, bool)
            or not isinstance(size, int)
            or size < 0
            or not isinstance(digest, str)
            or not _SHA256.fullmatch(digest)
        ):
            raise ManifestError(f"{manifest_path}: the entry of {rel!r} is not a size in bytes and a sha256")
    return files


def verify_manifest(folder: Path, manifest_path: Path, closed: Sequence[str] = ()) -> dict[str, dict]:
    """Check every file the manifest lists: present, a regular file, of its size and sha256; and that the `closed`
    sub-folders hold no other file. Returns the manifest's files; raises ManifestError naming the first bad file
    and why."""
    folder = Path(folder)
    files = read_manifest(manifest_path)
    for rel, entry in sorted(files.items()):
        path = folder / rel
        try:
            status = path.lstat()
        except FileNotFoundError:
            raise ManifestError(f"{rel} is missing from {folder}") from None
        except OSError as error:
            raise ManifestError(f"{rel} in {folder} cannot be read ({error.strerror or error})") from None
        if not stat.S_ISREG(status.st_mode):
            raise ManifestError(f"{rel} in {folder} is no longer a regular file")
        if status.st_size != entry["size"]:
            raise ManifestError(
                f"{rel} in {folder} is {status.st_size} bytes, not the {entry['size']} bytes it was "
                f"written with: it was {'cut short' if status.st_size < entry['size'] else 'changed'}"
            )
        try:
            digest = file_sha256(path)
        except OSError as error:
            raise ManifestError(f"{rel} in {folder} cannot be read ({error.strerror or error})") from None
        if digest != entry["sha256"]:
            raise ManifestError(f"{rel} in {folder} has changed since it was written (its sha256 differs)")
    for sub in closed:
        if (folder / sub).is_dir():
            extra = [
                f"{sub}/{rel}"
                for rel in _files(folder / sub, regular_only=False)
                if f"{sub}/{rel}" not in files
            ]
            if extra:
                raise ManifestError(
                    f"{extra[0]} in {folder} is not a file this run wrote (its manifest does not list "
                    "it); files there are unpickled, so none is loaded"
                )
    return files
