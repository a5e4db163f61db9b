"""A routed night, top to bottom: recover → claim → load the head → compute → settle → gate → publish.

    result = run_night(settings, store)        # `horse-ledger apply` and the daemon's job, with scope = routed

Every row is written by `ledger.chain` (one transaction at publish); files by `daemon.night.routes` (before the
transaction, atomically: a crash leaves an orphan file that recovery removes). Stage names are those of
`daemon.batch.STAGES` (the kill tests stop the process at them); before "mid-write" a stop request (SIGTERM)
abandons the night and its edits go back to pending.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from daemon import gate, snapshots
from daemon.batch import (BatchAbandoned, BatchResult, Heartbeat, add_time, enter_stage, kept_measurements,
                          probe_for)
from daemon.locks import applier_lock
from daemon.logs import log_context
from daemon.materialise import head_id, link_of, load_base, chain
from daemon.night import compute, routes as route_files
from daemon.night.decide import Decision, Measurer, decide, settle, to_fact
from daemon.night.engine import load_subject_engine
from ledger import chain as ledger_chain
from ledger.config import Settings
from ledger.status import EditStatus
from ledger.store import EditRecord, Store

log = logging.getLogger("daemon.night")
ACTOR = "daemon"


@dataclass
class Night:
    """What the stages share (read-mostly; each stage returns what it decides)."""

    settings: Settings
    store: Store
    actor: str
    stop: threading.Event | None
    on_stage: Callable[[str], None] | None
    timings: dict[str, float] = field(default_factory=dict)
    t0: float = field(default_factory=time.perf_counter)

    def stage(self, name: str) -> None:
        enter_stage(name, self.t0, self.on_stage, self.stop)

    def timed(self, key: str, start: float) -> float:
        return add_time(self.timings, key, start)


@dataclass(frozen=True)
class Head:
    snapshot_id: int | None
    links: list
    table: Any            # horse.route.RouteTable, indexed
    edits: dict[int, EditRecord]   # the edits its routes list


def recover(night: Night) -> None:
    """Crash recovery under the lock: dead claims back to pending, orphan files removed, sweeps, retries."""
    s, base_model = night.settings, night.settings.model
    from ledger.recovery import recover_claims

    rec = recover_claims(night.store, base_model, s.max_attempts, actor=night.actor)
    if rec.requeued or rec.failed:
        log.warning("recovered %d edits claimed by a crashed batch (%d failed at max_attempts)",
                    len(rec.requeued) + len(rec.failed), len(rec.failed))
    removed = snapshots.remove_orphans(s.snapshot_dir, base_model, ledger_chain.snapshot_paths(night.store, base_model))
    if removed:
        log.warning("removed %d orphan snapshot files", len(removed))
    with night.store.session(write=False) as sess:
        published = [r.id for r in chain(sess, head_id(sess, base_model))]
    snapshots.prune_weights_cache(s.snapshot_dir, base_model, valid_ids=published, folder=snapshots.MEASURED_DIR,
                                  keep=2)
    night.store.sweep_stale(s.claim_stale_after_s, actor=night.actor)
    night.store.retry_failed(s.max_attempts, actor=night.actor)


def load_head(night: Night, tokenizer) -> Head:
    with night.store.session(write=False) as sess:
        parent = head_id(sess, night.settings.model)
        links = [link_of(r) for r in chain(sess, parent)]
    table = route_files.head_table(night.settings, links, tokenizer)
    return Head(parent, links, table, {})


def carried_edits(store: Store, head: Head, claimed: list[EditRecord]) -> dict[int, EditRecord]:
    from horse.route import subject_key

    keys = {subject_key(e.subject) for e in claimed}
    ids = sorted({i for k in keys if k in head.table.routes for i in head.table.routes[k].edit_ids})
    return {e.id: e for e in store.get_edits(ids)} if ids else {}


def run_night(settings: Settings, store: Store, *, max_edits: int | None = None, dry_run: bool = False,
              stop: threading.Event | None = None, on_stage: Callable[[str], None] | None = None,
              actor: str = ACTOR) -> BatchResult:
    """One routed night. Returns what it did (the same BatchResult as the joint night's)."""
    night = Night(settings, store, actor, stop, on_stage)
    n = settings.batch_max_edits if max_edits is None else max_edits
    if dry_run:
        edits = store.list_edits(status=EditStatus.PENDING, limit=n, oldest_first=True)
        return _process(night, None, None, edits, dry_run=True) if edits else BatchResult("empty")
    t = time.perf_counter()
    with applier_lock(settings, settings.model):
        t = night.timed("lock", t)
        night.stage("locked")
        recover(night)
        claimed = store.claim_batch(n, base_model=settings.model, actor=actor)
        night.timed("claim", t)
        if claimed is None:
            log.info("nothing pending; no batch")
            return BatchResult("empty", timings_s=dict(night.timings))
        with log_context(batch_id=claimed.batch_id), Heartbeat(store, claimed.token, settings.heartbeat_every_s):
            try:
                night.stage("claimed")
                with store.session() as sess:
                    ledger_chain.move_batch(sess, claimed.batch_id, ledger_chain.BatchStatus.RUNNING, actor=actor)
                return _process(night, claimed.batch_id, claimed.token, claimed.edits)
            except BatchAbandoned as exc:
                released = store.release_batch(claimed.token, actor=actor,
                                               reason=f"abandoned: {exc}; the edits go back to pending")
                return BatchResult("abandoned", batch_id=claimed.batch_id, released=released,
                                   timings_s=dict(night.timings))
            except BaseException as exc:
                reason = f"batch {claimed.batch_id} failed: {type(exc).__name__}: {exc}"[:1900]
                try:
                    ledger_chain.fail_batch(store, batch_id=claimed.batch_id, token=claimed.token, reason=reason,
                                            timings=night.timings, actor=actor)
                except Exception:  # noqa: BLE001 - the original error matters more; the next night recovers
                    log.exception("could not record the failed batch; the next night recovers its edits")
                raise


def _process(night: Night, batch_id: int | None, token: str | None, claimed: list[EditRecord], *,
             dry_run: bool = False) -> BatchResult:
    from horse.route import Router

    s = night.settings
    t = time.perf_counter()
    model, tok = load_base(s)
    t = night.timed("load_model", t)
    engine = load_subject_engine(s, model, tok)
    t = night.timed("load_hypernet", t)
    head = load_head(night, tok)
    earlier = carried_edits(night.store, head, claimed)
    t = night.timed("materialise", t)
    night.stage("materialised")

    groups = compute.make_groups(head.table, claimed, earlier)
    retained = [to_fact(e) for e in night.store.list_edits(status=EditStatus.APPLIED, limit=None)
                if e.id in _served_ids(head)] if head.table.routes else []
    probe = _probe(s, night.store, retained, groups)
    with Router(model, head.table) as router:
        known = kept_measurements(s, s.model, head.snapshot_id, head.links[-1].sha256) if head.links else None
        head_m = gate.measure(model, tok, probe, known=known)
        t = night.timed("measure_head", t)
        measurer = Measurer(s, model, tok, router, head.table, probe, head_m)

        def solve(gs):
            with router.suspended():  # routes are solved on the base model
                r, timings = compute.solve(engine, model, tok, gs)
            for k, v in timings.items():
                night.timings[f"edit_{k}"] = night.timings.get(f"edit_{k}", 0.0) + v
            return r

        night.stage("editing")
        failed: dict[int, str] = {}
        efficacy: dict[int, dict] = {}
        t = time.perf_counter()
        routes = settle(measurer, groups, solve, s, failed, efficacy)
        t = night.timed("edit_and_verify", t)
        night.stage("edited")
        decision = decide(measurer, groups, routes, solve, s)
        if decision.final is not None:
            decision.verdict = gate.judge(head_m, decision.final, probe, s)
        night.timed("gate", t)
        night.stage("gated")
    if decision.accepted and decision.verdict is not None and not decision.verdict.passed:
        for k in list(decision.accepted):
            for e in groups[k].new:
                decision.returned[e.id] = ("the night's subjects passed one by one but not together ("
                                           f"{'; '.join(decision.verdict.reasons)}); retried in a later night")
        decision.accepted = {}
    from daemon.night.publish import finish, publish

    outcome = _outcome(groups, decision, failed, efficacy)
    metrics = _metrics(night, head, probe, head_m, decision, outcome, efficacy, measurer.count)
    if dry_run:
        return BatchResult("dry-run", applied=outcome.applied, failed=outcome.failed, rejected=outcome.rejected,
                           metrics=metrics, timings_s=dict(night.timings))
    if not outcome.applied:
        return finish(night, batch_id, head, outcome, metrics)
    return publish(night, batch_id, token, head, engine, decision, outcome, metrics, probe, efficacy, claimed)


def _served_ids(head: Head) -> set[int]:
    return {i for r in head.table.routes.values() for i in r.edit_ids}


def _probe(settings: Settings, store: Store, retained: list[gate.Fact], groups) -> gate.Probe:
    """The gate's probe: canary, protected facts, a stable sample of the served edits plus every carried edit
    of the night's subjects (their deltas are solved again)."""
    base = probe_for(settings, store, retained)
    must = {e.id for g in groups.values() for e in g.carried}
    extra = [f for f in retained if f.key in must and f.key not in {x.key for x in base.retained}]
    return gate.Probe(base.canary_prompts, base.protected, base.retained + tuple(extra), base.generation_sample)


def _outcome(groups, decision: Decision, failed: dict[int, str], efficacy) -> ledger_chain.NightOutcome:
    applied = sorted(e.id for k in decision.accepted for e in groups[k].new)
    out = ledger_chain.NightOutcome(applied=applied, failed=dict(failed), rejected=dict(decision.rejected),
                                    returned=dict(decision.returned))
    out.payloads = {i: {"efficacy": efficacy.get(i)} for i in (*applied, *failed, *decision.rejected)}
    return out


def _metrics(night: Night, head: Head, probe, head_m, decision: Decision, outcome, efficacy,
             n_measurements: int) -> dict[str, Any]:
    from daemon.night.judge import measurement_metrics

    applied = outcome.applied
    night.timings["total"] = time.perf_counter() - night.t0
    return {
        "serving": "routed", "head_snapshot_id": head.snapshot_id,
        "head": gate.baseline_metrics(head_m, probe, night.settings),
        "gate": decision.verdict.metrics if decision.verdict is not None else None,
        "subjects": measurement_metrics(decision.harms), "gate_measurements": n_measurements,
        "efficacy": {str(k): v for k, v in sorted(efficacy.items())},
        "efficacy_mean": (sum(efficacy[i]["efficacy"] for i in applied) / len(applied)) if applied else None,
        "efficacy_generated_mean": (sum(efficacy[i]["generated"] for i in applied) / len(applied)) if applied else None,
        "n_claimed": len(applied) + len(outcome.failed) + len(outcome.rejected) + len(outcome.returned),
        "n_applied": len(applied), "n_failed": len(outcome.failed), "n_rejected": len(outcome.rejected),
        "n_returned": len(outcome.returned),
        "timings_s": {k: round(v, 4) for k, v in night.timings.items()},
    }
