"""Why a path is not a readable regular file, in words: the one answer the image loader and the data sources give
for filesystem oddities, instead of whatever `os.stat`, `Path.resolve` or `open` happened to raise.

    path_problem(Path("img/a.png"))    # None: a regular file we may read
    path_problem(Path("loop.png"))     # "is a loop of symbolic links"

Each answer completes "<path> ...". The classes: missing (or a dangling symbolic link), a loop of symbolic links, a
folder or a part of the path that is no folder, a socket, a named pipe or a device (never opened: reading a pipe or a
terminal blocks), permission denied (on the file or on a folder above it), a name that is not valid text (a NUL or a
lone surrogate such as '\\ud800', which no filesystem name can hold), a name too long. A path that changes while a
run reads it (deleted, replaced by a folder or a link loop) gets the same answers when it is read again.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

_KINDS = (
    (stat.S_ISDIR, "is a folder, not a regular file"),
    (stat.S_ISSOCK, "is a socket, not a regular file"),
    (stat.S_ISFIFO, "is a named pipe (FIFO), not a regular file"),
    (stat.S_ISCHR, "is a character device, not a regular file"),
    (stat.S_ISBLK, "is a block device, not a regular file"),
)


def os_error_problem(error: OSError) -> str:
    """What an OSError from stat/open/resolve means for the path, in words."""
    if error.errno == errno.ENOENT:
        return "does not exist"
    if error.errno == errno.ELOOP:
        return "is a loop of symbolic links"
    if error.errno == errno.EACCES or isinstance(error, PermissionError):
        return "cannot be read: permission denied (on the file or on a folder above it)"
    if error.errno == errno.ENOTDIR:
        return "cannot exist: a part of it is a file, not a folder"
    if error.errno == errno.EISDIR:
        return "is a folder, not a regular file"
    if error.errno == errno.ENAMETOOLONG:
        return "is a name too long for the filesystem"
    return f"cannot be read ({error.strerror or error})"


def text_problem(path: object) -> str | None:
    """Why `path` cannot be a filesystem name at all (a NUL, a character the filesystem encoding cannot hold)."""
    text = os.fspath(path) if isinstance(path, os.PathLike) else path
    if isinstance(text, str) and "\x00" in text:
        return "is not a valid file name: it holds a NUL character"
    try:
        os.fsencode(text)
    except (UnicodeEncodeError, TypeError) as error:
        return f"is not a valid file name: it is not valid text ({error})"
    return None


def path_problem(path: Path) -> str | None:
    """None when `path` is a regular file this process may read; else why not (a phrase after the path)."""
    invalid = text_problem(path)
    if invalid is not None:
        return invalid
    try:
        status = os.stat(path)
    except FileNotFoundError:
        return "is a symbolic link to nothing" if os.path.islink(path) else "does not exist"
    except OSError as error:
        return os_error_problem(error)
    for is_kind, problem in _KINDS:
        if is_kind(status.st_mode):
            return problem
    if not stat.S_ISREG(status.st_mode):
        return "is not a regular file"
    if not os.access(path, os.R_OK):
        return "cannot be read: permission denied"
    return None


def resolved(path: Path) -> tuple[Path | None, str | None]:
    """(the path with symbolic links and `..` resolved, None), or (None, why it cannot be resolved): a loop of links
    raises RuntimeError in Python 3.11-3.12 and OSError later, a NUL ValueError."""
    invalid = text_problem(path)
    if invalid is not None:
        return None, invalid
    try:
        return Path(path).resolve(), None
    except RuntimeError:
        return None, "is a loop of symbolic links"
    except OSError as error:
        return None, os_error_problem(error)
    except ValueError as error:
        return None, f"is not a valid file name ({error})"
