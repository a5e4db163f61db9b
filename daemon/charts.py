"""The operator charts: which numbers are drawn against what, and an inline SVG line chart of them.

Owns the chart list shared by the web view (`horse-ledger serve`, SVG drawn here, no JavaScript) and
`horse-ledger snapshots --plot FILE.png` (daemon/plots.py, matplotlib). Each chart is one number of
`ledger.queries.snapshot_series` drawn against the snapshot id and against the edits the model carries.

    rows = snapshot_series(store, "smollm2-135m")
    for chart in charts(rows):                    # skips NS / perplexity when no night measured them
        svg = line_svg(chart.points("snapshot"), title=chart.title, x_label="snapshot")

Everything in the SVG that is text goes through `html.escape`; colours are presentation attributes (the web
view's Content-Security-Policy forbids inline styles).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from html import escape
from typing import Any, Sequence

X_AXES = {"snapshot": ("id", "snapshot id"), "edits": ("accumulated_edits", "edits carried")}


@dataclass(frozen=True)
class ChartSpec:
    key: str  # a key of ledger.queries.SERIES_PATHS
    title: str
    unit: str
    optional: bool = False  # drawn only when some snapshot has the number


CHART_SPECS = (
    ChartSpec("canary_agreement", "Canary agreement", "share of canary prompts whose next token is unchanged"),
    ChartSpec("retention", "Retention", "share of earlier edits that still hold"),
    ChartSpec("ns", "Neighbourhood score (NS)", "share of neighbour prompts left alone", optional=True),
    ChartSpec("perplexity", "Perplexity", "on local text, relative to the base", optional=True),
    ChartSpec("delta_norm_max", "Delta norm", "largest per-layer Frobenius norm of the cumulative delta"),
)


@dataclass(frozen=True)
class Chart:
    spec: ChartSpec
    rows: tuple[dict[str, Any], ...]

    @property
    def key(self) -> str:
        return self.spec.key

    @property
    def title(self) -> str:
        return self.spec.title

    def points(self, x_axis: str = "snapshot") -> list[tuple[float, float]]:
        """(x, y) of every snapshot that has the number, x = snapshot id or the edits it carries."""
        x_key = X_AXES[x_axis][0]
        return [(float(r[x_key]), float(r[self.key])) for r in self.rows
                if r.get(self.key) is not None and math.isfinite(r[self.key])]

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "title": self.title, "unit": self.spec.unit,
                "points": [{"snapshot_id": r["id"], "accumulated_edits": r["accumulated_edits"], "value": r[self.key]}
                           for r in self.rows if r.get(self.key) is not None]}


def charts(rows: Sequence[dict[str, Any]]) -> list[Chart]:
    """The charts to draw for these snapshot rows (published and rolled back alike), in CHART_SPECS order."""
    out = []
    for spec in CHART_SPECS:
        if spec.optional and not any(r.get(spec.key) is not None for r in rows):
            continue
        out.append(Chart(spec, tuple(rows)))
    return out


def _ticks(lo: float, hi: float, n: int = 4, *, integer: bool = False) -> list[float]:
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / n
    step = max(10 ** math.floor(math.log10(raw)), 1.0 if integer else 0.0)
    step *= next(m for m in (1, 2, 5, 10) if m * step >= raw)
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def _fmt(v: float) -> str:
    return f"{v:.4g}"


def line_svg(points: Sequence[tuple[float, float]], *, title: str, x_label: str, width: int = 420,
             height: int = 220) -> str:
    """An SVG line chart (a string of markup, every text escaped) of `points`, joined in the order given.

    An empty `points` draws the frame and "no measurements yet".
    """
    left, right, top, bottom = 52, 12, 26, 38
    pw, ph = width - left - right, height - top - bottom
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" role="img" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}"><title>{escape(title)}</title>',
             f'<text x="{left}" y="16" font-size="13" font-weight="bold" fill="#222">{escape(title)}</text>',
             f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#999"/>',
             f'<text x="{left + pw / 2:.1f}" y="{height - 6}" font-size="11" text-anchor="middle" '
             f'fill="#444">{escape(x_label)}</text>']
    pts = list(points)
    if not pts:
        parts.append(f'<text x="{left + pw / 2:.1f}" y="{top + ph / 2:.1f}" font-size="12" text-anchor="middle" '
                     'fill="#777">no measurements yet</text></svg>')
        return "".join(parts)
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    pad = (y1 - y0) * 0.08 or max(abs(y0) * 0.05, 0.01)
    y0, y1 = y0 - pad, y1 + pad
    sx = lambda x: left + (x - x0) / (x1 - x0) * pw  # noqa: E731
    sy = lambda y: top + ph - (y - y0) / (y1 - y0) * ph  # noqa: E731
    for t in _ticks(y0, y1):
        parts.append(f'<line x1="{left}" x2="{left + pw}" y1="{sy(t):.1f}" y2="{sy(t):.1f}" stroke="#eee"/>'
                     f'<text x="{left - 4}" y="{sy(t) + 4:.1f}" font-size="10" text-anchor="end" '
                     f'fill="#444">{_fmt(t)}</text>')
    for t in _ticks(x0, x1, integer=True):
        parts.append(f'<text x="{sx(t):.1f}" y="{top + ph + 14}" font-size="10" text-anchor="middle" '
                     f'fill="#444">{_fmt(t)}</text>')
    path = " ".join(f"{'M' if i == 0 else 'L'}{sx(x):.1f},{sy(y):.1f}" for i, (x, y) in enumerate(pts))
    parts.append(f'<path class="series" d="{path}" fill="none" stroke="#1f5fbf" stroke-width="2"/>')
    for x, y in pts:
        parts.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3" fill="#1f5fbf">'
                     f'<title>{escape(x_label)} {_fmt(x)}: {_fmt(y)}</title></circle>')
    parts.append("</svg>")
    return "".join(parts)
