"""Publish stage of a routed night: the route file first (atomic), then one ledger transaction."""
from __future__ import annotations

import logging
import time

from daemon import gate
from daemon.batch import BatchResult, keep_measurements
from daemon.logs import log_context
from daemon.night import routes as route_files
from daemon.night.decide import to_fact
from ledger import chain as ledger_chain

log = logging.getLogger("daemon.night")


def finish(night, batch_id: int, head, outcome: ledger_chain.NightOutcome, metrics: dict) -> BatchResult:
    """Nothing to publish: settle the edits and the batch."""
    status = ledger_chain.finish_night(night.store, batch_id=batch_id, outcome=outcome, batch_metrics=metrics,
                                       actor=night.actor)
    log.warning("night published nothing", extra={"n_failed": len(outcome.failed),
                                                  "n_rejected": len(outcome.rejected)})
    return BatchResult(status.value, batch_id=batch_id, parent_snapshot_id=head.snapshot_id, applied=[],
                       failed=dict(outcome.failed), rejected=dict(outcome.rejected), metrics=metrics,
                       timings_s=dict(night.timings), returned=dict(outcome.returned))


def publish(night, batch_id: int, token: str, head, engine, decision, outcome, metrics: dict, probe,
            efficacy, claimed) -> BatchResult:
    from horse.route import table_digest

    s = night.settings
    t = time.perf_counter()
    new_table = head.table.with_routes(decision.accepted)
    digest = table_digest(new_table)
    routes_bytes = sum(r.nbytes() for r in decision.accepted.values())
    n_served = sum(len(r.edit_ids) for r in new_table.routes.values())
    carried = sorted({i for r in decision.accepted.values() for i in r.edit_ids})
    meta = {"base_model": s.model, "base_fingerprint": engine.base_fingerprint,
            "hypernet_fingerprint": engine.fingerprint,
            "parent_snapshot": "" if head.snapshot_id is None else str(head.snapshot_id),
            "batch_id": str(batch_id), "weights_sha256": digest}
    file = route_files.write_routes(s, f"b{batch_id:06d}-{token[:8]}", decision.accepted, meta,
                                    on_stage=night.stage)
    t = night.timed("write", t)
    night.stage("written")
    snap_metrics = {
        "serving": "routed", "gate": metrics["gate"], "head": metrics["head"], "subjects": metrics["subjects"],
        "efficacy_mean": metrics["efficacy_mean"], "efficacy_generated_mean": metrics["efficacy_generated_mean"],
        "n_edits": len(outcome.applied), "bytes_per_edit": routes_bytes / max(len(carried), 1),
        "routes": {"changed": sorted(decision.accepted), "n_subjects": len(new_table.routes),
                   "n_edits_served": n_served},
        "weights_sha256": digest, "weights_modules": new_table.modules,
        "base_fingerprint": engine.base_fingerprint, "hypernet_fingerprint": engine.fingerprint,
        "engine": s.engine, "chain_length": len(head.links) + 1, "route_solve": s.route_solve,
    }
    snapshot = ledger_chain.NewSnapshot(parent_id=head.snapshot_id, base_model=s.model, kind=route_files.ROUTED,
                                        path=file.rel_path, sha256=file.sha256, bytes=file.bytes,
                                        metrics=snap_metrics, carried=carried)
    snapshot_id = ledger_chain.publish_night(night.store, batch_id=batch_id, expected_head=head.snapshot_id,
                                             snapshot=snapshot, outcome=outcome, batch_metrics=metrics,
                                             actor=night.actor)
    night.timed("commit", t)
    if decision.final is not None:  # derived data: the next night's head measurement starts from it
        new_facts = [to_fact(e) for e in claimed if e.id in set(outcome.applied)]
        keep_measurements(s, s.model, snapshot_id, file.sha256,
                          gate.Known().add(probe, decision.final).add_efficacy(new_facts, efficacy))
    metrics["snapshot_id"] = snapshot_id
    with log_context(snapshot_id=snapshot_id):
        log.info("published snapshot %d: %d applied, %d failed, %d rejected, %d returned", snapshot_id,
                 len(outcome.applied), len(outcome.failed), len(outcome.rejected), len(outcome.returned))
        night.stage("published")
    return BatchResult("published", batch_id=batch_id, parent_snapshot_id=head.snapshot_id,
                       applied=list(outcome.applied), failed=dict(outcome.failed), rejected=dict(outcome.rejected),
                       metrics=metrics, timings_s=dict(night.timings), snapshot_id=snapshot_id,
                       snapshot_path=file.rel_path, snapshot_bytes=file.bytes, returned=dict(outcome.returned))
