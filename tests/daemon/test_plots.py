"""daemon/plots.py: `horse-ledger snapshots --plot FILE` draws the web view's charts with matplotlib."""
from __future__ import annotations

import pytest

from ledger.queries import snapshot_series
from tests.daemon.ledger_nights import MODEL, populate

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def test_snapshots_plot_writes_a_png_of_the_charts(store, run_cli, tmp_path) -> None:
    populate(store)
    out = tmp_path / "plots" / "drift.png"
    result = run_cli("snapshots", "--plot", str(out), "--json")
    assert result.exit_code == 0, result.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000


def test_plot_of_no_snapshots_and_bad_suffixes(store, tmp_path) -> None:
    from daemon.plots import PlotError, plot_snapshots

    svg = plot_snapshots(snapshot_series(store, MODEL), tmp_path / "empty.svg", title=MODEL)
    assert "no measurements yet" in svg.read_text()
    with pytest.raises(PlotError, match=r"\.png, \.svg, \.pdf"):
        plot_snapshots([], tmp_path / "x.gif", title=MODEL)


def test_plot_to_an_unwritable_place_says_so(run_cli, tmp_path) -> None:
    (tmp_path / "file").write_text("")
    result = run_cli("snapshots", "--plot", str(tmp_path / "file" / "x.png"))
    assert result.exit_code == 1 and "give a writable path" in result.output
