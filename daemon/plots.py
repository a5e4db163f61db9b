"""`horse-ledger snapshots --plot FILE.png`: the web view's charts as one matplotlib figure.

Owns the figure: one row per chart of daemon/charts.py (canary agreement, retention, NS and perplexity when
measured, delta norm), drawn against the snapshot id (left) and against the edits the model carries (right).
matplotlib runs on its Agg backend (no display needed); the format follows the file's suffix (.png, .svg,
.pdf).

    rows = snapshot_series(store, "smollm2-135m")
    plot_snapshots(rows, Path("drift.png"), title="smollm2-135m")
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from daemon.charts import X_AXES, charts
from daemon.errors import DaemonError

SUFFIXES = (".png", ".svg", ".pdf")


class PlotError(DaemonError):
    """The plot cannot be written; give a writable FILE ending in .png, .svg or .pdf."""


def plot_snapshots(rows: Sequence[dict[str, Any]], path: Path, *, title: str) -> Path:
    """Write the charts of `rows` (ledger.queries.snapshot_series) to `path`.

    Raises:
        PlotError: an unknown file type, or the file cannot be written.
    """
    if path.suffix.lower() not in SUFFIXES:
        raise PlotError(f"cannot plot to {path}: give a file ending in {', '.join(SUFFIXES)}")
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    drawn = charts(rows)
    fig, axes = plt.subplots(len(drawn), 2, figsize=(11, 2.6 * len(drawn)), squeeze=False)
    for row, chart in zip(axes, drawn):
        for ax, x_axis in zip(row, X_AXES):
            points = chart.points(x_axis)
            if points:
                xs, ys = zip(*points)  # in snapshot order, so the line follows time
                ax.plot(xs, ys, marker="o", color="#1f5fbf", linewidth=1.8, markersize=4)
            else:
                ax.text(0.5, 0.5, "no measurements yet", ha="center", va="center", transform=ax.transAxes,
                        color="#777")
            ax.set_title(chart.title, fontsize=10, loc="left")
            ax.set_xlabel(X_AXES[x_axis][1], fontsize=9)
            ax.grid(True, color="#eee")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(f"{title}: {len(rows)} snapshot{'s' * (len(rows) != 1)}", fontsize=12)
    fig.tight_layout()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
    except OSError as exc:
        raise PlotError(f"cannot write {path}: {exc.strerror or exc}; give a writable path") from None
    finally:
        plt.close(fig)
    return path
