"""One batch of the daemon: claim → materialise → edit → verify → gate → publish (issue 4, steps 1–6).

Owns the orchestration of a batch and every status move it makes; the math is `horse`'s, the rules of the
gate are `daemon.gate`'s, the files are `daemon.snapshots`', the rows and the status machine the ledger's.

    result = run_batch(settings, store)                  # `horse-ledger apply`, and the scheduler's job
    result = run_batch(settings, store, dry_run=True)    # everything but the writes

1. Under the single-applier lock (`daemon.locks`): recover from crashes (edits still claimed by a batch of
   this model go back to `pending` — nobody else can hold them while we hold the lock; snapshot files no
   row names are deleted), sweep stale claims, retry failed edits with attempts < max_attempts, claim up to
   N pending edits (oldest first), and heartbeat while working.
2. Materialise the head (`daemon.materialise`): base weights + every delta on the head's chain, in order.
3. Compute the batch's deltas with the configured hypernet (`horse.editor.Editor`).
4. Verify each edit took (`daemon.gate.efficacy`); those that did not are `failed` with the measured value,
   and the deltas are recomputed without them until every remaining edit takes.
5. Gate the candidate against the head (canary, protected facts, retention, delta norm). On failure,
   bisect (halves, to `gate_bisect_depth`) to isolate the damaging edits: those are `rejected`, the rest
   publish if together they pass.
6. Publish: the delta file first (atomic), then ONE transaction: snapshot row, snapshot_edits, head,
   edits claimed → applied / failed / rejected, the batch row with every measurement, events.

A crash anywhere leaves no visible partial state: before the commit the edits are merely `claimed` and
the file (if any) is named by no row; the next batch recovers both. SIGTERM (the `stop` event) abandons
the batch at the next stage boundary before the write starts: claimed edits go back to `pending`.
Tests kill real processes at the named stages through the `on_stage` hook.

`run_batch` dispatches: scope = routed runs daemon/night/ (per-subject deltas); otherwise the joint night,
`daemon.joint_night.JointNight` (stages in daemon/joint_compute.py, joint_gate.py, joint_publish.py), then
consolidation (daemon/consolidate.py) when its policy says so. The engines: daemon/engines.py.
"""
from __future__ import annotations

import threading
from collections.abc import Callable

from daemon.batch import (ACTOR, STAGES, SHIPPED_HYPERNETS, BatchAbandoned, BatchResult,
                          NoHypernet, hypernet_path, keep_measurements, kept_measurements, load_editor, probe_for,
                          to_fact, to_request)
from daemon.engines import PROTECT_CHUNK, fold_moments_meta, keep_fold_moments, load_engine
from daemon.joint_night import JointNight
from ledger.config import Settings
from ledger.store import Store

__all__ = ["run_batch", "JointNight", "BatchResult", "BatchAbandoned", "NoHypernet", "ACTOR", "STAGES",
           "SHIPPED_HYPERNETS", "load_engine", "load_editor", "hypernet_path", "probe_for", "to_fact", "to_request",
           "keep_measurements", "kept_measurements", "PROTECT_CHUNK", "fold_moments_meta", "keep_fold_moments"]


def run_batch(settings: Settings, store: Store, *, max_edits: int | None = None, dry_run: bool = False,
              stop: threading.Event | None = None, on_stage: Callable[[str], None] | None = None,
              actor: str = ACTOR) -> BatchResult:
    """Run one batch (see the module docstring). Returns what it did; raises after bookkeeping on errors.

    Args:
        max_edits: claim at most this many (default settings.batch_max_edits).
        dry_run: claim nothing and write nothing; report what the batch would do with the oldest pending edits.
        stop: set by the daemon on SIGTERM; the batch abandons at its next stage boundary before the write.
        on_stage: called with each name in STAGES as the batch reaches it (tests kill the process there).
    Raises:
        ApplierBusy: another process is applying edits to this model.
    """
    if settings.scope == "routed":  # per-subject deltas: daemon/night/
        from daemon.night.run import run_night

        return run_night(settings, store, max_edits=max_edits, dry_run=dry_run, stop=stop, on_stage=on_stage,
                         actor=actor)
    result = JointNight(settings, store, max_edits=max_edits, dry_run=dry_run, stop=stop, on_stage=on_stage,
                        actor=actor).run()
    if result.status == "published":
        from daemon.consolidate import consolidate, consolidation_due

        why = consolidation_due(settings, store)
        if why:
            result.consolidation = consolidate(settings, store, actor=actor, reason=why).to_dict()
    return result
