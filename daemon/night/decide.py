"""Settle and gate a routed night's candidate (see daemon/night/judge.py for the rules).

`Measurer` measures route tables through the router on the texts they can change and counts the measurements;
`settle` drops the edits that do not take; `decide` judges each subject and returns what to publish.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from daemon import gate
from daemon.night.compute import Group
from daemon.night.judge import (Harm, Subset, Texts, harm, merged, over_budget, relation_templates,
                                same_subject_prompts)
from ledger.config import Settings

log = logging.getLogger("daemon.night")
FLUENCY_PROMPTS = 4  # of a subject's same-subject prompts, the first this many also measure fluency


def to_fact(edit) -> gate.Fact:
    return gate.Fact(key=edit.id, prompt=edit.rendered_prompt, answer=edit.target_new,
                     paraphrases=tuple(edit.paraphrases))


@dataclass(frozen=True)
class HeadText:
    """The head's greedy next token after a same-subject prompt, its continuation and that continuation's mean
    log-prob under the head."""

    next_id: int
    continuation: str
    logprob: float


@dataclass(frozen=True)
class SameSubject:
    """One subject's same-subject measurement (see `Measurer.same_subject`)."""

    share: float = 1.0
    n: int = 0
    perplexity_ratio: float = 1.0
    n_texts: int = 0


class BudgetSpent(Exception):
    """The night's gate measurements (`gate_max_measurements`) are spent."""


class Measurer:
    """Measures route tables on a probe through one router (the model's weights are the base's)."""

    def __init__(self, settings: Settings, model, tokenizer, router, head_table, probe: gate.Probe,
                 head: gate.Measurement) -> None:
        self.settings, self.model, self.tok, self.router = settings, model, tokenizer, router
        self.head_table, self.probe, self.head = head_table, probe, head
        self.count = 0
        self.texts: Texts | None = None
        self.templates = relation_templates()
        self._same_head: dict[str, HeadText] = {}

    def index(self, routes: Mapping) -> None:
        """Which probe texts name which subject, the candidate's names (aliases) included."""
        self.texts = Texts(self.probe, self.tok, self.head_table.with_routes(routes, self.tok))

    def table(self, routes: Mapping):
        return self.head_table.with_routes(routes, self.tok)

    def spend(self) -> None:
        if self.count >= self.settings.gate_max_measurements:
            raise BudgetSpent(f"the night's {self.settings.gate_max_measurements} gate measurements are spent "
                              "(gate_max_measurements)")
        self.count += 1

    def measure(self, routes: Mapping, sub: Subset) -> gate.Measurement:
        """The full measurement of head + `routes`: the items of `sub` measured, the rest the head's."""
        from horse import metrics

        self.spend()
        p = self.probe
        part = gate.Probe(canary_prompts=tuple(p.canary_prompts[i] for i in sub.canary),
                          protected=tuple(p.protected[i] for i in sub.protected),
                          retained=tuple(p.retained[i] for i in sub.retained), generation_sample=0)
        self.router.set_table(self.table(routes))
        try:
            m = gate.measure(self.model, self.tok, part)
            gen = p.generated
            if sub.generated:
                facts = [gen[i] for i in sub.generated]
                m.retained_gen = metrics.generated_matches(self.model, self.tok, [f.prompt for f in facts],
                                                           [f.answer for f in facts])
        finally:
            self.router.set_table(self.head_table)
        return merged(self.head, m, sub)

    def efficacy(self, routes: Mapping, edits: Sequence) -> dict[int, dict[str, float]]:
        self.router.set_table(self.table(routes))
        try:
            return gate.efficacy(self.model, self.tok, [to_fact(e) for e in edits])
        finally:
            self.router.set_table(self.head_table)

    def same_subject(self, routes: Mapping, groups: Mapping[str, Group]) -> dict[str, SameSubject]:
        """Per subject of `routes`, on its same-subject prompts (other relations asked of it): the share whose
        greedy next token the head gives, and the perplexity ratio (candidate / head) of the head's greedy
        continuations (`gate_subject_text_tokens` tokens) of the first `FLUENCY_PROMPTS` of them: the fluency of
        text that names the subject."""
        from horse import metrics

        k = self.settings.same_subject_prompts
        prompts: dict[str, list[str]] = {}
        for key in routes:
            g = groups[key]
            own = {e.rendered_prompt for e in (*g.new, *g.carried)} | {p for e in g.new for p in e.paraphrases}
            prompts[key] = same_subject_prompts(g.names[0], own, self.templates, k) if k else []
        flat = [p for key in routes for p in prompts[key]]
        if not flat:
            return {key: SameSubject() for key in routes}
        fluent = {p for key in routes for p in prompts[key][:FLUENCY_PROMPTS]}
        self._measure_head([p for p in flat if p not in self._same_head], fluent)
        texts = [p for p in flat if self._same_head[p].continuation]
        self.router.set_table(self.table(routes))
        try:
            cand = dict(zip(flat, metrics.next_token_ids(self.model, self.tok, flat).tolist()))
            cand_lp = dict(zip(texts, self._continuation_logprobs(texts)))
        finally:
            self.router.set_table(self.head_table)
        out = {}
        for key in routes:
            ps = prompts[key]
            same = sum(int(cand[p] == self._same_head[p].next_id) for p in ps)
            scored = [p for p in ps if p in cand_lp]
            nll_gap = (sum(self._same_head[p].logprob - cand_lp[p] for p in scored) / len(scored)) if scored else 0.0
            out[key] = SameSubject(same / len(ps) if ps else 1.0, len(ps), math.exp(nll_gap), len(scored))
        return out

    def _measure_head(self, prompts: list[str], fluent: set[str]) -> None:
        """The head's next token for each prompt, and for those in `fluent` its greedy continuation and that
        continuation's log-prob (cached for the night)."""
        from horse import metrics

        if not prompts:
            return
        n = self.settings.gate_subject_text_tokens
        nxt = metrics.next_token_ids(self.model, self.tok, prompts).tolist()
        gen = [p for p in prompts if p in fluent] if n else []
        made = dict(zip(gen, (c.split("\n")[0].strip() for c in metrics.greedy_continuations(
            self.model, self.tok, gen, max_new_tokens=n, batch_size=64)))) if gen else {}
        conts = [made.get(p, "") for p in prompts]
        scored = [(p, c) for p, c in zip(prompts, conts) if c]
        lps = dict(zip((p for p, _ in scored), metrics.answer_logprobs(
            self.model, self.tok, [p for p, _ in scored], [c for _, c in scored], batch_size=64).tolist())) \
            if scored else {}
        for p, t, c in zip(prompts, nxt, conts):
            self._same_head[p] = HeadText(t, c if p in lps else "", lps.get(p, 0.0))

    def _continuation_logprobs(self, prompts: list[str]) -> list[float]:
        from horse import metrics

        if not prompts:
            return []
        return metrics.answer_logprobs(self.model, self.tok, prompts,
                                       [self._same_head[p].continuation for p in prompts], batch_size=64).tolist()


@dataclass
class Decision:
    accepted: dict = field(default_factory=dict)        # subject key → Route to publish
    rejected: dict[int, str] = field(default_factory=dict)
    returned: dict[int, str] = field(default_factory=dict)
    harms: dict[str, Harm] = field(default_factory=dict)
    verdict: gate.Verdict | None = None
    final: gate.Measurement | None = None


def settle(measurer: Measurer, groups: dict[str, Group], solve: Callable, settings: Settings,
           failed: dict[int, str], efficacy: dict[int, dict]) -> dict:
    """Solve, measure each new edit's efficacy, drop the edits that do not take and solve their subjects again,
    until every remaining edit takes. Returns the routes; `groups` is updated in place."""
    routes = solve(list(groups.values()))
    while routes:
        eff = measurer.efficacy(routes, [e for k in routes for e in groups[k].new])
        efficacy.update(eff)
        low = {i for i, v in eff.items() if not v["efficacy"] >= settings.gate_min_efficacy}
        if not low:
            break
        for i in low:
            v = eff[i]
            failed[i] = (f"did not take: efficacy {v['efficacy']:.3f} < gate_min_efficacy "
                         f"{settings.gate_min_efficacy} (prompt {v['prompt_acc']:.2f})")
        touched = {k for k in routes if any(e.id in low for e in groups[k].new)}
        for k in touched:
            groups[k] = groups[k].without(low)
            routes.pop(k)
            if not groups[k].new:
                groups.pop(k)
        redo = [groups[k] for k in touched if k in groups]
        if not redo:
            break
        again = solve(redo)
        routes.update(again)
        log.info("%d edits did not take; %d subjects solved again", len(low), len(redo))
    return routes


def _harms(measurer: Measurer, routes: Mapping, groups: Mapping[str, Group]) -> dict[str, Harm]:
    """Each subject's harm alone on top of the head: one measurement of every subject's texts under all the
    routes, plus one per subject for texts that name several of the night's subjects."""
    keys = set(routes)
    texts = measurer.texts
    assert texts is not None
    full = measurer.measure(routes, texts.subset(keys))
    shared = texts.shared(keys)
    same = measurer.same_subject(routes, groups)
    out = {}
    for k in routes:
        sub = texts.subset({k})
        cand = full
        if any(set(a) & set(b) for a, b in zip(sub.parts(), shared.parts())):
            cand = measurer.measure({k: routes[k]}, sub)
        h = harm(measurer.head, cand, sub)
        h.set_same_subject(same[k])
        out[k] = h
    return out


def _alone(measurer: Measurer, key: str, group: Group, route, groups: Mapping[str, Group]) -> Harm:
    sub = measurer.texts.subset({key})
    h = harm(measurer.head, measurer.measure({key: route}, sub), sub)
    h.set_same_subject(measurer.same_subject({key: route}, {key: group})[key])
    return h


def _fails(h: Harm, probe: gate.Probe, settings: Settings) -> list[str]:
    return h.local_reasons(settings) + over_budget([h], probe, settings)


def _split(measurer: Measurer, key: str, group: Group, solve: Callable, settings: Settings,
           decision: Decision) -> Group | None:
    """A failing subject with several new edits: each tried alone on top of its earlier edits. Returns the group
    of those published (None: none)."""
    passing = []
    for e in group.new:
        trial = Group(key, group.carried, (e,))
        h = _alone(measurer, key, trial, solve([trial])[key], {key: trial})
        reasons = _fails(h, measurer.probe, settings)
        if reasons:
            decision.rejected[e.id] = f"gate (alone, on top of the subject's earlier edits): {'; '.join(reasons)}"
        else:
            passing.append(e)
    if not passing:
        return None
    together = Group(key, group.carried, tuple(passing))
    route = solve([together])[key]
    h = _alone(measurer, key, together, route, {key: together})
    if _fails(h, measurer.probe, settings):
        for e in passing:
            decision.returned[e.id] = ("passed the gate alone but not together with the night's other edits of "
                                       "its subject; retried in a later night")
        return None
    decision.accepted[key] = route
    decision.harms[key] = h
    return together


def decide(measurer: Measurer, groups: dict[str, Group], routes: dict, solve: Callable,
           settings: Settings) -> Decision:
    """Judge every subject of `routes`; see the module docstring of daemon/night/judge.py."""
    decision = Decision()
    if not routes:
        return decision
    measurer.index(routes)
    try:
        harms = _harms(measurer, routes, groups)
        for key in sorted(routes, key=lambda k: (harms[k].protected_flips, harms[k].canary_flips, k)):
            h, g = harms[key], groups[key]
            reasons = _fails(h, measurer.probe, settings) or over_budget(
                [decision.harms[k] for k in decision.accepted] + [h], measurer.probe, settings)
            if not reasons:
                decision.accepted[key], decision.harms[key] = routes[key], h
            elif len(g.new) == 1:
                decision.rejected[g.new[0].id] = f"gate: {'; '.join(reasons)} (subject {key!r}, measured on its texts)"
                decision.harms[key] = h
            else:
                together = _split(measurer, key, g, solve, settings, decision)
                if together is not None:
                    groups[key] = together  # what is published is the edits that passed
        if decision.accepted:
            final_sub = measurer.texts.subset(set(decision.accepted))
            decision.final = measurer.measure(decision.accepted, final_sub)
    except BudgetSpent as exc:
        for key, g in groups.items():
            if key in decision.accepted and decision.final is None:
                decision.accepted.pop(key)
            for e in g.new:
                if e.id not in decision.rejected and key not in decision.accepted:
                    decision.returned[e.id] = f"undecided: {exc}; retried in a later night"
    return decision
