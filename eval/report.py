"""The eval report: one self-contained HTML page (no external files, scripts or fonts) from a run's eval folder.

    path = write_report(run_dir)    # run_dir/eval/report.html

It reads what `eval.hook` writes under `run_dir/eval/`:

    results.json                          {task: {metric: {stage: value}}}
    predictions/<stage>/<task>.jsonl      {"id", "question", "references", "prediction", "score"} per example
    thumbnails/<task>/<key>.png           the first image of an example the report shows (`thumbnail_path`)

and each trained stage's `summary.json` (`eval.curves`: its training curves as inline SVG, first), and shows, per
task, a table of its metrics with columns base / sft / dpo (blank where a stage was not scored) and
the deltas between stages, then for each pair of consecutive scored stages the examples whose per-example score
fell most (worst regressions) and rose most (best gains), with the image, the question, both predictions and the
references. Every text is escaped with html.escape; images are embedded as base64 PNG.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from eval.curves import STYLE as CURVES_STYLE
from eval.curves import curves_section
from rundir.atomic import write_file_atomically, write_text_atomically
from rundir.layout import eval_dir, predictions_file, report_file, results_file

STAGES = ("base", "sft", "dpo", "grpo")
DELTAS = (("sft", "base"), ("dpo", "sft"), ("dpo", "base"), ("grpo", "sft"), ("grpo", "base"))
EXAMPLES_PER_LIST = 5
THUMBNAIL_SIDE = 160
"""The longest side of a thumbnail, in pixels."""

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: left; vertical-align: top; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.up { color: #176f2c; } .down { color: #b3261e; }
pre { white-space: pre-wrap; margin: 0; max-width: 40em; }
"""


def predictions_path(run_dir: str | Path, stage: str, task: str) -> Path:
    return predictions_file(Path(run_dir), stage, task)


def thumbnail_path(run_dir: str | Path, task: str, example_id: str) -> Path:
    """Where an example's thumbnail lives; ids are hashed, since a dataset id may hold any character."""
    key = hashlib.sha256(example_id.encode("utf-8")).hexdigest()[:20]
    return eval_dir(run_dir) / "thumbnails" / task / f"{key}.png"


def save_thumbnail(image: Image.Image, path: Path) -> None:
    """A PNG of at most THUMBNAIL_SIDE pixels a side, written atomically."""
    thumbnail = image.convert("RGB")
    thumbnail.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
    write_file_atomically(path, lambda tmp: thumbnail.save(tmp, format="PNG"))


def read_predictions(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    with path.open(encoding="utf-8") as file:
        return [json.loads(line) for line in file if line.strip()]


# ------------------------------------------------------------------------------------------------ changes


@dataclass(frozen=True, kw_only=True)
class Change:
    """One example scored in two stages."""

    id: str
    before: Mapping[str, Any]
    after: Mapping[str, Any]

    @property
    def delta(self) -> float:
        return self.after["score"] - self.before["score"]


def biggest_changes(
    before: Sequence[Mapping[str, Any]], after: Sequence[Mapping[str, Any]], *, count: int = EXAMPLES_PER_LIST
) -> tuple[list[Change], list[Change]]:
    """(worst regressions, best gains): up to `count` examples of both stages whose score fell, resp. rose, most.
    Ties keep the order of `after` (the dataset's row order), so the selection is the same on every call."""
    earlier = {row["id"]: row for row in before}
    changes = [
        Change(id=row["id"], before=earlier[row["id"]], after=row) for row in after if row["id"] in earlier
    ]
    regressions = sorted((c for c in changes if c.delta < 0), key=lambda c: c.delta)
    gains = sorted((c for c in changes if c.delta > 0), key=lambda c: -c.delta)
    return regressions[:count], gains[:count]


def stage_pairs(stages: Collection[str]) -> list[tuple[str, str]]:
    """Consecutive pairs, in base < sft < dpo order, of the stages given."""
    present = [stage for stage in STAGES if stage in stages]
    return list(zip(present, present[1:]))


# ------------------------------------------------------------------------------------------------ HTML pieces


def _number(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


def _delta(value: float | None) -> str:
    if value is None:
        return '<td class="num"></td>'
    direction = "up" if value > 0 else "down" if value < 0 else ""
    return f'<td class="num {direction}">{value:+.4f}</td>'


def metrics_table(task: str, by_metric: Mapping[str, Mapping[str, float]]) -> str:
    head = "".join(f"<th>{stage}</th>" for stage in STAGES)
    head += "".join(f"<th>&Delta; {later} &minus; {earlier}</th>" for later, earlier in DELTAS)
    rows = []
    for metric, by_stage in by_metric.items():
        cells = "".join(f'<td class="num">{_number(by_stage.get(stage))}</td>' for stage in STAGES)
        for later, earlier in DELTAS:
            both = later in by_stage and earlier in by_stage
            cells += _delta(by_stage[later] - by_stage[earlier] if both else None)
        rows.append(f"<tr><td>{html.escape(metric)}</td>{cells}</tr>")
    return (
        f'<table class="metrics" data-task="{html.escape(task)}"><tr><th>metric</th>{head}</tr>'
        + "".join(rows)
        + "</table>"
    )


def _image_cell(run_dir: Path, task: str, example_id: str) -> str:
    path = thumbnail_path(run_dir, task, example_id)
    if not path.is_file():
        return "<td>(no image)</td>"
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<td><img src="data:image/png;base64,{data}" alt="example {html.escape(example_id)}"></td>'


def _text_cell(text: str) -> str:
    return f"<td><pre>{html.escape(text)}</pre></td>"


def changes_table(
    run_dir: Path, task: str, title: str, changes: Sequence[Change], earlier: str, later: str
) -> str:
    if not changes:
        return f"<h4>{html.escape(title)}</h4><p>none</p>"
    head = (
        f"<tr><th>image</th><th>question</th><th>{earlier} prediction</th><th>{later} prediction</th>"
        f"<th>references</th><th>score {earlier} &rarr; {later}</th></tr>"
    )
    rows = []
    for change in changes:
        references = "\n".join(change.after.get("references", []))
        rows.append(
            f'<tr data-id="{html.escape(change.id)}">{_image_cell(run_dir, task, change.id)}'
            f"{_text_cell(change.after.get('question', ''))}{_text_cell(change.before['prediction'])}"
            f"{_text_cell(change.after['prediction'])}{_text_cell(references)}"
            f'<td class="num">{change.before["score"]:.3f} &rarr; {change.after["score"]:.3f}</td></tr>'
        )
    return f'<h4>{html.escape(title)}</h4><table class="examples">{head}{"".join(rows)}</table>'


def task_section(run_dir: Path, task: str, by_metric: Mapping[str, Mapping[str, float]]) -> str:
    parts = [f"<h2>{html.escape(task)}</h2>", metrics_table(task, by_metric)]
    scored = {stage for by_stage in by_metric.values() for stage in by_stage}
    for earlier, later in stage_pairs(scored):
        before = read_predictions(predictions_path(run_dir, earlier, task))
        after = read_predictions(predictions_path(run_dir, later, task))
        regressions, gains = biggest_changes(before, after)
        parts.append(f"<h3>{earlier} &rarr; {later}</h3>")
        parts.append(
            changes_table(
                run_dir, task, f"Worst regressions ({later} vs {earlier})", regressions, earlier, later
            )
        )
        parts.append(
            changes_table(run_dir, task, f"Best gains ({later} vs {earlier})", gains, earlier, later)
        )
    return "\n".join(parts)


def render_report(run_dir: str | Path) -> str:
    run_dir = Path(run_dir)
    path = results_file(run_dir)
    results = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    sections = [task_section(run_dir, task, by_metric) for task, by_metric in sorted(results.items())]
    title = f"Eval report: {html.escape(run_dir.name)}"
    body = "\n".join(sections) if sections else "<p>No task has been scored yet.</p>"
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
        f"<style>{STYLE}{CURVES_STYLE}</style></head><body><h1>{title}</h1>\n"
        f"{curves_section(run_dir)}\n"
        "<p>Scores are fractions in [0, 1]. A delta is the later stage's score minus the earlier one's.</p>\n"
        f"{body}\n</body></html>\n"
    )


def write_report(run_dir: str | Path) -> Path:
    """Render run_dir/eval/report.html (atomically) and return its path."""
    return write_text_atomically(report_file(Path(run_dir)), render_report(run_dir))
