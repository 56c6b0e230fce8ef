"""Training curves for the eval report: each trained stage's logged history (`<run>/<stage>/summary.json`, written
by the trainer) drawn as inline SVG line charts, with axes, ticks, labels and a legend. Plain SVG: no script, no
font or file outside the page, so the report reads offline and in any browser.

    html = curves_section(run_dir)   # "" when no stage has a summary yet

Charts per stage (a chart is left out when the history has none of its values): loss (and, for SFT, the validation
loss on `data.eval`, `summary["validation"]`), learning rate, gradient norm; for DPO also the reward margin and the
reward accuracy (TRL's `rewards/margins` and `rewards/accuracies`, means over each logged step's pairs); for GRPO the
mean reward of the sampled completions, the share of groups whose rewards were all equal, the KL to the start (with
`grpo.beta > 0`), the clipped share of tokens, the completions' length and entropy, and a table of the last
generation's best and worst prompt groups with each completion and its reward.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from rundir.layout import TRAINED_STAGES, summary_file

WIDTH, HEIGHT = 360, 230
LEFT, RIGHT, TOP, BOTTOM = 62, 14, 28, 42  # margins around the plot area, in pixels
COLOURS = ("#1f5fbf", "#d4560b", "#2a8c3c", "#8e3fb5")
MARKERS_UP_TO = 40  # points per series drawn as dots when a series has at most this many


@dataclass(frozen=True)
class Series:
    label: str  # the legend's text
    key: str  # the history key (train/* in the trackers), or the validation record's key
    source: str = "history"  # "history" (summary["history"]) or "validation" (summary["validation"])


@dataclass(frozen=True)
class Chart:
    metric: str  # data-metric of the chart, stable for tests and scripts
    title: str
    y_label: str
    series: tuple[Series, ...]


CHARTS = {
    "sft": (
        Chart(
            "loss",
            "Loss per supervised token",
            "loss",
            (Series("train", "loss"), Series("validation", "loss", "validation")),
        ),
        Chart("lr", "Learning rate", "learning rate", (Series("lr", "lr"),)),
        Chart(
            "grad_norm", "Gradient norm (before clipping)", "grad norm", (Series("grad norm", "grad_norm"),)
        ),
    ),
    "dpo": (
        Chart("loss", "Loss per pair", "loss", (Series("train", "loss"),)),
        Chart(
            "rewards/margins",
            "Reward margin (chosen - rejected)",
            "reward margin",
            (Series("margin", "rewards/margins"),),
        ),
        Chart(
            "rewards/accuracies", "Reward accuracy", "accuracy", (Series("accuracy", "rewards/accuracies"),)
        ),
        Chart("lr", "Learning rate", "learning rate", (Series("lr", "lr"),)),
        Chart(
            "grad_norm", "Gradient norm (before clipping)", "grad norm", (Series("grad norm", "grad_norm"),)
        ),
    ),
    "grpo": (
        Chart("reward", "Mean reward of the sampled completions", "reward", (Series("reward", "reward"),)),
        Chart(
            "frac_reward_zero_std",
            "Groups with equal rewards (no signal)",
            "share",
            (Series("groups", "frac_reward_zero_std"),),
        ),
        Chart("kl", "KL to the starting policy (k3, per token)", "KL", (Series("kl", "kl"),)),
        Chart(
            "clip_ratio/region_mean",
            "Clipped tokens",
            "share",
            (Series("clipped", "clip_ratio/region_mean"),),
        ),
        Chart(
            "completions/mean_length",
            "Completion length",
            "tokens",
            (Series("length", "completions/mean_length"),),
        ),
        Chart("entropy", "Token entropy", "nats", (Series("entropy", "entropy"),)),
        Chart("loss", "Loss", "loss", (Series("train", "loss"),)),
    ),
}

STYLE = """
.curves { display: flex; flex-wrap: wrap; gap: 0.5em 1em; margin-bottom: 1em; }
.curves svg { background: #fff; border: 1px solid #ddd; }
.curves text { font-family: system-ui, sans-serif; fill: #333; }
"""


def read_summary(run_dir: Path, stage: str) -> Mapping | None:
    path = summary_file(run_dir, stage)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        return None


def points(summary: Mapping, series: Series) -> list[tuple[float, float]]:
    """(step, value) of a series, finite values only (a NaN grad norm or a diverged loss leaves a gap)."""
    rows = summary.get(series.source) or []
    out = []
    for row in rows:
        value, step = row.get(series.key), row.get("step")
        if isinstance(value, (int, float)) and isinstance(step, (int, float)) and math.isfinite(value):
            out.append((float(step), float(value)))
    return out


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """About `count` round tick values (1, 2 or 5 times a power of ten apart) covering [low, high]."""
    if not high > low:
        pad = abs(low) * 0.1 or 1.0
        low, high = low - pad, high + pad
    raw = (high - low) / count
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.floor(low / step) * step
    ticks = []
    value = first
    while value <= high + step * 1e-9:
        ticks.append(round(value, 12))
        value += step
    if ticks[-1] < high:
        ticks.append(round(value, 12))
    return ticks


def _label(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 1e4 or abs(value) < 1e-3:
        return f"{value:.1e}".replace("e-0", "e-").replace("e+0", "e")
    return f"{value:.4g}"


def chart_svg(stage: str, chart: Chart, data: Sequence[tuple[Series, list[tuple[float, float]]]]) -> str:
    """One line chart: plot area, y ticks with a grid, x ticks (steps), axis labels, title, series, legend."""
    xs = [x for _, pts in data for x, _ in pts]
    ys = [y for _, pts in data for _, y in pts]
    # x: from step 0 (or the first step, if negative) to the last step, ticks inside; y: round ticks around.
    x_low, x_high = min(0.0, *xs), max(xs)
    x_high = x_high if x_high > x_low else x_low + 1
    x_ticks = [x for x in nice_ticks(x_low, x_high) if x_low <= x <= x_high]
    y_ticks = nice_ticks(min(ys), max(ys))
    y_low, y_high = y_ticks[0], y_ticks[-1]
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def px(x: float) -> float:
        return LEFT + (x - x_low) / (x_high - x_low) * plot_w

    def py(y: float) -> float:
        return TOP + plot_h - (y - y_low) / (y_high - y_low) * plot_h

    name = f"{stage} {chart.title}"
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
        f'viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-label="{html.escape(name)}" '
        f'data-stage="{html.escape(stage)}" data-metric="{html.escape(chart.metric)}">',
        f"<title>{html.escape(name)}</title>",
        f'<text x="{LEFT + plot_w / 2:.1f}" y="16" text-anchor="middle" font-size="13" font-weight="600">'
        f"{html.escape(chart.title)}</text>",
    ]
    for y in y_ticks:
        parts.append(
            f'<line x1="{LEFT}" x2="{LEFT + plot_w}" y1="{py(y):.1f}" y2="{py(y):.1f}" stroke="#eee"/>'
            f'<text x="{LEFT - 5}" y="{py(y) + 3.5:.1f}" text-anchor="end" font-size="10">{_label(y)}</text>'
        )
    for x in x_ticks:
        parts.append(
            f'<line x1="{px(x):.1f}" x2="{px(x):.1f}" y1="{TOP + plot_h}" y2="{TOP + plot_h + 4}" '
            f'stroke="#555"/><text x="{px(x):.1f}" y="{TOP + plot_h + 15}" text-anchor="middle" '
            f'font-size="10">{_label(x)}</text>'
        )
    parts.append(
        f'<path d="M{LEFT},{TOP} V{TOP + plot_h} H{LEFT + plot_w}" fill="none" stroke="#555" class="axes"/>'
    )
    parts.append(
        f'<text x="{LEFT + plot_w / 2:.1f}" y="{HEIGHT - 6}" text-anchor="middle" font-size="11" '
        'class="x-label">step</text>'
    )
    parts.append(
        f'<text transform="translate(13 {TOP + plot_h / 2:.1f}) rotate(-90)" text-anchor="middle" '
        f'font-size="11" class="y-label">{html.escape(chart.y_label)}</text>'
    )
    for index, (series, pts) in enumerate(data):
        colour = COLOURS[index % len(COLOURS)]
        coords = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in pts)
        group = [f'<g data-series="{html.escape(series.label)}" data-points="{len(pts)}">']
        if len(pts) > 1:
            group.append(f'<polyline points="{coords}" fill="none" stroke="{colour}" stroke-width="1.6"/>')
        if len(pts) <= MARKERS_UP_TO:
            group += [
                f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="2.6" fill="{colour}">'
                f"<title>{html.escape(series.label)} at step {_label(x)}: {y:.4g}</title></circle>"
                for x, y in pts
            ]
        group.append("</g>")
        parts += group
    if len(data) > 1:  # legend, top right inside the plot
        for index, (series, _) in enumerate(data):
            colour = COLOURS[index % len(COLOURS)]
            y = TOP + 10 + 14 * index
            x = LEFT + plot_w - 92
            parts.append(
                f'<line x1="{x}" x2="{x + 16}" y1="{y}" y2="{y}" stroke="{colour}" stroke-width="2"/>'
                f'<text x="{x + 20}" y="{y + 3.5}" font-size="10">{html.escape(series.label)}</text>'
            )
    parts.append("</svg>")
    return "".join(parts)


def stage_curves(stage: str, summary: Mapping) -> str:
    charts = []
    for chart in CHARTS.get(stage, ()):
        data = [(series, pts) for series in chart.series if (pts := points(summary, series))]
        if data:
            charts.append(chart_svg(stage, chart, data))
    if not charts:
        return ""
    steps = summary.get("steps")
    note = f" ({steps} optimizer steps)" if isinstance(steps, int) else ""
    return (
        f'<h3>{html.escape(stage)}{note}</h3><div class="curves" data-stage="{html.escape(stage)}">'
        + "".join(charts)
        + "</div>"
        + samples_table(summary.get("sampled_groups") or ())
    )


def samples_table(groups: Sequence[Mapping]) -> str:
    """GRPO's sampled completions of its last generation with their rewards, best and worst prompt groups first
    (`summary["sampled_groups"]`, written by train/grpo.py); "" for a stage without them."""
    if not groups:
        return ""
    rows = []
    for group in groups:
        completions = "<br>".join(
            f"{html.escape(repr(c['text']))} &rarr; {c['reward']:.3g}" for c in group["completions"]
        )
        rows.append(
            f"<tr><td>{html.escape(group['prompt'])}</td><td>{html.escape(', '.join(group['references']))}"
            f'</td><td class="num">{group["mean_reward"]:.3g}</td><td>{completions}</td></tr>'
        )
    return (
        '<table class="samples"><tr><th>prompt (last generation)</th><th>reference</th><th>mean reward</th>'
        "<th>completions &rarr; reward</th></tr>" + "".join(rows) + "</table>"
    )


def curves_section(run_dir: str | Path) -> str:
    """The report's "Training curves" section, one block of charts per trained stage; "" when none has a summary."""
    blocks = [
        stage_curves(stage, summary)
        for stage in TRAINED_STAGES
        if (summary := read_summary(Path(run_dir), stage)) is not None
    ]
    blocks = [block for block in blocks if block]
    if not blocks:
        return ""
    return (
        '<section id="training-curves"><h2>Training curves</h2>'
        "<p>From each stage's <code>summary.json</code>: every logged step (<code>train.log_every</code>), each "
        "stage on its own optimizer steps.</p>" + "".join(blocks) + "</section>"
    )
