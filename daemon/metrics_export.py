"""Prometheus metrics of the ledger: `/metrics` on `horse-ledger serve`, and a textfile after every night.

Owns the metric names and how they are read from the ledger (read-only: `ledger.queries`). The numbers are
collected afresh from the database at each scrape or write, so the serving process and the night's process
agree without sharing state. The night code calls one function when a batch returns:

    write_night_textfile(settings, store, result)   # no-op unless settings.metrics_textfile is set

which writes node_exporter's textfile-collector format atomically (temp file, rename). Metrics:

    horse_ledger_edits{status}                        edits per status
    horse_ledger_head_snapshot_id{base_model}         the head (0 = the unedited base)
    horse_ledger_chain_length{base_model}             snapshots on the head's chain
    horse_ledger_last_night_edits{outcome}            published | failed | rejected edits of the newest batch
    horse_ledger_last_night_info{batch_id,status}     1, for the newest batch
    horse_ledger_last_night_{canary_agreement,retention,ns,perplexity}   its gate's numbers (absent if unmeasured)
    horse_ledger_last_night_stage_seconds{stage}      its stage timings
    horse_ledger_last_success_timestamp_seconds       when the newest published batch finished
    horse_ledger_last_run_timestamp_seconds           (textfile only) when the textfile was written
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Iterator

from prometheus_client import CollectorRegistry, generate_latest, write_to_textfile
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from ledger.config import Settings
from ledger.queries import chain_lengths, last_night, series_value
from ledger.store import Store

log = logging.getLogger("daemon.metrics")

PREFIX = "horse_ledger"
NIGHT_SERIES = ("canary_agreement", "retention", "ns", "perplexity")


class LedgerCollector(Collector):
    """Reads the ledger at each `collect()` (a scrape, or a textfile write)."""

    def __init__(self, store: Store, *, run_status: str | None = None) -> None:
        self.store = store
        self.run_status = run_status  # the status of the batch that just returned (textfile only)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        edits = GaugeMetricFamily(f"{PREFIX}_edits", "Edits in the ledger per status.", labels=["status"])
        for status, n in self.store.status_counts().items():
            edits.add_metric([status], n)
        yield edits
        head = GaugeMetricFamily(f"{PREFIX}_head_snapshot_id", "Snapshot served per base model (0 = the base).",
                                 labels=["base_model"])
        for model, snap in self.store.heads().items():
            head.add_metric([model], snap or 0)
        yield head
        chain = GaugeMetricFamily(f"{PREFIX}_chain_length", "Snapshots on the head's chain.", labels=["base_model"])
        for model, n in chain_lengths(self.store).items():
            chain.add_metric([model], n)
        yield chain
        yield from self._last_night()
        if self.run_status is not None:
            run = GaugeMetricFamily(f"{PREFIX}_last_run_timestamp_seconds",
                                    "When apply/daemon last ran a night and wrote this file.", labels=["status"])
            run.add_metric([self.run_status], time.time())
            yield run

    def _last_night(self) -> Iterator[GaugeMetricFamily]:
        ok = last_night(self.store, status="published")
        if ok is not None and ok.finished_at is not None:
            yield GaugeMetricFamily(f"{PREFIX}_last_success_timestamp_seconds",
                                    "When the newest night that published a snapshot finished (Unix time).",
                                    value=ok.finished_at.timestamp())
        night = last_night(self.store)
        if night is None:
            return
        m: dict[str, Any] = night.metrics or {}
        info = GaugeMetricFamily(f"{PREFIX}_last_night_info", "The newest batch (always 1).",
                                 labels=["batch_id", "status", "base_model"])
        info.add_metric([str(night.id), night.status, night.base_model], 1)
        yield info
        outcome = GaugeMetricFamily(f"{PREFIX}_last_night_edits", "Edits of the newest batch by outcome.",
                                    labels=["outcome"])
        for name, key in (("published", "n_applied"), ("failed", "n_failed"), ("rejected", "n_rejected"),
                          ("claimed", "n_claimed")):
            value = m.get(key)
            if isinstance(value, (int, float)):
                outcome.add_metric([name], value)
        yield outcome
        for name in NIGHT_SERIES:
            value = series_value(m, name)
            if value is not None:
                yield GaugeMetricFamily(f"{PREFIX}_last_night_{name}", f"The newest batch's gate: {name}.",
                                        value=value)
        timings = m.get("timings_s") or {}
        stages = GaugeMetricFamily(f"{PREFIX}_last_night_stage_seconds", "Seconds per stage of the newest batch.",
                                   labels=["stage"])
        for stage, seconds in sorted(timings.items()):
            if isinstance(seconds, (int, float)):
                stages.add_metric([stage], float(seconds))
        yield stages


def registry_for(store: Store, *, run_status: str | None = None) -> CollectorRegistry:
    """A fresh registry holding only the ledger's metrics."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(LedgerCollector(store, run_status=run_status))
    return registry


def render_metrics(store: Store) -> bytes:
    """The Prometheus text exposition of the ledger now (what `/metrics` serves)."""
    return generate_latest(registry_for(store))


def write_night_textfile(settings: Settings, store: Store, result: Any = None) -> Path | None:
    """After a night: rewrite settings.metrics_textfile (atomically) with the ledger's metrics.

    Never raises for an unwritable file or an unreadable ledger: a night must not fail for its metrics; the
    problem is logged with what to fix.

    Args:
        result: what the night returned (daemon.cycle.BatchResult or None); its `status` labels the run.
    Returns:
        The file written, or None (off, or it could not be written).
    """
    if not settings.metrics_textfile:
        return None
    path = Path(settings.metrics_textfile).expanduser()
    status = str(getattr(result, "status", None) or "none")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_to_textfile(str(path), registry_for(store, run_status=status))
    except Exception as exc:  # noqa: BLE001 - metrics are best effort; the night already happened
        log.warning("could not write the metrics textfile %s: %s; fix metrics_textfile in the config or the "
                    "directory's permissions", path, exc)
        return None
    return path
