"""daemon/metrics_export.py: the ledger's Prometheus metrics, and the textfile written after a night."""
from __future__ import annotations

import logging
import signal
from types import SimpleNamespace

import pytest
from prometheus_client.parser import text_string_to_metric_families

from daemon.metrics_export import render_metrics, write_night_textfile
from ledger.config import load_settings
from tests.daemon.ledger_nights import MODEL, populate


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_textfile_after_a_night_holds_the_ledger_numbers(store, tmp_path) -> None:
    ids = populate(store)
    path = tmp_path / "collector" / "horse_ledger.prom"
    settings = load_settings(environ={}, model=MODEL, metrics_textfile=str(path))
    assert write_night_textfile(settings, store, SimpleNamespace(status="published")) == path
    got = samples(path.read_text())
    assert got[("horse_ledger_edits", (("status", "applied"),))] == 5
    assert got[("horse_ledger_edits", (("status", "rejected"),))] == 1
    assert got[("horse_ledger_head_snapshot_id", (("base_model", MODEL),))] == ids["snapshots"][2]
    assert got[("horse_ledger_chain_length", (("base_model", MODEL),))] == 1
    assert got[("horse_ledger_last_night_canary_agreement", ())] == 0.99
    assert ("horse_ledger_last_success_timestamp_seconds", ()) in got
    assert got[("horse_ledger_last_run_timestamp_seconds", (("status", "published"),))] > 0
    assert not list(path.parent.glob("*.tmp*"))  # written through a temp file and renamed


def test_last_night_numbers_come_from_the_newest_batch(store) -> None:
    populate(store)
    from ledger.models import Batch, utcnow

    with store.session() as s:  # a newer night that rejected everything
        s.add(Batch(token="t4", base_model=MODEL, status="rejected", actor="test", n_edits=2,
                    started_at=utcnow(),
                    metrics={"gate": {"canary_agreement": 0.5, "retention": 0.7, "ns": 0.6}, "n_applied": 0,
                             "n_failed": 0, "n_rejected": 2, "timings_s": {"gate": 3.0}}))
    got = samples(render_metrics(store).decode())
    assert got[("horse_ledger_last_night_edits", (("outcome", "rejected"),))] == 2
    assert (got[("horse_ledger_last_night_retention", ())], got[("horse_ledger_last_night_ns", ())]) == (0.7, 0.6)
    assert got[("horse_ledger_last_night_stage_seconds", (("stage", "gate"),))] == 3.0
    assert any(k[0] == "horse_ledger_last_night_info" and ("status", "rejected") in k[1] for k in got)


def test_textfile_off_by_default_and_never_fatal(store, tmp_path, caplog) -> None:
    assert write_night_textfile(load_settings(environ={}), store, None) is None
    (tmp_path / "file").write_text("")
    bad = load_settings(environ={}, metrics_textfile=str(tmp_path / "file" / "m.prom"))
    with caplog.at_level(logging.WARNING, logger="daemon.metrics"):
        assert write_night_textfile(bad, store, None) is None
    assert "fix metrics_textfile" in caplog.text


@pytest.mark.parametrize("command", [["apply"], ["daemon", "--once"]])
def test_apply_and_the_daemon_write_the_textfile_after_a_night(store, run_cli, tmp_path, monkeypatch,
                                                               command) -> None:
    import daemon.cycle
    from daemon.cycle import BatchResult

    populate(store)
    nights = []

    def fake_run_batch(settings, store, **kwargs):  # the night itself is tested end to end elsewhere
        nights.append(kwargs)
        return BatchResult(status="empty")

    monkeypatch.setattr(daemon.cycle, "run_batch", fake_run_batch)
    path = tmp_path / "m.prom"
    monkeypatch.setenv("HORSE_LEDGER_METRICS_TEXTFILE", str(path))
    saved = signal.getsignal(signal.SIGTERM)
    try:
        result = run_cli(*command)
    finally:
        signal.signal(signal.SIGTERM, saved)  # `daemon --once` installs its own
    assert result.exit_code == 0, result.output
    assert len(nights) == 1
    got = samples(path.read_text())
    assert got[("horse_ledger_last_run_timestamp_seconds", (("status", "empty"),))] > 0
    assert got[("horse_ledger_edits", (("status", "applied"),))] == 5
