"""The joint night's gate stages (steps 4–5 of daemon/cycle.py): verify that each edit took and recompute without
those that did not (`_settle`), judge a candidate set against the head (`_verdict`, cached per set), bisect a
failing set to isolate the damaging edits, and the gate's prefix cache and scoping. A mixin of
`daemon.joint_night.JointNight`, whose state it reads and fills (`failed`, `rejected`, `efficacy`, `bisect_log`).
"""
from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

from daemon import gate, snapshots
from daemon.batch import _measured_meta, to_fact
from daemon.materialise import scoped

log = logging.getLogger("daemon.cycle")


class GateStages:
    """_settle, _verdict, _bisect_and_combine; the prefix cache (_open_prefix, _prefix_for, _keep_prefix), _scoped."""

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
