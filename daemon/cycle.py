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
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from sqlalchemy import insert, select, update

from daemon import gate, snapshots
from daemon.batch import (ACTOR, STAGES, SHIPPED_HYPERNETS, BatchAbandoned, BatchResult,  # noqa: F401
                          Heartbeat, NoHypernet, _measured_meta, add_time, enter_stage, file_fingerprint, hypernet_path, keep_measurements,
                          kept_measurements, load_editor, probe_for, to_fact, to_request)
from daemon.errors import BatchRefused, DaemonError
from daemon.locks import applier_lock
from daemon.logs import log_context
from daemon.materialise import (ChainLink, Materialised, chain, chain_subjects, head_id, link_of, load_base,
                                materialise, scope_index, scoped, weights_digest)
from ledger.config import Settings
from ledger.events import record_event
from ledger.models import Batch, Edit, Snapshot, SnapshotEdit, utcnow
from ledger.status import EditStatus, transition
from ledger.store import EditRecord, Store, set_head

log = logging.getLogger("daemon.cycle")

PROTECT_CHUNK = 100  # earlier edits captured per pass for `protect_earlier`


def load_engine(settings: Settings, model, tokenizer) -> tuple[Any, str]:
    """The configured engine (`settings.engine`) built on the unedited base `model`, and its fingerprint
    (sha256 of the hypernet file, or of the engine's settings): (editor, fingerprint).

    Every engine has `module_names`, `fingerprint` (of the base weights it edits), `from_base` and
    `compute_deltas(model, tokenizer, requests) -> (deltas, timings)`. An engine with `from_base` set
    (fine-tune-the-ledger) is given every edit the head carries, on the base weights (see `_Batch`).
    """
    if settings.engine == "finetune":
        from horse.arch import block_mlp_out_modules
        from horse.finetune import FinetuneConfig, FineTuner
        from ledger.config import parse_blocks

        blocks = parse_blocks(settings.finetune_blocks)
        n_loc = settings.finetune_locality_prompts
        editor = FineTuner.new(model, FinetuneConfig(
            module_names=tuple(block_mlp_out_modules(model, *blocks)) if blocks else (),
            epochs=settings.finetune_epochs, lr=settings.finetune_lr,
            locality_weight=settings.finetune_locality_weight, n_locality=n_loc,
            locality_batch=16 if n_loc < 256 else 32,
            swap_weight=settings.finetune_swap_weight, swap_resample=settings.finetune_swap_resample,
            rehearsal=settings.finetune_rehearsal, warm_lr=settings.finetune_warm_lr,
            preserve_weight=settings.finetune_preserve_weight),
            held_out=gate.load_canary(settings.gate_canary_file or None))
        if settings.finetune_preserve_weight:  # the corpus moments of the tuned layers' inputs, cached
            from horse.covariance import preservation_moments

            editor.set_preservation(preservation_moments(model, tokenizer, editor.module_names,
                                                         cache_dir=settings.cache_dir)[0])
    elif settings.engine == "memit":
        from horse.memit import MemitEditor

        editor = MemitEditor(model, cache_dir=settings.cache_dir, tokenizer=tokenizer)
    else:
        path = hypernet_path(settings)
        return load_editor(settings, path, model, tokenizer), file_fingerprint(path)
    card = json.dumps(editor.card(), sort_keys=True).encode()
    return editor, hashlib.sha256(card).hexdigest()


def fold_moments_meta(settings: Settings, editor, fold_id: int) -> dict[str, str]:
    """What the protected-key moments kept beside a fold were captured for (checked before they are used)."""
    return {"base_fingerprint": editor.fingerprint, "dtype": settings.dtype, "start": f"snapshot {fold_id}",
            "modules": ",".join(editor.module_names)}


def keep_fold_moments(settings: Settings, editor, model, tokenizer, fold_id: int, edits: Sequence[EditRecord],
                      moments: dict | None = None) -> dict:
    """KₑᵀKₑ per edited module of `edits`, captured on `model` as it is (the fold's weights) unless `moments` (the
    same, replayed by the fold's fine-tune) are given, and kept beside the fold for the nights that derive from it
    (`protect_earlier` with `hypernet_from_consolidation`). Returns them."""
    import torch

    if moments is None:
        moments = editor.requests_second_moments(model, tokenizer, [to_request(e) for e in edits],
                                                 chunk_edits=PROTECT_CHUNK)
    try:  # derived data: without it the next night captures them again
        snapshots.write_derived_cache(settings.snapshot_dir, settings.model, fold_id,
                                      {**moments, "edit_ids": torch.tensor(sorted(e.id for e in edits),
                                                                           dtype=torch.int64)},
                                      fold_moments_meta(settings, editor, fold_id), folder=snapshots.PROTECT_DIR)
    except OSError:
        log.warning("could not keep the protected key moments of snapshot %d", fold_id, exc_info=True)
    return moments




def nights_since_consolidation(rows: Sequence[Snapshot]) -> int:
    """Published nights the head (rows[-1] of its chain, root first) carries since its newest consolidated
    snapshot or the base: recorded on each night's snapshot (a night derived from a consolidated snapshot
    replaces the one before it on the chain, so counting the chain would say 1), else counted."""
    if not rows:
        return 0
    recorded = (rows[-1].metrics or {}).get("nights_since_consolidation")
    if recorded is not None:
        return int(recorded)
    last = max((i + 1 for i, r in enumerate(rows) if r.kind == "consolidated"), default=0)
    return len([r for r in rows[last:] if r.kind == "incremental"])


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
    result = _Batch(settings, store, max_edits=max_edits, dry_run=dry_run, stop=stop, on_stage=on_stage,
                    actor=actor).run()
    if result.status == "published":
        from daemon.consolidate import consolidate, consolidation_due

        why = consolidation_due(settings, store)
        if why:
            result.consolidation = consolidate(settings, store, actor=actor, reason=why).to_dict()
    return result


class _Batch:
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
        from ledger.chain import snapshot_paths
        from ledger.recovery import recover_claims

        rec = recover_claims(self.store, self.base_model, self.settings.max_attempts, actor=self.actor)
        if rec.requeued or rec.failed:
            log.warning("recovered %d edits claimed by a crashed batch (%d failed at max_attempts)",
                        len(rec.requeued) + len(rec.failed), len(rec.failed),
                        extra={"edit_ids": (rec.requeued + rec.failed)[:50]})
        referenced = snapshot_paths(self.store, self.base_model)
        removed = snapshots.remove_orphans(self.settings.snapshot_dir, self.base_model, referenced)
        with self.store.session(write=False) as s:
            published = list(s.execute(select(Snapshot.id).where(Snapshot.base_model == self.base_model,
                                                                 Snapshot.status == "published")).scalars())
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
            with self.store.session() as s:
                ids = list(s.execute(select(Edit.id).where(Edit.claim_token == self.token,
                                                           Edit.status == EditStatus.CLAIMED.value)).scalars())
                transition(s, ids, EditStatus.CLAIMED, EditStatus.FAILED, actor=self.actor, reason=reason,
                           batch_id=self.batch_id, values={"claim_token": None, "last_error": reason})
                batch = s.get(Batch, self.batch_id)
                if batch is not None and batch.status not in ("published",):
                    batch.status, batch.finished_at, batch.error = "failed", utcnow(), reason
                    batch.metrics = {**(batch.metrics or {}), "timings_s": dict(self.timings)}
                    record_event(s, "batch.failed", actor=self.actor, batch_id=self.batch_id, reason=reason)
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
        self.from_base = bool(getattr(self.editor, "from_base", False))
        self.from_start = self.from_base or self.settings.hypernet_from_consolidation
        with self.store.session(write=False) as s:
            self.parent_id = head_id(s, self.base_model)
            rows = chain(s, self.parent_id)
            self.chain: list[ChainLink] = [link_of(r) for r in rows]
            self.start_len = 0 if self.from_base or not self.from_start else \
                max((i + 1 for i, r in enumerate(rows) if r.kind == "consolidated"), default=0)
            self.start_id = rows[self.start_len - 1].id if self.start_len else None
            self.nights_before = nights_since_consolidation(rows)
            rewritten = set(s.execute(select(Edit.key_hash).where(Edit.id.in_(list(self.edits)))).scalars())
            retained = self._retained_edits(s, [c.id for c in self.chain], rewritten)
            at_start = {e.id for e in self._retained_edits(s, [c.id for c in self.chain[:self.start_len]], set())}
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

    def _open_prefix(self):
        """The gate's prefix cache for the head's weights (horse/prefix.py): what enters the editor's lowest block
        for the texts measured every night, kept from earlier nights when the blocks below are unchanged. None
        when `gate_prefix_cache` is off or the model cannot be replayed."""
        from horse.prefix import PrefixCache

        if not self.settings.gate_prefix_cache:
            return None
        t = time.perf_counter()
        kept = snapshots.read_prefix_cache(self.settings.snapshot_dir, self.base_model)
        rows, meta = kept if kept is not None else (None, {})
        same = all(meta.get(k) == v for k, v in _measured_meta(self.settings).items())
        fingerprint = meta.get("fingerprint") if same else None
        cache = PrefixCache.for_model(self.model, self.editor.module_names, rows, fingerprint)
        if cache is not None and self.scope is not None and not cache.covers(list(self.m.base_weights)):
            cache = None  # a scoped module below the start would make the kept block inputs depend on the scope
        self._timed("prefix", t)
        return cache

    def _scoped(self, ids: Sequence[int]):
        """While inside: the model scoped (config `scope`) to the head's subjects and those of edits `ids`, as it
        would be served with them published; nothing with scope = off."""
        return scoped(self.model, self.tokenizer, self.m.base_weights, self.scope,
                      [self.edits[i].subject for i in ids])

    def _prefix_for(self, deltas):
        """The prefix cache for the head plus `deltas`: None when they change a module below its start (a re-deriving
        night puts back to the start every module the chain touched, which may lie there after an engine switch)."""
        return self.prefix if self.prefix is not None and self.prefix.covers(list(deltas)) else None

    def _keep_prefix(self) -> None:
        """Keep the rows of the prefix cache this night used (derived data: losing it costs a capture)."""
        if self.prefix is None or self.dry_run:
            return
        try:
            snapshots.write_prefix_cache(self.settings.snapshot_dir, self.base_model, self.prefix.to_tensors(),
                                         {**_measured_meta(self.settings), "fingerprint": self.prefix.fingerprint})
        except OSError:
            log.warning("could not keep the gate's prefix cache", exc_info=True)

    def _retained_edits(self, s, chain_ids: Sequence[int], replaced_keys: set[str]) -> list[EditRecord]:
        """Applied edits on the chain the candidate must keep, less those this batch rewrites (same subject and
        prompt): retention is measured against the newest target."""
        if not chain_ids:
            return []
        rows = s.execute(select(Edit).join(SnapshotEdit, SnapshotEdit.edit_id == Edit.id)
                         .where(SnapshotEdit.snapshot_id.in_(list(chain_ids)),
                                Edit.status == EditStatus.APPLIED.value).order_by(Edit.id)).scalars().unique().all()
        return [EditRecord.from_row(r) for r in rows if r.key_hash not in replaced_keys]

    def _supersede_earlier(self, s, final: Sequence[int], snapshot_id: int) -> None:
        """Applied edits of the same subject and prompt as a newly applied one are superseded by it (the newest
        target wins; rollback of the new snapshot makes them applied again, see daemon/rollback.py)."""
        new_by_key = {e.key_hash: e.id for e in s.execute(select(Edit).where(Edit.id.in_(list(final)))).scalars()}
        older = s.execute(select(Edit.id, Edit.key_hash).where(
            Edit.key_hash.in_(list(new_by_key)), Edit.status == EditStatus.APPLIED.value,
            Edit.id.not_in(list(final)))).all()
        if not older:
            return
        links = {old_id: new_by_key[key] for old_id, key in older}
        # no snapshot_id= here: that would move the old edit's snapshot column (it stays on its own snapshot)
        transition(s, sorted(links), EditStatus.APPLIED, EditStatus.SUPERSEDED, actor=self.actor,
                   batch_id=self.batch_id, reason="a newer applied edit of the same subject and prompt replaced it",
                   payload_by_id={o: {"superseded_by": n, "in_snapshot": snapshot_id} for o, n in links.items()})
        s.execute(update(Edit), [{"id": o, "superseded_by_id": n} for o, n in links.items()])

    def _compute(self, ids: Sequence[int]):
        """Deltas for exactly these edits on the head (cached per set). A night that re-derives (`from_start`)
        computes its delta from the start (the base, or the newest consolidated snapshot) over the carried edits
        plus these; the result is kept (`_base_deltas`) for the snapshot, and returned relative to the head for
        the gate."""
        from horse.deltas import check_finite

        key = frozenset(ids)
        if key not in self._delta_cache:
            t = time.perf_counter()
            requests = [to_request(self.edits[i]) for i in sorted(ids)]
            if self.from_start:
                deltas, engine_timings = self._compute_from_start(requests, key)
            else:
                if self.running_normaliser:  # every candidate starts from the head's statistics
                    self.editor.load_normaliser_state(self._normaliser_head)
                deltas, engine_timings = self.editor.compute_deltas(self.model, self.tokenizer, requests)
                if self.running_normaliser:
                    self._normaliser_after[key] = self.editor.normaliser_state()
            for k, v in engine_timings.items():
                if k != "total":
                    self.timings[f"edit_{k}"] = self.timings.get(f"edit_{k}", 0.0) + v
            self._timed("edit", t)
            try:
                check_finite(deltas)
            except Exception as exc:
                raise BatchRefused(f"batch {self.batch_id} refused: {exc}") from exc
            self._delta_cache[key] = deltas
        return self._delta_cache[key]

    def _protect_earlier(self, retained: Sequence[EditRecord]) -> int:
        """`protect_earlier` = ν > 0: the night's solve keeps the edited layers' outputs on the keys of the edits
        the model it edits already carries (ν·KₑᵀKₑ, `Editor.set_protected_keys`). On a chain of nights: the
        head's, captured on its weights for a fixed sample of up to gate.RETENTION_SAMPLE_MAX of them (so the cost
        stays bounded; not the configured gate sample, so that a cheaper gate never protects less). With
        `hypernet_from_consolidation` after a fold: every edit the fold carries, captured once on its weights
        and kept beside it (`_fold_moments`). Returns how many edits were protected."""
        nu = self.settings.protect_earlier
        if not nu or self.from_base or not retained or not hasattr(self.editor, "set_protected_keys"):
            return 0
        redone = {e.id for e in self.carried}  # re-derived with the night's edits, not kept
        if self.start_id is not None:
            earlier = [e for e in retained if e.id not in redone]
            moments = self._fold_moments(earlier) if earlier else None
        else:
            sampled = {f.key for f in gate.sample_retained([to_fact(e) for e in retained])}
            earlier = [e for e in retained if e.id in sampled and e.id not in redone]
            moments = self.editor.requests_second_moments(self.model, self.tokenizer, [to_request(e) for e in earlier],
                                                          chunk_edits=PROTECT_CHUNK) if earlier else None
        if moments is None:
            return 0
        self.editor.set_protected_keys(moments, nu)
        return len(earlier)

    def _fold_moments(self, earlier: Sequence[EditRecord]) -> dict:
        """KₑᵀKₑ per module of the fold's edits that are still applied (`earlier`), on the fold's weights: read
        from beside the fold when kept there for these modules, base and dtype (minus the moments of its edits
        superseded since, captured now), else captured for all of them and kept. `self.protect_source` says
        which."""
        meta = fold_moments_meta(self.settings, self.editor, self.start_id)
        ids = {e.id for e in earlier}
        cached = snapshots.read_derived_cache(self.settings.snapshot_dir, self.base_model, self.start_id,
                                              folder=snapshots.PROTECT_DIR)
        if cached is not None and all(cached[1].get(k) == v for k, v in meta.items()):
            tensors = cached[0]
            kept = set(tensors.pop("edit_ids").tolist())
            if ids <= kept:
                gone = sorted(kept - ids)
                if gone:
                    with self._at_start():
                        minus = self.editor.requests_second_moments(
                            self.model, self.tokenizer, [to_request(e) for e in self.store.get_edits(gone)],
                            chunk_edits=PROTECT_CHUNK)
                    tensors = {n: tensors[n] - minus[n].to(tensors[n]) for n in tensors}
                self.protect_source = "cache"
                return tensors
        with self._at_start():
            moments = keep_fold_moments(self.settings, self.editor, self.model, self.tokenizer, self.start_id, earlier)
        self.protect_source = "captured"
        return moments

    @contextlib.contextmanager
    def _at_start(self) -> Iterator[None]:
        """With `from_start`, the model at the start weights (the base, or the newest consolidated snapshot) in
        every module the chain or the engine touches, and the head's put back after; else as it is."""
        import torch

        from horse.arch import get_module

        if not self.from_start:
            yield
            return
        modules = {n: get_module(self.model, n) for n in sorted(self.m.base_weights)}
        with torch.no_grad():
            heads = {n: m.weight.detach().clone() for n, m in modules.items()}
            try:
                self.m.reset_to_start()
                yield
            finally:
                for n, m in modules.items():
                    m.weight.copy_(heads[n])

    def _start_normaliser(self) -> None:
        """`running_normaliser`: continue from the statistics saved beside the head snapshot (or the training
        ones); each computed candidate's merged statistics are kept, the published one's are saved."""
        self.running_normaliser = (self.settings.running_normaliser and not self.from_start
                                   and hasattr(self.editor, "normaliser_state"))
        if not self.running_normaliser:
            return
        state = snapshots.read_normaliser(self.settings.snapshot_dir, self.chain[-1].path) if self.chain else None
        if state is not None:
            self.editor.load_normaliser_state(state)
        self.editor.update_normaliser = True
        self._normaliser_head = self.editor.normaliser_state()
        self._normaliser_after: dict[frozenset[int], dict] = {}

    def _uses_sums(self) -> bool:
        """A re-deriving night with an editor whose statistics add up (`horse.sums`): a night captures only its
        own edits and adds them to the carried edits' statistics (cached beside the head snapshot)."""
        return bool(getattr(self.editor, "sums_supported", False))

    def _sums_metadata(self, edit_ids: Sequence[int]) -> dict[str, str]:
        return {"hypernet_fingerprint": self.hypernet_fingerprint, "base_fingerprint": self.editor.fingerprint,
                "dtype": self.settings.dtype, "start": "base" if self.start_id is None else f"snapshot {self.start_id}",
                "edits_sha256": hashlib.sha256(json.dumps(sorted(edit_ids)).encode()).hexdigest(),
                "n_edits": str(len(edit_ids))}

    def _carried_sums_at_start(self):
        """The carried edits' statistics: the head's cached ones when they are of exactly these edits, this
        hypernet, base and start; else captured now (the model must be at the start). None when nothing is
        carried."""
        from horse.sums import EditSums

        if self._carried_sums is not None or not self.carried:
            return self._carried_sums
        ids = [e.id for e in self.carried]
        cached = snapshots.read_derived_cache(self.settings.snapshot_dir, self.base_model, self.parent_id) \
            if self.parent_id is not None else None
        if cached is not None and all(cached[1].get(k) == v for k, v in self._sums_metadata(ids).items()):
            self._carried_sums, self.sums_source = EditSums.from_tensors(cached[0]), "cache"
        else:  # a rewritten (superseded) edit, a rollback, another hypernet, or no cache: capture them all again
            self._carried_sums = self.editor.edit_sums(self.model, self.tokenizer, [to_request(e) for e in self.carried])
            self.sums_source = "captured"
        return self._carried_sums

    def _sums_with_carried(self, requests, timings: dict[str, float]):
        """The carried edits' statistics plus those of `requests`, captured now (the model must be at the start);
        the seconds of each part go to `timings` (sums_carried, sums_new)."""
        t = time.perf_counter()
        carried = self._carried_sums_at_start()
        timings["sums_carried"] = time.perf_counter() - t
        sums = self.editor.edit_sums(self.model, self.tokenizer, requests)
        timings["sums_new"] = time.perf_counter() - t - timings["sums_carried"]
        return sums if carried is None else carried + sums

    def _start_edit(self, requests, key: frozenset[int]):
        """The engine's start-relative deltas of every carried edit plus `requests` (the model is at the start)."""
        def one_batch():
            return self.editor.compute_deltas(self.model, self.tokenizer,
                                              [to_request(e) for e in self.carried] + list(requests))

        if not self._uses_sums():
            return one_batch()
        timings: dict[str, float] = {}
        sums = self._sums_with_carried(requests, timings)
        self._last_sums = (key, sums)
        k, v = self.editor.shapes_KV[0]
        if not self.carried and sums.n_tokens * (k + v) < k * v:
            # a first night's few edits: one batch of them, kept factored (smaller files); with carried edits the
            # batch would capture all of them again, which the cached sums spare (nights 2–3 after a fold: 5–9 s)
            deltas, engine_timings = one_batch()
            return deltas, {**engine_timings, **timings}
        t = time.perf_counter()
        deltas = self.editor.deltas_from_sums(sums)
        return deltas, {**timings, "solve": time.perf_counter() - t}

    def _final_sums(self, final: Sequence[int]):
        """The published set's statistics (None without sums): the newest candidate's, or captured again when
        bisection published another set (the model must be at the start)."""
        if not self._uses_sums():
            return None
        if self._last_sums is not None and self._last_sums[0] == frozenset(final):
            return self._last_sums[1]
        return self._sums_with_carried([to_request(self.edits[i]) for i in sorted(final)], {})

    def _compute_from_start(self, requests, key: frozenset[int]):
        """Run the engine on the start weights (the head's are put back after) for the carried edits plus
        `requests`, keep its start-relative deltas and return them relative to the head: start + Δ − head, dense."""
        import torch

        from horse.arch import get_module, module_weight_KV
        from horse.deltas import LayerDelta

        # every module the head's chain touched goes back to the start, not only the engine's (a ledger may have
        # switched engines): the engine sees the start model, and the candidate is exactly start + Δ
        modules = {n: get_module(self.model, n) for n in sorted(self.m.base_weights)}
        with self._at_start():
            start_deltas, timings = self._start_edit(requests, key)
            start_KV = {n: module_weight_KV(m).detach().float().cpu().clone() for n, m in modules.items()}
        with torch.no_grad():
            relative = {}
            for n, m in modules.items():
                change_KV = start_KV[n] - module_weight_KV(m).detach().float().cpu()
                if n in start_deltas:
                    change_KV = change_KV + start_deltas[n].to_dense().cpu()
                if n in start_deltas or bool(change_KV.any()):
                    relative[n] = LayerDelta(dense_KV=change_KV)
        self._base_deltas[id(relative)] = start_deltas
        return relative, timings

    def _settle(self, ids: list[int]) -> list[int]:
        """Step 4: compute, verify each edit took, drop those that did not, recompute; until all take."""
        from horse.deltas import apply_deltas

        active = list(ids)
        while active:
            deltas = self._compute(active)
            t = time.perf_counter()
            with apply_deltas(self.model, deltas), self._scoped(active):
                eff = gate.efficacy(self.model, self.tokenizer, [to_fact(self.edits[i]) for i in active],
                                    prefix=self._prefix_for(deltas))
            self._timed("verify", t)
            self.efficacy.update(eff)
            low = [i for i in active if not eff[i]["efficacy"] >= self.settings.gate_min_efficacy]
            if not low:
                break
            for i in low:
                e = eff[i]
                para = "" if e["paraphrase_acc"] != e["paraphrase_acc"] else f", paraphrases {e['paraphrase_acc']:.2f}"
                self.failed[i] = (f"did not take: efficacy {e['efficacy']:.3f} < gate_min_efficacy "
                                  f"{self.settings.gate_min_efficacy} (prompt {e['prompt_acc']:.2f}{para})")
                self.failed_payload[i] = {"efficacy": e, "batch_size": len(active)}
            log.info("%d of %d edits did not take; recomputing without them", len(low), len(active),
                     extra={"failed_ids": low[:50]})
            active = [i for i in active if i not in set(low)]
        return active

    def _verdict(self, ids: Sequence[int]) -> gate.Verdict:
        from horse.deltas import apply_deltas

        key = frozenset(ids)
        if key not in self._verdict_cache:
            deltas = self._compute(ids)
            with apply_deltas(self.model, deltas), self._scoped(ids):
                cand = gate.measure(self.model, self.tokenizer, self.probe, prefix=self._prefix_for(deltas))
                norms = self.m.layer_norms()
            verdict = gate.judge(self.head_measure, cand, self.probe, self.settings, layer_norms=norms)
            verdict.metrics["layer_norms"] = norms
            self._verdict_cache[key] = verdict, cand
        return self._verdict_cache[key][0]

    @staticmethod
    def _log_entry(ids: Sequence[int], verdict: gate.Verdict, depth: int) -> dict[str, Any]:
        keep = ("canary_agreement", "protected_flip_share", "protected_flipped", "retention", "delta_norm_max")
        return {"depth": depth, "edit_ids": sorted(ids), "passed": verdict.passed, "reasons": verdict.reasons,
                **{k: verdict.metrics.get(k) for k in keep}}

    def _bisect(self, ids: list[int], depth: int, level: int) -> tuple[dict[int, gate.Verdict], list[list[int]]]:
        """Split a failing set in halves until groups pass or the depth runs out. Returns (bad, good groups)."""
        verdict = self._verdict(ids)
        if level > 0:
            self.bisect_log.append(self._log_entry(ids, verdict, depth=level))
        if verdict.passed:
            return {}, [ids]
        if depth <= 0 or len(ids) == 1:
            return {i: verdict for i in ids}, []
        half = len(ids) // 2
        bad_a, good_a = self._bisect(ids[:half], depth - 1, level + 1)
        bad_b, good_b = self._bisect(ids[half:], depth - 1, level + 1)
        return {**bad_a, **bad_b}, good_a + good_b

    def _bisect_and_combine(self, active: list[int]) -> tuple[list[int], gate.Verdict | None]:
        bad, groups = self._bisect(active, self.settings.gate_bisect_depth, 0)
        for i, v in bad.items():
            group = sorted(j for j in bad if bad[j] is v)
            self.rejected[i] = (f"gate: {'; '.join(v.reasons)} (isolated by bisection in a group of {len(group)} "
                                f"edits: {group[:20]})")[:1900]
            self.rejected_payload[i] = {"gate": {k: v.metrics.get(k) for k in (
                "canary_agreement", "protected_flip_share", "protected_flipped", "retention", "retention_lost",
                "delta_norm_max")}, "group": group[:100]}
        # Groups that pass alone are combined largest first; a group that breaks the union is retried later.
        accepted: list[int] = []
        verdict: gate.Verdict | None = None
        for group in sorted(groups, key=len, reverse=True):
            trial = sorted(accepted + group)
            v = self._verdict(trial)
            if trial != sorted(group):
                self.bisect_log.append(self._log_entry(trial, v, depth=-1))
            if v.passed:
                accepted, verdict = trial, v
            else:
                for i in group:
                    self.failed[i] = ("passed the gate alone but not together with the rest of the batch "
                                      f"({'; '.join(v.reasons)}); retried in a later batch")[:1900]
                    self.failed_payload[i] = {"gate": {k: v.metrics.get(k) for k in ("canary_agreement",
                                              "protected_flip_share", "retention")}}
        if accepted and accepted != sorted(active):
            # The published subset gets its own deltas: check again that each of its edits takes.
            settled = self._settle(accepted)
            if settled != accepted:
                verdict = self._verdict(settled) if settled else None
                if verdict is not None and not verdict.passed:
                    for i in settled:
                        self.failed[i] = f"gate failed after bisection: {'; '.join(verdict.reasons)}"[:1900]
                    settled, verdict = [], None
            accepted = settled
        log.info("bisection: %d rejected, %d to publish", len(bad), len(accepted))
        return accepted, verdict

    # ------------------------------------------------------------------ writes
    def _batch_metrics(self, verdict: gate.Verdict | None, final: Sequence[int]) -> dict[str, Any]:
        self.timings["total"] = time.perf_counter() - self.t0
        return {
            "head_snapshot_id": self.parent_id,
            "head": gate.baseline_metrics(self.head_measure, self.probe, self.settings),
            "gate": verdict.metrics if verdict is not None else None,
            "bisect": self.bisect_log,
            "efficacy": {str(k): v for k, v in sorted(self.efficacy.items())},
            "efficacy_mean": (sum(self.efficacy[i]["efficacy"] for i in final) / len(final)) if final else None,
            "efficacy_generated_mean": (sum(self.efficacy[i]["generated"] for i in final) / len(final)) if final else None,
            "n_claimed": len(self.edits), "n_applied": len(final), "n_failed": len(self.failed),
            "n_rejected": len(self.rejected),
            "hypernet_fingerprint": self.hypernet_fingerprint,
            "prefix_cache": None if self.prefix is None else {"reused": self.prefix.hits,
                                                              "captured": self.prefix.captured},
            "timings_s": {k: round(v, 4) for k, v in self.timings.items()},
        }

    def _result(self, status: str, final: Sequence[int], verdict: gate.Verdict | None, **kw: Any) -> BatchResult:
        return BatchResult(status=status, batch_id=self.batch_id, parent_snapshot_id=self.parent_id,
                           applied=sorted(final), failed=dict(self.failed), rejected=dict(self.rejected),
                           metrics=self._batch_metrics(verdict, final), timings_s=dict(self.timings), **kw)

    def _move_unpublished(self, s) -> None:
        for i, reason in sorted(self.failed.items()):
            transition(s, [i], EditStatus.CLAIMED, EditStatus.FAILED, actor=self.actor, reason=reason,
                       batch_id=self.batch_id, payload=self.failed_payload.get(i),
                       values={"claim_token": None, "last_error": reason})
        for i, reason in sorted(self.rejected.items()):
            transition(s, [i], EditStatus.CLAIMED, EditStatus.REJECTED, actor=self.actor, reason=reason,
                       batch_id=self.batch_id, payload=self.rejected_payload.get(i),
                       values={"claim_token": None, "last_error": reason})

    def _finish_without_snapshot(self, verdict: gate.Verdict | None) -> BatchResult:
        status = "rejected" if self.rejected else "failed"
        result = self._result(status, [], verdict)
        with self.store.session() as s:
            self._move_unpublished(s)
            batch = s.get(Batch, self.batch_id)
            batch.status, batch.finished_at, batch.metrics = status, utcnow(), result.metrics
            batch.error = f"nothing published: {len(self.failed)} failed, {len(self.rejected)} rejected"
            record_event(s, f"batch.{status}", actor=self.actor, batch_id=self.batch_id, reason=batch.error)
        log.warning("batch published nothing", extra={"n_failed": len(self.failed), "n_rejected": len(self.rejected)})
        return result

    def _publish(self, final: list[int], deltas, verdict: gate.Verdict | None) -> BatchResult:
        from horse.deltas import add_deltas_, frobenius_norms

        t = time.perf_counter()
        if self.from_start:
            # from the base: a snapshot of the base (kind "consolidated", parent none); from the newest consolidated
            # snapshot: a night whose parent is that snapshot; either lists every edit it adds to its parent
            written, parent = self._base_deltas[id(deltas)], self.start_id
            kind = "consolidated" if self.from_base else "incremental"
            carried = sorted({e.id for e in self.carried} | set(final))
            self.m.reset_to_start()
            final_sums = self._final_sums(final)  # at the start, before the new deltas go in
            chain_length = self.start_len + 1
        else:
            written, parent, kind, carried = deltas, self.parent_id, "incremental", list(final)
            final_sums = None
            chain_length = len(self.chain) + 1
        add_deltas_(self.model, written)  # the model now is exactly what materialising the new snapshot gives
        touched = sorted(set(self.m.base_weights) | set(written))
        norms = self.m.layer_norms()
        digest = weights_digest(self.model, touched)
        metadata = snapshots.snapshot_metadata(
            base_model=self.base_model, base_fingerprint=self.editor.fingerprint,
            hypernet_fingerprint=self.hypernet_fingerprint, parent_snapshot_id=parent,
            batch_id=self.batch_id, edit_ids=carried, kind=kind)
        stem = f"b{self.batch_id:06d}-{self.token[:8]}"
        file = snapshots.write_snapshot(self.settings.snapshot_dir, self.base_model, stem, written, metadata,
                                        on_stage=self._stage)
        if self.running_normaliser:  # before the commit: a crash leaves an orphan that `_recover` removes
            snapshots.write_normaliser(self.settings.snapshot_dir, file.rel_path,
                                       self._normaliser_after[frozenset(final)])
        t = self._timed("write", t)
        self._stage("written")
        result = self._result("published", final, verdict, snapshot_path=file.rel_path, snapshot_bytes=file.bytes)
        snap_metrics = {
            "gate": verdict.metrics if verdict is not None else None,
            "head": result.metrics["head"],
            "efficacy_mean": result.metrics["efficacy_mean"],
            "efficacy_generated_mean": result.metrics["efficacy_generated_mean"],
            "n_edits": len(final), "bytes_per_edit": file.bytes / len(final),
            "layer_norms": norms, "cumulative_norm_max": max(norms.values()) if norms else 0.0,
            "batch_delta_norms": frobenius_norms(written),
            "delta_layers": {n: ("factored" if d.is_factored else "dense") for n, d in written.items()},
            "weights_sha256": digest, "weights_modules": touched,
            "base_fingerprint": self.editor.fingerprint, "hypernet_fingerprint": self.hypernet_fingerprint,
            "engine": self.settings.engine, "chain_length": chain_length, "protected_edits": self.protected,
            "protected_source": self.protect_source,
            "nights_since_consolidation": 0 if kind == "consolidated" else self.nights_before + 1,
        }
        if self.running_normaliser:
            snap_metrics["normaliser_rows"] = {k: float(v) for k, v in self._normaliser_after[frozenset(final)].items()
                                               if k.endswith(".count")}
        if self.from_start:
            snap_metrics.update(n_carried=len(carried), engine_run=getattr(self.editor, "last_run", None),
                                carried_sums=self.sums_source)
        with self.store.session() as s:
            current = head_id(s, self.base_model)
            if current != self.parent_id:
                raise DaemonError(f"the head of {self.base_model} moved from {self.parent_id} to {current} during "
                                  f"batch {self.batch_id}; nothing was published, the batch will be retried")
            snap = Snapshot(parent_id=parent, batch_id=self.batch_id, base_model=self.base_model,
                            kind=kind, path=file.rel_path, sha256=file.sha256, bytes=file.bytes,
                            created_at=utcnow(), status="published", metrics=snap_metrics)
            s.add(snap)
            s.flush()
            s.execute(insert(SnapshotEdit), [{"snapshot_id": snap.id, "edit_id": i} for i in carried])
            set_head(s, self.base_model, snap.id, actor=self.actor, reason=f"batch {self.batch_id} published")
            transition(s, final, EditStatus.CLAIMED, EditStatus.APPLIED, actor=self.actor, batch_id=self.batch_id,
                       snapshot_id=snap.id, values={"claim_token": None, "last_error": None},
                       payload_by_id={i: {"efficacy": self.efficacy.get(i)} for i in final})
            self._supersede_earlier(s, final, snap.id)
            self._move_unpublished(s)
            batch = s.get(Batch, self.batch_id)
            batch.status, batch.finished_at = "published", utcnow()
            self._timed("commit", t)
            result.metrics = self._batch_metrics(verdict, final)
            result.metrics["snapshot_id"] = snap.id
            batch.metrics = result.metrics
            record_event(s, "snapshot.published", actor=self.actor, batch_id=self.batch_id, snapshot_id=snap.id,
                         payload={"parent": self.parent_id, "path": file.rel_path, "sha256": file.sha256,
                                  "bytes": file.bytes, "n_edits": len(final)})
            record_event(s, "batch.published", actor=self.actor, batch_id=self.batch_id, snapshot_id=snap.id,
                         payload={"n_applied": len(final), "n_failed": len(self.failed),
                                  "n_rejected": len(self.rejected)})
            snapshot_id = snap.id
        result.snapshot_id = snapshot_id
        try:  # derived data, after the commit: a crash here only costs the next materialisation some time
            from horse.arch import get_module
            snapshots.write_weights_cache(self.settings.snapshot_dir, self.base_model, snapshot_id,
                                          {n: get_module(self.model, n).weight for n in touched})
            measured = self._verdict_cache.get(frozenset(final), (None, None))[1]
            if measured is not None:  # the weights the gate measured are the published ones (up to rounding)
                keep_measurements(self.settings, self.base_model, snapshot_id, file.sha256,
                                  gate.Known().add(self.probe, measured).add_efficacy(
                                      [to_fact(self.edits[i]) for i in final], self.efficacy))
            if final_sums is not None:
                t = time.perf_counter()
                snapshots.write_derived_cache(self.settings.snapshot_dir, self.base_model, snapshot_id,
                                              final_sums.to_tensors(), self._sums_metadata(carried))
                self._timed("write_sums", t)
        except OSError:
            log.warning("could not write the weights or sums cache of snapshot %d", snapshot_id, exc_info=True)
        result.timings_s = dict(self.timings)
        with log_context(snapshot_id=snapshot_id):
            log.info("published snapshot %d: %d applied, %d failed, %d rejected", snapshot_id, len(final),
                     len(self.failed), len(self.rejected), extra={"bytes": file.bytes})
            self._stage("published")
        return result
