"""The regression gate: what a candidate model must keep before its snapshot is published.

Owns the rules, not the math: every number comes from `horse.metrics` (teacher-forced answer-token
accuracy, answer log-probabilities, greedy next tokens). For one batch the head (the model before the
batch) is measured once, and mostly not at all: what the gate measured on the snapshot that became the head
is kept beside it (`Known`, daemon/snapshots.py MEASURED_DIR), so only what that lacks (edits new to the
sample, new protected facts) is measured. Each candidate (the head plus the batch's deltas, or a subset of them while
bisecting) is measured on the same probe and judged against the head:

- efficacy (step 4, per edit): token accuracy on the edit's own prompt; an edit takes when it reaches
  `gate_min_efficacy` (the config's definition). The mean over its paraphrases is measured and stored
  with it but not required: HORSE generalises to paraphrases far less (reference GS ≈ 25–45 %), and
  requiring it failed 75 of 100 CounterFact edits on SmolLM2 whose prompts took.
- canary agreement: share of canary prompts whose greedy next token is unchanged; at least
  `gate_min_canary_agreement`.
- protected facts: a fact the head holds (answer-token accuracy ≥ HOLD_MIN_ACCURACY: at least half its
  answer tokens are the model's teacher-forced top choice) flips when the candidate no longer holds it; a fact the head
  does not hold flips when its accuracy drops at all. Share flipped at most `gate_max_protected_drop`.
- retention: of the edits already applied on the chain that hold on the head (token accuracy ≥
  HOLD_MIN_ACCURACY on their prompt), the share that still hold; at least `gate_min_retention`. The
  absolute share (over all of them) is recorded too, for the consolidation policy.
- generated retention (what users see): of `gate_generation_sample` retained edits (a stable random sample),
  those whose greedy decoding from the prompt produces the target on the head (`horse.metrics.generated_matches`:
  case- and space-normalised, cut at the end of the line), the share the candidate still generates; at least
  `gate_min_retention_generated` (0 = measured and recorded only). Each new edit's generated efficacy is
  measured and stored with it, like its token efficacy.
- delta norm (`gate_max_delta_norm` > 0): largest per-layer Frobenius norm of the cumulative delta.
- anything non-finite refuses the candidate.

Measurements are plain JSON-able dicts: they are stored on the batch and the snapshot rows.
"""
from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ledger.config import Settings

SHIPPED_CANARY = Path(__file__).resolve().parent / "assets" / "canary.jsonl"
# The default sample size of `sample_retained` (and the edits protect_earlier protects on a chain of nights).
RETENTION_SAMPLE_MAX = 2000
CANARY_SAMPLE_MAX = 2000
# A fact "holds" when at least this share of its answer tokens are the model's teacher-forced top choice.
# Fixed (not gate_min_efficacy) so that relaxing the efficacy bar never switches the protection off.
HOLD_MIN_ACCURACY = 0.5


@dataclass(frozen=True)
class Fact:
    """A prompt and the answer it must produce. `key` is the edit id or the protected-fact id."""

    key: int
    prompt: str
    answer: str
    paraphrases: tuple[str, ...] = ()


@dataclass(frozen=True)
class Probe:
    """Everything the gate measures on each model state during one batch."""

    canary_prompts: tuple[str, ...]
    protected: tuple[Fact, ...] = ()
    retained: tuple[Fact, ...] = ()
    generation_sample: int = 0  # this many retained facts (a stable random sample) are also generated

    @property
    def generated(self) -> tuple[Fact, ...]:
        return sample_retained(self.retained, limit=self.generation_sample, salt="generated")


@dataclass
class Measurement:
    """One model state measured on a Probe (tensors are on the CPU)."""

    canary_next_ids: torch.Tensor            # [C] greedy next token per canary prompt
    protected_acc: torch.Tensor              # [P] answer-token accuracy
    protected_logprob: torch.Tensor          # [P] mean answer log-prob
    retained_acc: torch.Tensor               # [R] answer-token accuracy on the edit's own prompt
    retained_gen: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.bool))  # [G] generated
    reused: int = 0                          # values taken from earlier measurements of the same state (Known)


@dataclass
class Verdict:
    """The gate's decision on a candidate, with every number it used."""

    passed: bool
    metrics: dict[str, Any]
    reasons: list[str] = field(default_factory=list)


def load_canary(path: str | Path | None = None, *, limit: int = CANARY_SAMPLE_MAX) -> tuple[str, ...]:
    """Canary prompts from a JSONL file (one object per line with a "prompt" field; "locality_prompt",
    "loc" or "src" are accepted too) or a plain-text file (one prompt per line). Empty = the shipped sample."""
    path = Path(path) if path else SHIPPED_CANARY
    prompts: list[str] = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            line = line.strip()
            if not line:
                continue
            if path.suffix == ".jsonl" or line.startswith("{"):
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{lineno}: not JSON ({exc}); fix the canary file") from None
                text = next((obj[k] for k in ("prompt", "locality_prompt", "loc", "src") if obj.get(k)), None)
                if not isinstance(text, str):
                    raise ValueError(f'{path}:{lineno}: no "prompt" field; fix the canary file')
                prompts.append(text)
            else:
                prompts.append(line)
    return tuple(prompts[:limit])


def sample_retained(facts: Sequence[Fact], *, limit: int = RETENTION_SAMPLE_MAX,
                    salt: str = "retained") -> tuple[Fact, ...]:
    """All the facts, or a fixed random sample of `limit` of them (in their order; none when `limit` ≤ 0).

    The sample is the `limit` facts whose keys hash lowest (with `salt`): random over the edits, and stable from
    night to night (a new edit enters only by displacing one), so that most of the head's measurements can be
    those its own gate made the night before (`Known`)."""
    if len(facts) <= limit:
        return tuple(facts)
    picked = {f.key for f in sorted(facts, key=lambda f: hashlib.sha256(f"{salt}:{f.key}".encode()).digest())[:limit]}
    return tuple(f for f in facts if f.key in picked)


def _text_id(*parts: str) -> int:
    """A signed 63-bit id of what is measured (a prompt, or a prompt and its answer)."""
    return int.from_bytes(hashlib.sha256("\x00".join(parts).encode()).digest()[:8], "big") >> 1


@dataclass
class Known:
    """Measurements of one model state kept for reuse, by what was measured: answer-token accuracy, answer
    log-probability and generation of (prompt, answer) pairs, greedy next token of canary prompts. Each maps the
    `_text_id` of the measured text to its value. The state it belongs to is the caller's to check (see
    daemon/snapshots.py, MEASURED_DIR)."""

    acc: dict[int, float] = field(default_factory=dict)
    logprob: dict[int, float] = field(default_factory=dict)
    generated: dict[int, bool] = field(default_factory=dict)
    canary: dict[int, int] = field(default_factory=dict)

    def add(self, probe: Probe, m: Measurement) -> Known:
        """Record every measurement of `m` (a measurement of this state on `probe`)."""
        for facts, acc in ((probe.protected, m.protected_acc), (probe.retained, m.retained_acc)):
            self.acc.update((_text_id(f.prompt, f.answer), float(a)) for f, a in zip(facts, acc.tolist()))
        self.logprob.update((_text_id(f.prompt, f.answer), float(v))
                            for f, v in zip(probe.protected, m.protected_logprob.tolist()))
        self.generated.update((_text_id(f.prompt, f.answer), bool(g))
                              for f, g in zip(probe.generated, m.retained_gen.tolist()))
        self.canary.update((_text_id(p), int(i)) for p, i in zip(probe.canary_prompts, m.canary_next_ids.tolist()))
        return self

    def add_accuracy(self, facts: Sequence[Fact], accuracy: Sequence[float]) -> Known:
        """Record the facts' answer-token accuracy measured elsewhere on this state (a warm fine-tune's last scan)."""
        if len(facts) != len(accuracy):
            raise ValueError(f"{len(facts)} facts but {len(accuracy)} accuracies")
        self.acc.update((_text_id(f.prompt, f.answer), float(a)) for f, a in zip(facts, accuracy))
        return self

    def add_efficacy(self, facts: Sequence[Fact], eff: Mapping[int, Mapping[str, float]]) -> Known:
        """Record the new edits' own-prompt accuracy and generation (`efficacy`'s "prompt_acc", "generated")."""
        for f in facts:
            if f.key in eff:
                key = _text_id(f.prompt, f.answer)
                self.acc[key] = float(eff[f.key]["prompt_acc"])
                self.generated[key] = bool(eff[f.key]["generated"])
        return self

    def to_tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for name, table, dtype in (("acc", self.acc, torch.float32), ("logprob", self.logprob, torch.float32),
                                   ("generated", self.generated, torch.uint8), ("canary", self.canary, torch.int64)):
            out[f"{name}.keys"] = torch.tensor(list(table), dtype=torch.int64)
            out[f"{name}.values"] = torch.tensor([float(v) for v in table.values()]).to(dtype)
        return out

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor]) -> Known:
        def table(name: str, cast):
            keys, values = tensors[f"{name}.keys"].tolist(), tensors[f"{name}.values"].tolist()
            return {int(k): cast(v) for k, v in zip(keys, values)}

        return cls(acc=table("acc", float), logprob=table("logprob", float), generated=table("generated", bool),
                   canary=table("canary", int))


@torch.no_grad()
def measure(model, tokenizer, probe: Probe, *, batch_size: int = 32, known: Known | None = None,
            prefix=None) -> Measurement:
    """Measure one model state on the probe (forward passes only). With `known` (earlier measurements of this
    same state), only what it lacks is measured; `Measurement.reused` counts what it supplied. With `prefix` (a
    `horse.prefix.PrefixCache` of these weights), the teacher-forced scores and canary tokens run only the edited
    blocks for texts it has seen (generation runs whole)."""
    from horse import metrics

    known = known or Known()
    reused = 0

    def fill(items: Sequence, table: dict[int, Any], ids: Sequence[int], run, dtype) -> torch.Tensor:
        """Values for `items` (text ids `ids`): from `table`, the rest by `run(missing items)` in one pass."""
        nonlocal reused
        missing = [i for i, key in enumerate(ids) if key not in table]
        fresh = run([items[i] for i in missing]).cpu().tolist() if missing else []
        values = [table.get(key) for key in ids]
        for i, v in zip(missing, fresh):
            values[i] = v
        reused += len(items) - len(missing)
        return torch.tensor(values, dtype=dtype) if values else torch.zeros(0, dtype=dtype)

    def fact_ids(facts: Sequence[Fact]) -> list[int]:
        return [_text_id(f.prompt, f.answer) for f in facts]

    def acc(facts: Sequence[Fact]) -> torch.Tensor:
        return metrics.answer_token_accuracy(model, tokenizer, [f.prompt for f in facts], [f.answer for f in facts],
                                             batch_size=batch_size, prefix=prefix).float()

    def logprob(facts: Sequence[Fact]) -> torch.Tensor:
        return metrics.answer_logprobs(model, tokenizer, [f.prompt for f in facts], [f.answer for f in facts],
                                       batch_size=batch_size, prefix=prefix).float()

    def generated(facts: Sequence[Fact]) -> torch.Tensor:
        return metrics.generated_matches(model, tokenizer, [f.prompt for f in facts], [f.answer for f in facts],
                                         batch_size=batch_size)

    def canary(prompts: Sequence[str]) -> torch.Tensor:
        return metrics.next_token_ids(model, tokenizer, list(prompts), prefix=prefix)

    m = Measurement(
        canary_next_ids=fill(probe.canary_prompts, known.canary, [_text_id(p) for p in probe.canary_prompts],
                             canary, torch.long),
        protected_acc=fill(probe.protected, known.acc, fact_ids(probe.protected), acc, torch.float32),
        protected_logprob=fill(probe.protected, known.logprob, fact_ids(probe.protected), logprob, torch.float32),
        retained_acc=fill(probe.retained, known.acc, fact_ids(probe.retained), acc, torch.float32),
        retained_gen=fill(probe.generated, known.generated, fact_ids(probe.generated), generated, torch.bool))
    m.reused = reused
    return m


@torch.no_grad()
def efficacy(model, tokenizer, facts: Sequence[Fact], *, batch_size: int = 32,
             prefix=None) -> dict[int, dict[str, float]]:
    """Per-edit efficacy (step 4): token accuracy on the prompt (= "efficacy"), the mean over paraphrases, and
    whether greedy decoding from the prompt produces the target ("generated", 1.0 or 0.0; recorded, not required).
    `prefix`: as in `measure` (a batch that recomputes without the edits that did not take reuses the rows).

    Returns:
        {edit id: {"prompt_acc", "paraphrase_acc" (NaN when none), "efficacy", "generated"}}.
    """
    from horse import metrics

    prompts, answers, owner = [], [], []
    for fact in facts:
        for text in (fact.prompt, *fact.paraphrases):
            prompts.append(text)
            answers.append(fact.answer)
            owner.append(fact.key)
    if not prompts:
        return {}
    accs = metrics.answer_token_accuracy(model, tokenizer, prompts, answers, batch_size=batch_size,
                                         prefix=prefix).float().tolist()
    gen = metrics.generated_matches(model, tokenizer, [f.prompt for f in facts], [f.answer for f in facts],
                                    batch_size=batch_size).float().tolist()
    out: dict[int, dict[str, float]] = {}
    i = 0
    for fact, generated in zip(facts, gen):
        n = 1 + len(fact.paraphrases)
        vals = accs[i:i + n]
        i += n
        para = sum(vals[1:]) / (n - 1) if n > 1 else float("nan")
        out[fact.key] = {"prompt_acc": vals[0], "paraphrase_acc": para, "efficacy": vals[0], "generated": generated}
    return out


def _finite(*tensors: torch.Tensor) -> bool:
    return all(bool(torch.isfinite(t.float()).all()) for t in tensors if t.numel())


def judge(head: Measurement, cand: Measurement, probe: Probe, settings: Settings, *,
          layer_norms: Mapping[str, float] | None = None) -> Verdict:
    """Compare a candidate with the head and decide.

    Args:
        layer_norms: per-layer Frobenius norm of the candidate's cumulative delta (for gate_max_delta_norm).
    Returns:
        A Verdict whose metrics hold every number (JSON-able) and whose reasons say which check failed.
    """
    reasons: list[str] = []
    m: dict[str, Any] = {}
    if not _finite(cand.protected_acc, cand.protected_logprob, cand.retained_acc):
        reasons.append("the candidate's measurements are not finite (NaN/Inf)")

    n_canary = int(cand.canary_next_ids.numel())
    agree = float((cand.canary_next_ids == head.canary_next_ids).float().mean()) if n_canary else 1.0
    m["canary_agreement"] = agree
    m["canary_n"] = n_canary
    if agree < settings.gate_min_canary_agreement:
        reasons.append(f"canary agreement {agree:.3f} < {settings.gate_min_canary_agreement}")

    n_prot = len(probe.protected)
    floor = torch.clamp(head.protected_acc, max=HOLD_MIN_ACCURACY) - 1e-6
    flipped = [probe.protected[i].key for i in range(n_prot) if float(cand.protected_acc[i]) < float(floor[i])]
    share = len(flipped) / n_prot if n_prot else 0.0
    m.update(protected_n=n_prot, protected_flipped=flipped, protected_flip_share=share,
             protected_acc_mean=float(cand.protected_acc.mean()) if n_prot else None,
             protected_logprob_change_mean=float((cand.protected_logprob - head.protected_logprob).mean())
             if n_prot else None)
    if share > settings.gate_max_protected_drop + 1e-12:
        reasons.append(f"{len(flipped)} of {n_prot} protected facts flipped ({share:.3f} > "
                       f"{settings.gate_max_protected_drop}): ids {flipped[:20]}")

    n_ret = len(probe.retained)
    held_head = head.retained_acc >= HOLD_MIN_ACCURACY
    held_cand = cand.retained_acc >= HOLD_MIN_ACCURACY
    n_held_head = int(held_head.sum())
    kept = int((held_head & held_cand).sum())
    retention = kept / n_held_head if n_held_head else 1.0
    lost = [probe.retained[i].key for i in range(n_ret) if bool(held_head[i]) and not bool(held_cand[i])]
    m.update(retention=retention, retention_abs=(float(held_cand.float().mean()) if n_ret else None),
             retention_acc_mean=(float(cand.retained_acc.mean()) if n_ret else None),
             retention_n=n_ret, retention_lost=lost[:100])
    if retention < settings.gate_min_retention:
        reasons.append(f"retention {retention:.3f} < {settings.gate_min_retention}: "
                       f"{len(lost)} earlier edits no longer hold, ids {lost[:20]}")

    gen_probe = probe.generated
    gen_head, gen_cand = head.retained_gen.bool(), cand.retained_gen.bool()
    n_gen_head = int(gen_head.sum())
    gen_retention = int((gen_head & gen_cand).sum()) / n_gen_head if n_gen_head else 1.0
    gen_lost = [gen_probe[i].key for i in range(len(gen_probe)) if bool(gen_head[i]) and not bool(gen_cand[i])]
    m.update(retention_generated=gen_retention, retention_generated_n=len(gen_probe),
             retention_generated_abs=(float(gen_cand.float().mean()) if len(gen_probe) else None))
    if gen_retention < settings.gate_min_retention_generated:
        reasons.append(f"generated retention {gen_retention:.3f} < {settings.gate_min_retention_generated}: "
                       f"{len(gen_lost)} earlier edits are no longer produced by greedy decoding, ids {gen_lost[:20]}")

    if layer_norms:
        biggest = max(layer_norms.values())
        m["delta_norm_max"] = biggest
        if not math.isfinite(biggest):
            reasons.append("the cumulative delta is not finite (NaN/Inf)")
        elif settings.gate_max_delta_norm > 0 and biggest > settings.gate_max_delta_norm:
            reasons.append(f"cumulative delta norm {biggest:.4g} > gate_max_delta_norm {settings.gate_max_delta_norm}")
    m["passed"] = not reasons
    return Verdict(passed=not reasons, metrics=m, reasons=reasons)


def baseline_metrics(head: Measurement, probe: Probe, settings: Settings) -> dict[str, Any]:
    """What the head itself scores (stored with the batch, so diffs can show how numbers moved)."""
    held = head.retained_acc >= HOLD_MIN_ACCURACY
    return {"canary_n": len(probe.canary_prompts), "protected_n": len(probe.protected),
            "protected_acc_mean": float(head.protected_acc.mean()) if probe.protected else None,
            "retention_n": len(probe.retained),
            "retention_abs": float(held.float().mean()) if probe.retained else None,
            "retention_acc_mean": float(head.retained_acc.mean()) if probe.retained else None,
            "retention_generated_n": len(probe.generated),
            "retention_generated_abs": float(head.retained_gen.float().mean()) if probe.generated else None,
            "reused": head.reused}
