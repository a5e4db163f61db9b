"""Gate stage of a routed night: each subject's new delta judged on the texts it can change, only the guilty
rejected.

With routing, a subject's delta changes only texts that name the subject, so the gate measures a candidate
(the head's routes with the night's subjects replaced) only on the probe texts that name one of the night's
subjects; every other text keeps the head's value, exactly. Per subject, on its own texts:

- retention: of its texts' earlier edits the head holds (the subject's own earlier edits among them), the share
  the candidate still holds, at least `gate_min_retention`;
- same-subject locality: prompts of other relations asked of the subject (daemon/assets/relations.jsonl) keep
  their greedy next token, at least `gate_min_same_subject` of them;
- fluency of text naming the subject: the perplexity of the head's greedy continuations of those prompts under
  the candidate, at most `gate_max_subject_perplexity` × the head's;
- protected facts and canary prompts that name it: the flips it causes. Flips are a night's budget (canary:
  1 − `gate_min_canary_agreement` of the canary prompts; protected: `gate_max_protected_drop`): subjects are
  taken in order of least harm and one whose flips would overrun the budget on top of those taken is rejected.

A subject that fails with several new edits has each tried alone on top of its earlier edits: those that fail
alone are rejected, the rest retried together; what the measurement budget (`gate_max_measurements`) leaves
undecided goes back to pending. No edit is rejected unless it fails measured alone on top of what passes.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from daemon import gate
from ledger.config import Settings

RELATIONS = Path(__file__).resolve().parent.parent / "assets" / "relations.jsonl"


@dataclass(frozen=True)
class Subset:
    """Indices of a probe's items (canary prompts, protected facts, retained facts, generated facts)."""

    canary: tuple[int, ...] = ()
    protected: tuple[int, ...] = ()
    retained: tuple[int, ...] = ()
    generated: tuple[int, ...] = ()

    def __or__(self, other: Subset) -> Subset:
        return Subset(*(tuple(sorted(set(a) | set(b))) for a, b in zip(self.parts(), other.parts())))

    def parts(self) -> tuple[tuple[int, ...], ...]:
        return self.canary, self.protected, self.retained, self.generated

    def __len__(self) -> int:
        return sum(len(p) for p in self.parts())


class Texts:
    """Which subjects each of a probe's texts names (`horse.route.named_in`)."""

    def __init__(self, probe: gate.Probe, tokenizer, table) -> None:
        from horse.route import named_in

        self.canary = named_in(probe.canary_prompts, tokenizer, table)
        self.protected = named_in([f.prompt for f in probe.protected], tokenizer, table)
        self.retained = named_in([f.prompt for f in probe.retained], tokenizer, table)
        self.generated = named_in([f.prompt for f in probe.generated], tokenizer, table)

    def subset(self, keys: set[str]) -> Subset:
        def pick(named: list[set[str]]) -> tuple[int, ...]:
            return tuple(i for i, n in enumerate(named) if n & keys)
        return Subset(pick(self.canary), pick(self.protected), pick(self.retained), pick(self.generated))

    def shared(self, keys: set[str]) -> Subset:
        """Items that name two or more of `keys` (their value under all of them is not one subject's)."""
        def pick(named: list[set[str]]) -> tuple[int, ...]:
            return tuple(i for i, n in enumerate(named) if len(n & keys) > 1)
        return Subset(pick(self.canary), pick(self.protected), pick(self.retained), pick(self.generated))


def relation_templates(path: Path = RELATIONS) -> list[str]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line)["template"] for line in fh if line.strip()]


def same_subject_prompts(subject: str, own: set[str], templates: Sequence[str], k: int) -> list[str]:
    """k prompts of other relations asked of `subject` (a stable choice per subject), none equal to `own`."""
    def rank(t: str) -> str:
        return hashlib.sha256(f"{subject}\x00{t}".encode()).hexdigest()
    rendered = [t.replace("{}", subject) for t in sorted(templates, key=rank)]
    return [p for p in rendered if p not in own][:k]


def merged(head: gate.Measurement, part: gate.Measurement, sub: Subset) -> gate.Measurement:
    """The head's measurement with the items of `sub` replaced by `part`'s (measured on exactly those)."""
    out = gate.Measurement(*(t.clone() for t in (head.canary_next_ids, head.protected_acc, head.protected_logprob,
                                                  head.retained_acc, head.retained_gen)), reused=head.reused)
    for idx, dst, src in ((sub.canary, out.canary_next_ids, part.canary_next_ids),
                          (sub.protected, out.protected_acc, part.protected_acc),
                          (sub.protected, out.protected_logprob, part.protected_logprob),
                          (sub.retained, out.retained_acc, part.retained_acc),
                          (sub.generated, out.retained_gen, part.retained_gen)):
        if idx:
            dst[list(idx)] = src.to(dst.dtype)
    return out


@dataclass
class Harm:
    """What one subject's delta does on its texts, against the head."""

    canary_flips: int = 0
    protected_flips: int = 0
    retention: float = 1.0
    retention_lost: list[int] = field(default_factory=list)
    same_subject: float = 1.0
    same_subject_n: int = 0
    subject_perplexity: float = 1.0
    subject_texts: int = 0
    finite: bool = True

    def set_same_subject(self, same) -> None:
        """Take a `decide.SameSubject` measurement."""
        self.same_subject, self.same_subject_n = same.share, same.n
        self.subject_perplexity, self.subject_texts = same.perplexity_ratio, same.n_texts

    def local_reasons(self, settings: Settings) -> list[str]:
        reasons = []
        if not self.finite:
            reasons.append("its measurements are not finite (NaN/Inf)")
        if self.retention < settings.gate_min_retention:
            reasons.append(f"retention on its texts {self.retention:.3f} < {settings.gate_min_retention}: earlier "
                           f"edits {self.retention_lost[:10]} no longer hold")
        if self.same_subject < settings.gate_min_same_subject:
            reasons.append(f"same-subject agreement {self.same_subject:.3f} < {settings.gate_min_same_subject} "
                           f"({self.same_subject_n} prompts of other relations about the subject)")
        bar = settings.gate_max_subject_perplexity
        if bar and not self.subject_perplexity <= bar:
            reasons.append(f"perplexity of text naming the subject ×{self.subject_perplexity:.2f} > ×{bar} "
                           f"(gate_max_subject_perplexity; {self.subject_texts} texts)")
        return reasons


def harm(head: gate.Measurement, cand: gate.Measurement, sub: Subset) -> Harm:
    """Flips and retention on the items of `sub` (cand is a full measurement: `merged`)."""
    c = list(sub.canary)
    canary = int((cand.canary_next_ids[c] != head.canary_next_ids[c]).sum()) if c else 0
    p = list(sub.protected)
    floor = torch.clamp(head.protected_acc[p], max=gate.HOLD_MIN_ACCURACY) - 1e-6 if p else None
    protected = int((cand.protected_acc[p] < floor).sum()) if p else 0
    r = list(sub.retained)
    held = head.retained_acc[r] >= gate.HOLD_MIN_ACCURACY if r else torch.zeros(0, dtype=torch.bool)
    kept = cand.retained_acc[r] >= gate.HOLD_MIN_ACCURACY if r else torch.zeros(0, dtype=torch.bool)
    n_held = int(held.sum())
    lost = [r[i] for i in range(len(r)) if bool(held[i]) and not bool(kept[i])]
    finite = all(bool(torch.isfinite(t.float()).all()) for t in (cand.protected_acc, cand.retained_acc) if t.numel())
    return Harm(canary, protected, int((held & kept).sum()) / n_held if n_held else 1.0, lost, finite=finite)


def over_budget(taken: Sequence[Harm], probe: gate.Probe, settings: Settings) -> list[str]:
    """Reasons the flips of `taken` together overrun the night's canary / protected budgets ([] if not)."""
    reasons = []
    n_c, n_p = len(probe.canary_prompts), len(probe.protected)
    flips_c = sum(h.canary_flips for h in taken)
    flips_p = sum(h.protected_flips for h in taken)
    if n_c and 1 - flips_c / n_c < settings.gate_min_canary_agreement - 1e-12:
        reasons.append(f"canary agreement {1 - flips_c / n_c:.3f} < {settings.gate_min_canary_agreement}")
    if n_p and flips_p / n_p > settings.gate_max_protected_drop + 1e-12:
        reasons.append(f"{flips_p} of {n_p} protected facts flipped ({flips_p / n_p:.3f} > "
                       f"{settings.gate_max_protected_drop})")
    return reasons


def measurement_metrics(harms: Mapping[str, Harm]) -> dict[str, dict]:
    return {k: {"canary_flips": h.canary_flips, "protected_flips": h.protected_flips,
                "retention": round(h.retention, 4), "same_subject": round(h.same_subject, 4),
                "same_subject_n": h.same_subject_n, "subject_perplexity": round(h.subject_perplexity, 4),
                "subject_texts": h.subject_texts} for k, h in harms.items()}
