"""The joint night's compute stage (step 3 of daemon/cycle.py): the deltas of a candidate set of edits, cached per
set: on the head, or re-derived from the start (the base, or the newest consolidated snapshot) over the carried
edits plus these (`from_start`: fine-tune-the-ledger, `hypernet_from_base`, `hypernet_from_consolidation`), with
the editor's summed statistics (`horse.sums`) when it has them; `protect_earlier`'s key moments and the running
normaliser. A mixin of `daemon.joint_night.JointNight`, whose state it reads.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections.abc import Iterator, Sequence

from daemon import gate, snapshots
from daemon.batch import to_fact, to_request
from daemon.engines import PROTECT_CHUNK, fold_moments_meta, keep_fold_moments
from daemon.errors import BatchRefused
from ledger.records import EditRecord


class ComputeStages:
    """_compute (and _compute_from_start with its sums), _protect_earlier, _at_start, _start_normaliser."""

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
        if not nu or self.from_base or not retained or not self.editor.protects_keys:
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
                                   and self.editor.carries_normaliser)
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
        return self.editor.sums_supported

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
