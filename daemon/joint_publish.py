"""The joint night's publish stage (step 6 of daemon/cycle.py): the delta file first (atomic), then ONE transaction
in the ledger (`ledger.chain.publish_joint_night`: snapshot row, its edits, the head, edits claimed → applied /
failed / rejected, the batch row with every measurement, events), then the derived caches; or, when nothing
passed, the edits settled and the batch rejected or failed (`ledger.chain.finish_joint_night`). A mixin of
`daemon.joint_night.JointNight`.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

from daemon import gate, snapshots
from daemon.batch import BatchResult, keep_measurements, to_fact
from daemon.logs import log_context
from daemon.materialise import weights_digest
from ledger import chain as ledger_chain
from ledger.batch_status import BatchStatus
from ledger.chain import NightOutcome

log = logging.getLogger("daemon.cycle")


class PublishStages:
    """_publish, _finish_without_snapshot, and the result and metrics they record."""

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
    def _outcome(self, final: Sequence[int] = ()) -> NightOutcome:
        """What the night decided for its claimed edits, for the ledger (applied ones carry their efficacy)."""
        payloads = {**{i: p for i, p in self.failed_payload.items() if i in self.failed},
                    **{i: p for i, p in self.rejected_payload.items() if i in self.rejected},
                    **{i: {"efficacy": self.efficacy.get(i)} for i in final}}
        return NightOutcome(applied=list(final), failed=dict(self.failed), rejected=dict(self.rejected),
                            payloads=payloads)

    def _finish_without_snapshot(self, verdict: gate.Verdict | None) -> BatchResult:
        status = BatchStatus.REJECTED if self.rejected else BatchStatus.FAILED
        result = self._result(status.value, [], verdict)
        ledger_chain.finish_joint_night(
            self.store, batch_id=self.batch_id, outcome=self._outcome(), status=status, batch_metrics=result.metrics,
            reason=f"nothing published: {len(self.failed)} failed, {len(self.rejected)} rejected", actor=self.actor)
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
            snap_metrics.update(n_carried=len(carried), engine_run=self.editor.last_run,
                                carried_sums=self.sums_source)

        def metrics_at_commit(snapshot_id: int) -> dict[str, Any]:  # inside the transaction, once the edits moved
            self._timed("commit", t)
            result.metrics = self._batch_metrics(verdict, final)
            result.metrics["snapshot_id"] = snapshot_id
            return result.metrics

        snapshot_id = ledger_chain.publish_joint_night(
            self.store, batch_id=self.batch_id, expected_head=self.parent_id,
            snapshot=ledger_chain.NewSnapshot(parent_id=parent, base_model=self.base_model, kind=kind,
                                              path=file.rel_path, sha256=file.sha256, bytes=file.bytes,
                                              metrics=snap_metrics, carried=carried),
            outcome=self._outcome(final), batch_metrics=metrics_at_commit, actor=self.actor)
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
