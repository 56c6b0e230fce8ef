"""The end of a run in a few lines: the score table (base / SFT / DPO), each stage's skipped rows, and where the
report, the adapters and the exports are. Printed by each training stage when it ends and by `launch.sh` at its end.

    python -m eval.summary RUN_DIR
    print(run_summary(run_dir))
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from eval.report import STAGES
from rundir.layout import (
    TRAINED_STAGES,
    adapter_dir,
    is_adapter,
    is_checkpoint,
    merged_dir,
    report_file,
    results_file,
    summary_file,
)
from runtime.user_errors import run_main


def results_table(run_dir: Path, tasks: Sequence[str] | None = None) -> str:
    """One row per task and metric, one column per stage (blank where not scored); every scored task by default."""
    results = json.loads(results_file(run_dir).read_text(encoding="utf-8"))
    header = ["task", "metric", *STAGES]
    rows = [
        [task, metric, *(f"{by_stage[s]:.4f}" if s in by_stage else "" for s in STAGES)]
        for task in (sorted(results) if tasks is None else tasks)
        for metric, by_stage in results.get(task, {}).items()
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in [header, *rows]
    )


def run_summary(run_dir: str | Path) -> str:
    """The score table, the skip counts per stage (and per reason), and the paths of the report and the weights."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: no such run directory")
    lines = [f"run {run_dir}"]
    if results_file(run_dir).is_file():
        lines += ["scores:", *("  " + row for row in results_table(run_dir).splitlines())]
    else:
        lines.append("scores: none yet (no eval stage has run)")
    for stage in TRAINED_STAGES:
        path = summary_file(run_dir, stage)
        if not path.is_file():
            continue
        by_dataset = json.loads(path.read_text(encoding="utf-8")).get("skipped_rows", {})
        total = sum(sum(reasons.values()) for reasons in by_dataset.values())
        detail = "; ".join(
            f"{dataset}: " + ", ".join(f"{reason} {n}" for reason, n in reasons.items())
            for dataset, reasons in by_dataset.items()
        )
        lines.append(f"{stage}: {total} rows skipped" + (f" ({detail})" if detail else ""))
    report = report_file(run_dir)
    if report.is_file():
        lines.append(f"report: {report}")
    for stage in TRAINED_STAGES:
        if is_adapter(adapter_dir(run_dir, stage)):
            lines.append(f"{stage} adapter: {adapter_dir(run_dir, stage)}")
        if is_checkpoint(merged_dir(run_dir, stage)):
            lines.append(f"{stage} merged: {merged_dir(run_dir, stage)}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    print(run_summary(argv[0]))
    return 0


if __name__ == "__main__":
    run_main("python -m eval.summary", main)
