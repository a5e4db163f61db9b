"""Compute stage of a routed night: the night's edits grouped by subject, each group's delta solved.

A subject's group is every edit its delta must carry: the head's edits of that subject still applied (less those
a new edit of the same prompt replaces) plus the night's. Only the night's subjects are solved again, so a
night's cost grows with the night's edits, not with the ledger.
"""
from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from daemon.night.engine import SubjectEngine, to_request
from ledger.status import EditStatus
from ledger.store import EditRecord


@dataclass(frozen=True)
class Group:
    key: str
    carried: tuple[EditRecord, ...]   # earlier applied edits of the subject kept in its delta
    new: tuple[EditRecord, ...]       # the night's edits of the subject

    @property
    def names(self) -> tuple[str, ...]:
        """The subject, then every alias any of its edits gives (first seen first)."""
        names: dict[str, None] = {}
        for e in (*self.new, *self.carried):
            for n in e.names:
                if n.strip():
                    names.setdefault(" ".join(n.split()), None)
        return tuple(names)

    @property
    def edit_ids(self) -> tuple[int, ...]:
        return tuple(sorted(e.id for e in (*self.carried, *self.new)))

    def without(self, drop: set[int]) -> Group:
        return Group(self.key, self.carried, tuple(e for e in self.new if e.id not in drop))


def make_groups(head, claimed: Sequence[EditRecord], earlier: Mapping[int, EditRecord]) -> dict[str, Group]:
    """Per subject key of the claimed edits, its group. `earlier`: the edits the head's routes of those subjects
    list (only the applied ones are carried)."""
    from horse.route import subject_key

    new_by_key: dict[str, list[EditRecord]] = {}
    for e in claimed:
        new_by_key.setdefault(subject_key(e.subject), []).append(e)
    groups = {}
    for key, new in new_by_key.items():
        route = head.routes.get(key)
        replaced = {e.rendered_prompt for e in new}
        carried = [earlier[i] for i in (route.edit_ids if route else ())
                   if i in earlier and earlier[i].status == EditStatus.APPLIED.value
                   and earlier[i].rendered_prompt not in replaced]
        groups[key] = Group(key, tuple(carried), tuple(sorted(new, key=lambda e: e.id)))
    return groups


def solve(engine: SubjectEngine, model, tokenizer, groups: Sequence[Group]) -> tuple[dict, dict[str, float]]:
    """Each group's Route (horse.route) from one batched capture; timings in seconds."""
    from horse.route import Route

    t = time.perf_counter()
    todo = [g for g in groups if g.new]
    if not todo:
        return {}, {}
    requests = [[to_request(e) for e in (*g.carried, *g.new)] for g in todo]
    factors, timings = engine.subject_factors(model, tokenizer, requests)
    routes = {g.key: Route(g.names, g.edit_ids, f) for g, f in zip(todo, factors)}
    timings["solve_total"] = time.perf_counter() - t
    return routes, timings
