"""The joint night (scope = subject | off; the fine-tune and MEMIT engines): one batch as stages, see
daemon/cycle.py's docstring. `JointNight.run` claims under the applier lock after crash recovery, `_process`
materialises the head, computes (daemon/joint_compute.py), settles and gates (daemon/joint_gate.py) and publishes
(daemon/joint_publish.py). Every row it writes is written by `ledger.chain` / the Store.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from daemon import gate, snapshots
from daemon.consolidate import nights_since_consolidation
from daemon.batch import (BatchAbandoned, BatchResult, Heartbeat, add_time, enter_stage, kept_measurements, probe_for,
                          to_fact)
from daemon.engines import load_engine
from daemon.joint_compute import ComputeStages
from daemon.joint_gate import GateStages
from daemon.joint_publish import PublishStages
from daemon.locks import applier_lock
from daemon.logs import log_context
from daemon.materialise import (ChainLink, Materialised, chain, chain_subjects, head_id, link_of, load_base,
                                materialise, scope_index)
from ledger import chain as ledger_chain
from ledger.config import Settings
from ledger.records import EditRecord
from ledger.status import EditStatus
from ledger.store import Store

log = logging.getLogger("daemon.cycle")


class JointNight(ComputeStages, GateStages, PublishStages):
    """One joint night: `JointNight(settings, store, ...).run() -> BatchResult`."""

    def __init__(self, settings: Settings, store: Store, *, max_edits: int | None, dry_run: bool,
                 stop: threading.Event | None, on_stage: Callable[[str], None] | None, actor: str) -> None:
        self.settings, self.store, self.actor = settings, store, actor
        self.base_model = settings.model
        self.max_edits = settings.batch_max_edits if max_edits is None else max_edits
        self.dry_run, self.stop, self.on_stage = dry_run, stop, on_stage
        self.timings: dict[str, float] = {}
        self.t0 = time.perf_counter()
        self.batch_id: int | None = None
        self.token: str | None = None
        self.edits: dict[int, EditRecord] = {}
        self.failed: dict[int, str] = {}
        self.failed_payload: dict[int, dict[str, Any]] = {}
        self.rejected: dict[int, str] = {}
        self.rejected_payload: dict[int, dict[str, Any]] = {}
        self.efficacy: dict[int, dict[str, float]] = {}
        self.bisect_log: list[dict[str, Any]] = []
        self._delta_cache: dict[frozenset[int], Any] = {}
        self._base_deltas: dict[int, Any] = {}  # re-deriving nights: id(relative deltas) → start-relative deltas
        self._carried_sums: Any = None  # the carried edits' statistics (horse.sums), at the start weights
        self.sums_source: str | None = None  # where they came from: "cache" or "captured"
        self.protect_source: str | None = None  # the protected fold's key moments: "cache" or "captured"
        self._last_sums: tuple[frozenset[int], Any] | None = None  # the newest candidate: (its set, carried + its
        # statistics); one only, each is K×K + 2·K×V per layer (198 MB for SmolLM2)
        # per candidate set: the gate's verdict and the measurement it judged (kept for the published one)
        self._verdict_cache: dict[frozenset[int], tuple[gate.Verdict, gate.Measurement]] = {}
        self.prefix = None  # the gate's prefix cache (horse/prefix.py), opened after materialising

    # ------------------------------------------------------------------ plumbing
    def _stage(self, name: str) -> None:
        enter_stage(name, self.t0, self.on_stage, self.stop)

    def _timed(self, key: str, start: float) -> float:
        return add_time(self.timings, key, start)

    # ------------------------------------------------------------------ the batch
    def run(self) -> BatchResult:
        if self.dry_run:
            edits = self.store.list_edits(status=EditStatus.PENDING, limit=self.max_edits, oldest_first=True)
            if not edits:
                return BatchResult("empty")
            self.edits = {e.id: e for e in edits}
            return self._process()
        t = time.perf_counter()
        with applier_lock(self.settings, self.base_model):
            t = self._timed("lock", t)
            self._stage("locked")
            self._recover()
            claimed = self.store.claim_batch(self.max_edits, base_model=self.base_model, actor=self.actor)
            t = self._timed("claim", t)
            if claimed is None:
                log.info("nothing pending; no batch")
                return BatchResult("empty", timings_s=dict(self.timings))
            self.batch_id, self.token = claimed.batch_id, claimed.token
            self.edits = {e.id: e for e in claimed.edits}
            with log_context(batch_id=self.batch_id), Heartbeat(self.store, self.token,
                                                                self.settings.heartbeat_every_s):
                log.info("claimed %d edits", len(self.edits), extra={"n_edits": len(self.edits)})
                try:
                    self._stage("claimed")
                    self.store.update_batch(self.batch_id, actor=self.actor, status="running")
                    return self._process()
                except BatchAbandoned as exc:
                    released = self.store.release_batch(self.token, actor=self.actor,
                                                        reason=f"abandoned: {exc}; the edits go back to pending")
                    log.warning("batch abandoned; %d edits back to pending", len(released))
                    return BatchResult("abandoned", batch_id=self.batch_id, released=released,
                                       timings_s=dict(self.timings))
                except BaseException as exc:
                    self._fail_batch(exc)
                    raise

    def _recover(self) -> None:
        """Crash recovery under the lock: dead claims back to pending, orphan files removed, sweeps."""
        from ledger.recovery import recover_claims

        rec = recover_claims(self.store, self.base_model, self.settings.max_attempts, actor=self.actor)
        if rec.requeued or rec.failed:
            log.warning("recovered %d edits claimed by a crashed batch (%d failed at max_attempts)",
                        len(rec.requeued) + len(rec.failed), len(rec.failed),
                        extra={"edit_ids": (rec.requeued + rec.failed)[:50]})
        referenced = ledger_chain.snapshot_paths(self.store, self.base_model)
        removed = snapshots.remove_orphans(self.settings.snapshot_dir, self.base_model, referenced)
        published = ledger_chain.published_snapshot_ids(self.store, self.base_model)
        snapshots.prune_weights_cache(self.settings.snapshot_dir, self.base_model, valid_ids=published)
        for folder in (snapshots.SUMS_DIR, snapshots.PROTECT_DIR, snapshots.MEASURED_DIR):
            snapshots.prune_weights_cache(self.settings.snapshot_dir, self.base_model, valid_ids=published,
                                          folder=folder, keep=2)
        if removed:
            log.warning("removed %d orphan snapshot files", len(removed), extra={"files": [str(p) for p in removed]})
        swept = self.store.sweep_stale(self.settings.claim_stale_after_s, actor=self.actor)
        retried = self.store.retry_failed(self.settings.max_attempts, actor=self.actor)
        if swept or retried:
            log.info("swept %d stale claims, retrying %d failed edits", len(swept), len(retried))

    def _fail_batch(self, exc: BaseException) -> None:
        """An error inside the batch: edits still claimed become failed (retried up to max_attempts)."""
        reason = f"batch {self.batch_id} failed: {type(exc).__name__}: {exc}"[:1900]
        try:
            ids = ledger_chain.fail_batch(self.store, batch_id=self.batch_id, token=self.token, reason=reason,
                                          timings=self.timings, actor=self.actor)
            log.error("batch failed; %d edits marked failed", len(ids), exc_info=exc)
        except Exception:  # noqa: BLE001 - the original error matters more; the next batch recovers
            log.exception("could not record the failed batch; the next batch recovers its edits")

    # ------------------------------------------------------------------ engine work
    def _process(self) -> BatchResult:
        from horse.deltas import check_finite

        t = time.perf_counter()
        model, tokenizer = load_base(self.settings)
        t = self._timed("load_model", t)
        self.editor, self.hypernet_fingerprint = load_engine(self.settings, model, tokenizer)
        t = self._timed("load_hypernet", t)
        # fine-tune-the-ledger (and a hypernet with `hypernet_from_base`) re-derives everything the head carries
        # from the base, every night; `hypernet_from_consolidation`: everything since the newest consolidated
        # snapshot on the chain (the start), from its weights
        self.from_base = self.editor.from_base
        self.from_start = self.from_base or self.settings.hypernet_from_consolidation
        with self.store.session(write=False) as s:
            self.parent_id = head_id(s, self.base_model)
            rows = chain(s, self.parent_id)
            self.chain: list[ChainLink] = [link_of(r) for r in rows]
            self.start_len = 0 if self.from_base or not self.from_start else \
                max((i + 1 for i, r in enumerate(rows) if r.kind == "consolidated"), default=0)
            self.start_id = rows[self.start_len - 1].id if self.start_len else None
            self.nights_before = nights_since_consolidation(rows)
            # the applied edits on the chain the candidate must keep, less those this batch rewrites (same subject
            # and prompt): retention is measured against the newest target
            rewritten = ledger_chain.key_hashes(s, list(self.edits))
            retained = ledger_chain.applied_edits_on(s, [c.id for c in self.chain], except_keys=rewritten)
            at_start = {e.id for e in ledger_chain.applied_edits_on(s, [c.id for c in self.chain[:self.start_len]])}
            head_subjects = chain_subjects(s, [c.id for c in self.chain]) if self.settings.scope != "off" else []
        self.carried: list[EditRecord] = [e for e in retained if e.id not in at_start] if self.from_start else []
        self.m: Materialised = materialise(self.settings, self.chain, track=self.editor.module_names,
                                           model_and_tokenizer=(model, tokenizer),
                                           keep_after=self.start_len or None)
        self.model, self.tokenizer = model, tokenizer
        self._start_normaliser()
        t = self._timed("materialise", t)
        self._stage("materialised")

        self.probe = probe_for(self.settings, self.store, [to_fact(e) for e in retained])
        self.scope = scope_index(self.settings, tokenizer, head_subjects)  # the head as served (`ask`, export)
        self.prefix = self._open_prefix()
        known = kept_measurements(self.settings, self.base_model, self.parent_id,
                                  self.chain[-1].sha256) if self.chain else None
        with self._scoped(()):
            self.head_measure = gate.measure(model, tokenizer, self.probe, known=known, prefix=self.prefix)
        t = self._timed("measure_head", t)
        self.protected = self._protect_earlier(retained)
        if self.protected:
            t = self._timed("protect_keys", t)

        self._stage("editing")
        active = self._settle(sorted(self.edits))
        self._stage("edited")

        t = time.perf_counter()
        final: list[int] = []
        verdict: gate.Verdict | None = None
        if active:
            verdict = self._verdict(active)
            self.bisect_log.append(self._log_entry(active, verdict, depth=0))
            if verdict.passed:
                final = active
            else:
                log.warning("gate failed: %s; bisecting", "; ".join(verdict.reasons))
                final, verdict = self._bisect_and_combine(active)
        self._timed("gate", t)
        self._keep_prefix()
        self._stage("gated")

        if self.dry_run:
            return self._result("dry-run", final, verdict)
        if not final:
            return self._finish_without_snapshot(verdict)
        deltas = self._delta_cache[frozenset(final)]
        check_finite(deltas)
        return self._publish(final, deltas, verdict)
