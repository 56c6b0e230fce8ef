"""User errors at the command line: the message alone and exit code 2; the traceback only on request.

Every entry point (`train/sft.py`, `train/dpo.py`, `python -m eval`, `python -m train.export`,
`python -m data.inspect`, `python -m train.dry_run`, `python -m train.tools.launch_plan`, `python -m eval.summary`) runs its
`main` through `run_main`:

    if __name__ == "__main__":
        run_main("python -m eval", main)            # main(argv) -> exit code (int) or anything (exit 0)

A user error is what the user can fix from the message: a recipe problem (`RecipeError`), a bad row or file
(`data.sample.DataError`), any other `ValueError` raised by validation, and `OSError` (a missing or existing path, a
permission, a full disk, a hub id that is not cached while offline). It is printed as `<prog>: error: <message>` on
stderr, with exit code 2. `--debug` on the command line, or `PHI3V_DEBUG=1` in the environment, re-raises it instead
(the full traceback). Anything else (a bug) keeps its traceback. Values of keys named like credentials (`hf_token:`,
`api_key=`) are replaced by `<redacted>` in the message, whatever raised it.
"""

from __future__ import annotations

import errno
import os
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError)
"""RecipeError and DataError are ValueErrors; FileNotFoundError, FileExistsError, PermissionError, ConnectionError
and a full disk are OSErrors."""
EXIT_USER_ERROR = 2
DEBUG_FLAG = "--debug"
DEBUG_ENV = "PHI3V_DEBUG"
REDACTED = "<redacted>"
# Key names that hold credentials (hf_token, wandb_api_key, ...); `max_new_tokens` is not one of them.
SECRET_KEY = re.compile(r"(^|_)(token|api_key|apikey|secret|password|passwd)(_|$)", re.IGNORECASE)
URL_CREDENTIALS = re.compile(r"(?<=://)[^/@\s]+@")
# `hf_token: abc`, `x.api_key = 'abc'`, `'password': 'abc'`: a key, then its value; redacted when the key is a
# SECRET_KEY.
_KEY_VALUE = re.compile(r"""(?P<key>\b\w+)(?P<sep>['"]?\s*[:=]\s*)(?P<value>'[^']*'|"[^"]*"|[^\s,}\]]+)""")


def debug_requested(argv: Sequence[str] = ()) -> bool:
    return DEBUG_FLAG in argv or os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def redact_message(text: str) -> str:
    """`text` with the value after every credential-named key, and the user:password of URLs, replaced."""
    text = _KEY_VALUE.sub(
        lambda m: (
            m.group("key") + m.group("sep") + REDACTED if SECRET_KEY.search(m.group("key")) else m.group(0)
        ),
        text,
    )
    return URL_CREDENTIALS.sub(f"{REDACTED}@", text)


def redact_secrets(value: Any) -> Any:
    """A copy of plain data with credential-named keys (token, api_key, secret, password) and URL passwords hidden."""
    if isinstance(value, dict):
        return {
            key: REDACTED if SECRET_KEY.search(str(key)) and item is not None else redact_secrets(item)
            for key, item in value.items()
        }
    if isinstance(value, list):
        return [redact_secrets(item) for item in value]
    return URL_CREDENTIALS.sub(f"{REDACTED}@", value) if isinstance(value, str) else value


def message_of(error: BaseException) -> str:
    """The one message a user sees for `error` (credentials redacted)."""
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        where = f" writing {error.filename}" if error.filename else ""
        text = f"no space left on device{where}: free disk space or set output_dir on another disk"
    elif isinstance(error, KeyError):
        text = f"missing key {error}"
    else:
        text = str(error) or type(error).__name__
    if (
        type(error).__name__ == "RecipeError"
    ):  # redacted where each problem is written (config/checks.py `issue`)
        return text
    return redact_message(text)


@contextmanager
def user_errors(prog: str, *, debug: bool = False) -> Iterator[None]:
    """Turn a user error raised inside into `<prog>: error: <message>` on stderr and SystemExit(2)."""
    try:
        yield
    except USER_ERRORS as error:
        if debug:
            raise
        print(f"{prog}: error: {message_of(error)}", file=sys.stderr)
        raise SystemExit(EXIT_USER_ERROR) from None


def run_main(prog: str, main: Callable[[list[str]], object], argv: Sequence[str] | None = None) -> None:
    """Run `main(argv)` (argv without `--debug`) under `user_errors`; exit with its int result, else 0."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debug_requested(argv)
    argv = [arg for arg in argv if arg != DEBUG_FLAG]
    with user_errors(prog, debug=debug):
        result = main(argv)
    raise SystemExit(result if isinstance(result, int) and not isinstance(result, bool) else 0)
