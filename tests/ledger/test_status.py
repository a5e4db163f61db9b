"""ledger/status.py: the table of allowed moves, transition(), and that random paths stay in the table."""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select

from ledger.errors import IllegalTransition
from ledger.models import EDIT_STATUSES, Edit, Event
from ledger.status import ACTIVE, ALLOWED, EditStatus, is_allowed, transition


def test_table_covers_every_status_and_matches_the_schema():
    assert set(ALLOWED) == set(EditStatus)
    assert tuple(s.value for s in EditStatus) == EDIT_STATUSES
    assert ACTIVE == {EditStatus.PROPOSED, EditStatus.PENDING, EditStatus.CLAIMED, EditStatus.APPLIED}
    assert not any(s in dsts for s, dsts in ALLOWED.items())  # no self-loops
    # the moves the architecture lists, and nothing else
    expected = {("pending", "claimed"), ("pending", "cancelled"), ("pending", "superseded"),
                ("claimed", "applied"), ("claimed", "failed"), ("claimed", "rejected"), ("claimed", "pending"),
                ("failed", "pending"), ("applied", "rolled_back"), ("applied", "superseded"),
                ("rolled_back", "pending"), ("superseded", "applied"),
                ("proposed", "pending"), ("proposed", "rejected"), ("proposed", "cancelled")}  # review
    assert {(s.value, d.value) for s, dsts in ALLOWED.items() for d in dsts} == expected


def _statuses(session, ids):
    return dict(session.execute(select(Edit.id, Edit.status).where(Edit.id.in_(ids))).all())


def test_transition_moves_and_writes_one_event_per_edit(store, edit_factory):
    ids = [r.id for r in store.add_edits([edit_factory() for _ in range(3)], actor="t")]
    with store.session() as s:
        transition(s, ids, "pending", "claimed", actor="daemon", reason="why", payload={"k": 1},
                   values={"claim_token": "tok"})
    with store.session() as s:
        assert set(_statuses(s, ids).values()) == {"claimed"}
        evs = s.execute(select(Event).where(Event.kind == "edit.claimed").order_by(Event.edit_id)).scalars().all()
        assert [e.edit_id for e in evs] == ids
        assert all(e.actor == "daemon" and e.reason == "why" and e.payload["k"] == 1 for e in evs)
        assert all(e.payload["from"] == "pending" and e.payload["to"] == "claimed" for e in evs)
        assert {r.claim_token for r in s.execute(select(Edit).where(Edit.id.in_(ids))).scalars()} == {"tok"}


def test_illegal_move_raises_and_changes_nothing(store, edit_factory):
    ids = [r.id for r in store.add_edits([edit_factory() for _ in range(3)], actor="t")]
    store.cancel(ids[1], actor="t")
    with pytest.raises(IllegalTransition) as info:
        with store.session() as s:
            transition(s, ids, "pending", "claimed", actor="daemon")
    assert f"edit {ids[1]} is cancelled, not pending" in str(info.value)
    assert info.value.current == {ids[1]: "cancelled"}
    with store.session() as s:  # the whole move rolled back, events included
        assert _statuses(s, ids) == {ids[0]: "pending", ids[1]: "cancelled", ids[2]: "pending"}
        assert s.execute(select(func.count()).select_from(Event).where(Event.kind == "edit.claimed")).scalar() == 0


def test_move_not_in_table_raises_before_touching_rows(store, edit_factory):
    (r,) = store.add_edits([edit_factory()], actor="t")
    with pytest.raises(IllegalTransition, match="cannot move from pending to applied"):
        with store.session() as s:
            transition(s, [r.id], "pending", "applied", actor="t")
    with pytest.raises(IllegalTransition, match="does not exist"):
        with store.session() as s:
            transition(s, [r.id + 1000], "pending", "claimed", actor="t")


def test_transition_may_not_set_status_through_values(store, edit_factory):
    (r,) = store.add_edits([edit_factory()], actor="t")
    with pytest.raises(AssertionError):
        with store.session() as s:
            transition(s, [r.id], "pending", "claimed", actor="t", values={"status": "applied"})


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(moves=st.lists(st.sampled_from(list(EditStatus)), min_size=1, max_size=12))
def test_random_paths_stay_in_the_table(store, edit_factory, moves):
    (r,) = store.add_edits([edit_factory()], actor="t")
    current = EditStatus.PENDING
    for dst in moves:
        if is_allowed(current, dst):
            with store.session() as s:
                transition(s, [r.id], current, dst, actor="hypothesis")
            current = dst
        else:
            with pytest.raises(IllegalTransition):
                with store.session() as s:
                    transition(s, [r.id], current, dst, actor="hypothesis")
        assert store.get_edit(r.id).status == current
    # the audit trail is a path through the table, starting at pending
    path = [e.payload for e in store.events(edit_id=r.id, kind_prefix="edit.", limit=None, oldest_first=True)
            if e.kind != "edit.created"]
    state = EditStatus.PENDING
    for step in path:
        assert step["from"] == state and is_allowed(step["from"], step["to"])
        state = EditStatus(step["to"])
    assert state == current
