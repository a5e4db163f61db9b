"""Consolidation (issue 6): re-derive the head from the base model by one edit of every edit it carries.

HORSE is at its best as one mass edit, while a nightly daemon stacks many small ones. `consolidate` takes every
edit that is applied on the head's chain, computes their deltas in ONE engine call on the unedited base model
(the ridge solve picks its cheaper form; the capture runs in LM mini-batches, so memory grows with the answer
tokens, not with the number of snapshots), and runs the candidate through the same gate as a batch — canary
agreement and protected facts against the head, retention of every carried edit (all of them, not a sample).
If it passes it is published like a batch's snapshot (temp file, fsync, rename; then one transaction) as a
snapshot of kind "consolidated" whose parent is the base and which lists every edit it carries; the head
moves to it. The edits stay `applied`; the snapshots it folded stay on disk, so `rollback` to any of them
still materialises base + their own chain, bit for bit. If the gate fails nothing changes and the
measurements are recorded on a `consolidation.rejected` event.

When the nights derive from the newest fold and protect its edits (`hypernet_from_consolidation` with
`protect_earlier`), the fold captures its edits' keys on its own weights once it is published and keeps them
beside it, so that cost is the fold's, not the next night's.

With `finetune_warm_start` a fine-tune fold starts from the newest fine-tune fold on the chain (when it is the
chain's first snapshot, of the same modules, and all its edits are still applied) and trains only what those
weights do not recall, plus a rehearsal of what they do (`horse.finetune`); the gate is the same, and takes the
answer-token accuracy of every carried edit on the fold's weights from the fine-tune's last scan instead of
measuring it again (the canary, protected facts and generations it measures itself), and the protected keys
of its edits are replayed from the block inputs those scans captured. The scans are captured before the head is
measured, and the head's accuracy on every carried edit is replayed from them too (the head differs from the base
only in the blocks the fine-tune trains; checked weight by weight, else it is measured by forward passes).

Which engine (config): `consolidate_engine` when set, else `engine`. `finetune` makes the hybrid: HORSE nights
(`hypernet_from_base = false`; on the head, or with `hypernet_from_consolidation` each one edit of every edit
since the newest fold, on the fold's weights), and every fold a fine-tune of the whole ledger from the base.

When (config): every `consolidate_every_nights` published nights since the last consolidation (or the base), when
the chain is longer than `consolidate_max_chain` snapshots, or when the last night's retention fell below
`consolidate_min_retention`; `run_batch` checks after each published batch, `horse-ledger consolidate` runs it by
hand.

    result = consolidate(settings, store, reason="by hand")     # ConsolidationResult; .to_dict() for JSON
"""
from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from daemon import gate, snapshots
from daemon.batch import ACTOR, keep_measurements, kept_measurements, probe_for, to_fact, to_request
from daemon.engines import keep_fold_moments, load_engine
from daemon.errors import BatchRefused
from daemon.locks import applier_lock
from daemon.materialise import chain, head_id, links, load_base, materialise, scope_index, scoped, weights_digest
from horse.progress import log_stage
from ledger import chain as ledger_chain
from ledger.config import Settings
from ledger.models import Snapshot
from ledger.store import Store

log = logging.getLogger(__name__)


@dataclass
class ConsolidationResult:
    """`status`: nothing (head is base or already one consolidated snapshot) | published | rejected."""

    status: str
    reason: str = ""
    engine: str = ""
    from_snapshot: int | None = None
    snapshot_id: int | None = None
    n_edits: int = 0
    chain_length: int = 0
    gate: dict[str, Any] = field(default_factory=dict)
    gate_reasons: list[str] = field(default_factory=list)
    head: dict[str, Any] = field(default_factory=dict)  # what the head it replaces scores (`gate.baseline_metrics`)
    bytes: int | None = None
    warm_from: int | None = None     # the fold a `finetune_warm_start` fold started from
    trained: int | None = None       # edits it trained on (not recalled there, and the rehearsal)
    timings_s: dict[str, float] = field(default_factory=dict)
    engine_timings_s: dict[str, float] = field(default_factory=dict)  # the engine's own (e.g. scan, train)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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


def consolidation_due(settings: Settings, store: Store) -> str | None:
    """Why the head's chain should be folded now (the config's policy), or None."""
    with store.session(write=False) as s:
        snaps = chain(s, head_id(s, settings.model))
        n_chain = len(snaps)
        nights = nights_since_consolidation(snaps)
        retention = ((snaps[-1].metrics or {}).get("gate") or {}).get("retention") if snaps else None
    if not snaps or (n_chain == 1 and snaps[0].kind == "consolidated"):  # nothing to fold
        return None
    if settings.consolidate_max_chain and n_chain > settings.consolidate_max_chain:
        return f"chain of {n_chain} snapshots > consolidate_max_chain {settings.consolidate_max_chain}"
    if settings.consolidate_every_nights and nights >= settings.consolidate_every_nights:
        return f"{nights} nights since the last consolidation ≥ consolidate_every_nights {settings.consolidate_every_nights}"
    if settings.consolidate_min_retention and retention is not None and retention < settings.consolidate_min_retention:
        return f"retention {retention:.3f} < consolidate_min_retention {settings.consolidate_min_retention}"
    return None


def consolidation_settings(settings: Settings) -> Settings:
    """The settings a consolidation edits with: `engine` replaced by `consolidate_engine` when that is set."""
    if settings.consolidate_engine in ("", settings.engine):
        return settings
    return replace(settings, engine=settings.consolidate_engine)


@dataclass(frozen=True)
class _FirstLink:
    """What a warm start needs to know of the chain's first snapshot (read inside the session)."""

    id: int
    path: str
    sha256: str
    fold_engine: str | None       # the engine of a consolidated snapshot, None for a night's
    base_fingerprint: str | None
    modules: tuple[str, ...]
    gone: int | None              # an edit it carries that is neither applied nor superseded

    @classmethod
    def of(cls, s, snap: Snapshot) -> _FirstLink:
        metrics = snap.metrics or {}
        gone = ledger_chain.first_unkept_edit(s, snap.id)
        return cls(snap.id, snap.path, snap.sha256, metrics.get("engine") if snap.kind == "consolidated" else None,
                   metrics.get("base_fingerprint"), tuple(sorted(metrics.get("weights_modules") or ())), gone)


def warm_start(settings: Settings, first: _FirstLink | None, editor) -> tuple[Any, int | None]:
    """The deltas a `finetune_warm_start` fold starts from, and that fold's id: the chain's first snapshot when it
    is a fine-tune fold of the same modules of the same base and every edit it carries is still applied (or
    superseded by a newer one, which the fold then trains). (None, None) otherwise: the fold starts from the base."""
    why = None
    if first is None or first.fold_engine != "finetune":
        why = "the chain does not start at a fine-tune fold"
    elif first.base_fingerprint != editor.fingerprint or first.modules != tuple(sorted(editor.module_names)):
        why = f"the newest fold (snapshot {first.id}) changed other modules or another base"
    elif first.gone is not None:
        why = f"edit {first.gone} of the newest fold (snapshot {first.id}) is no longer applied"
    if why:
        log.info("fold from the base: %s", why)
        return None, None
    deltas, _ = snapshots.read_snapshot(settings.snapshot_dir, first.path, sha256=first.sha256)
    return deltas, first.id


def consolidate(settings: Settings, store: Store, *, actor: str = ACTOR, reason: str = "by hand") -> ConsolidationResult:
    """Fold the head's chain into one snapshot re-derived from the base (see the module docstring).

    Raises:
        ApplierBusy: a batch is running on this model.
        BatchRefused: the deltas hold NaN / Inf (nothing is written).
    """
    from horse.arch import get_module
    from horse.deltas import add_deltas_, apply_deltas, check_finite, frobenius_norms

    base_model = settings.model
    timings: dict[str, float] = {}
    t0 = t = time.perf_counter()

    def timed(key: str) -> None:
        nonlocal t
        now = time.perf_counter()
        timings[key] = round(now - t, 4)
        t = now
        log_stage(log, f"fold: {key} done", seconds=timings[key], elapsed_s=round(now - t0, 1), edits=len(edits))

    with applier_lock(settings, base_model):
        with store.session(write=False) as s:
            head = head_id(s, base_model)
            snaps = chain(s, head)
            chain_links = links(s, head)
            edits = ledger_chain.applied_edits_on(s, [x.id for x in snaps])
            n_chain = len(snaps)
            already = n_chain == 1 and snaps[0].kind == "consolidated"
            first = _FirstLink.of(s, snaps[0]) if snaps else None
        result = ConsolidationResult("nothing", reason=reason, from_snapshot=head, n_edits=len(edits),
                                     chain_length=n_chain)
        if head is None or not edits or already:
            log.info("nothing to consolidate", extra={"head": head, "chain_length": n_chain})
            return result

        # one edit of every carried edit, from the unedited base
        log_stage(log, "fold: started", edits=len(edits), chain_length=n_chain, head=head)
        model, tokenizer = load_base(settings)
        fold = consolidation_settings(settings)
        result.engine = fold.engine
        editor, engine_fingerprint = load_engine(fold, model, tokenizer)
        # the nights after this fold protect its edits' keys on its weights: captured here, once, and kept beside it
        night_editor = None
        if settings.protect_earlier and settings.hypernet_from_consolidation and settings.engine == "hypernet":
            night_editor = editor if fold.engine == settings.engine else load_engine(settings, model, tokenizer)[0]
        normaliser = None
        if settings.running_normaliser and editor.carries_normaliser:  # the head's statistics, carried on
            normaliser = snapshots.read_normaliser(settings.snapshot_dir, chain_links[-1].path)
            if normaliser is not None:
                editor.load_normaliser_state(normaliser)
        init, warm_from = None, None
        if settings.finetune_warm_start and fold.engine == "finetune":
            init, warm_from = warm_start(settings, first, editor)
        requests = [to_request(e) for e in edits]
        timed("load")

        # the head as it is served, measured once; a warm fine-tune captures its scans' block inputs first, and the
        # head's accuracy on every carried edit is replayed from them (its blocks below the fine-tuned ones are the
        # base's), so only the canary, protected facts and generation sample take forward passes
        facts = [to_fact(e) for e in edits]
        probe = probe_for(settings, store, facts, sample=False)
        head_m = materialise(settings, chain_links)
        known = kept_measurements(settings, base_model, head, chain_links[-1].sha256) or gate.Known()
        if init is not None:
            editor.prepare_scans(model, tokenizer, requests)
            replayed_acc = editor.scan_accuracy(head_m.model, model)
            if replayed_acc is not None:
                known.add_accuracy(facts, replayed_acc)
        index = scope_index(settings, tokenizer, [e.subject for e in edits])  # config `scope`: served scoped
        with scoped(head_m.model, head_m.tokenizer, head_m.base_weights, index):
            head_measure = gate.measure(head_m.model, head_m.tokenizer, probe, known=known)
        result.head = gate.baseline_metrics(head_measure, probe, settings)
        del head_m
        timed("measure_head")

        deltas, engine_timings = (editor.compute_deltas(model, tokenizer, requests, init=init) if init is not None
                                  else editor.compute_deltas(model, tokenizer, requests))
        result.engine_timings_s = {k: round(v, 4) for k, v in engine_timings.items()}
        if init is not None:
            result.warm_from = warm_from
            result.trained = int(editor.last_run.get("trained", len(edits)))
        try:
            check_finite(deltas)
        except Exception as exc:
            raise BatchRefused(f"consolidation of {len(edits)} edits refused: {exc}") from exc
        timed("edit")
        norms = frobenius_norms(deltas)
        scanned = gate.Known()  # a warm fine-tune's last scan measured every carried edit on these weights
        if init is not None:
            scanned.add_accuracy(facts, editor.last_accuracy)
        base = {n: get_module(model, n).weight.detach().clone() for n in deltas} if index is not None else {}
        # (the fold is from the base: its modules' weights now are the base's)
        with apply_deltas(model, deltas), scoped(model, tokenizer, base, index):
            cand = gate.measure(model, tokenizer, probe, known=scanned)
        verdict = gate.judge(head_measure, cand, probe, settings, layer_norms=norms)
        result.gate, result.gate_reasons = verdict.metrics, list(verdict.reasons)
        timed("gate")
        if not verdict.passed:
            result.status = "rejected"
            ledger_chain.record_fold_rejected(store, head=head, reason=f"{reason}; gate: {'; '.join(verdict.reasons)}",
                                              payload={"n_edits": len(edits), "gate": verdict.metrics}, actor=actor)
            log.warning("consolidation rejected by the gate: %s", "; ".join(verdict.reasons))
            result.timings_s = timings
            return result

        # publish: file first (durable, unreferenced until the commit), then one transaction
        add_deltas_(model, deltas)
        touched = sorted(deltas)
        ids = [e.id for e in edits]
        metadata = snapshots.snapshot_metadata(
            base_model=base_model, base_fingerprint=editor.fingerprint, hypernet_fingerprint=engine_fingerprint,
            parent_snapshot_id=None, batch_id=None, edit_ids=ids, kind="consolidated")
        file = snapshots.write_snapshot(settings.snapshot_dir, base_model, f"c{head:06d}-{uuid.uuid4().hex[:8]}",
                                        deltas, metadata)
        if normaliser is not None:
            snapshots.write_normaliser(settings.snapshot_dir, file.rel_path, normaliser)
        timed("write")
        snap_metrics = {
            "gate": verdict.metrics, "n_edits": len(ids), "bytes_per_edit": file.bytes / len(ids),
            "layer_norms": norms, "cumulative_norm_max": max(norms.values()) if norms else 0.0,
            "batch_delta_norms": norms, "weights_sha256": weights_digest(model, touched), "weights_modules": touched,
            "base_fingerprint": editor.fingerprint, "hypernet_fingerprint": engine_fingerprint,
            "chain_length": 1, "consolidated_from": head, "consolidation_reason": reason, "engine": fold.engine,
            **({"warm_from": result.warm_from, "trained": result.trained} if result.warm_from is not None else {}),
        }
        result.snapshot_id = ledger_chain.publish_fold(
            store, expected_head=head, snapshot=ledger_chain.NewSnapshot(
                parent_id=None, base_model=base_model, kind="consolidated", path=file.rel_path, sha256=file.sha256,
                bytes=file.bytes, metrics=snap_metrics, carried=ids),
            reason=reason, chain_length=n_chain, actor=actor)
        timed("commit")
        if night_editor is not None:
            try:  # a warm fine-tune replays them from the block inputs its scans captured (model: the fold's weights)
                replayed = editor.scan_key_moments(model, night_editor.module_names) if init is not None else None
                keep_fold_moments(settings, night_editor, model, tokenizer, result.snapshot_id, edits, moments=replayed)
            except Exception:  # noqa: BLE001 - derived data: the next night captures them itself
                log.warning("could not capture the fold's protected keys", exc_info=True)
            timed("protect_keys")
        keep_measurements(settings, base_model, result.snapshot_id, file.sha256, gate.Known().add(probe, cand))
        result.status, result.bytes = "published", file.bytes
        timings["total"] = round(time.perf_counter() - t0, 4)
        result.timings_s = timings
    log.info("consolidated", extra={"snapshot_id": result.snapshot_id, "from": head, "n_edits": len(ids)})
    return result
