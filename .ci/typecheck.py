"""The type check of CI: mypy over the packages, held to a per-file baseline that may only shrink.

    python .ci/typecheck.py            # fails when a file has more errors than .ci/mypy-baseline.json allows
    python .ci/typecheck.py --update   # after fixing errors: write the smaller counts (never larger ones; the first
                                       # run, with no baseline yet, writes today's counts)

Why mypy: it reads the annotations the code already has with no extra runtime, and its per-file error counts make a
baseline that survives edits elsewhere in a file (a list of error lines would not). Why a baseline: the code base
predates the check; every new or touched file can only get better.
"""

from __future__ import annotations

import collections
import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BASELINE = ROOT / ".ci" / "mypy-baseline.json"
PACKAGES = ["runtime", "models", "config", "rundir", "data", "eval", "train"]
ERROR = re.compile(r"^(?P<file>[^:]+\.py):\d+: error:")


def counts() -> collections.Counter:
    result = subprocess.run(
        [sys.executable, "-m", "mypy", *PACKAGES], cwd=ROOT, capture_output=True, text=True
    )
    if result.returncode not in (0, 1):  # 2: mypy itself failed
        sys.exit(f"mypy failed:\n{result.stdout}\n{result.stderr}")
    found = collections.Counter()
    for line in result.stdout.splitlines():
        match = ERROR.match(line)
        if match:
            found[match["file"]] += 1
    return found


def main(argv: list[str]) -> int:
    found = counts()
    allowed = json.loads(BASELINE.read_text()) if BASELINE.exists() else {}
    worse = {f: (n, allowed.get(f, 0)) for f, n in found.items() if n > allowed.get(f, 0)}
    if "--update" in argv:
        if worse and BASELINE.exists():
            print("not updating: these files have more errors than the baseline allows:", worse)
            return 1
        BASELINE.write_text(json.dumps(dict(sorted(found.items())), indent=1) + "\n")
        print(f"baseline written: {sum(found.values())} errors in {len(found)} files")
        return 0
    if worse:
        for file, (now, before) in sorted(worse.items()):
            print(f"{file}: {now} mypy errors, the baseline allows {before}")
        print("fix them (python -m mypy " + " ".join(PACKAGES) + " lists each), or keep the new code typed")
        return 1
    better = sum(allowed.values()) - sum(found.values())
    print(
        f"type check: {sum(found.values())} errors, within the baseline"
        + (f" ({better} fewer: run python .ci/typecheck.py --update)" if better > 0 else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
