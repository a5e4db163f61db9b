"""A ledger with three nights behind it, written through the ledger's own API, for the operator-view tests.

    ids = populate(store)    # {"edits": [...], "hostile": id, "rejected": id, "snapshots": [s1, s2, s3]}

Night 1 publishes snapshot 1 (3 edits), night 2 publishes snapshot 2 on it (2 edits) and rejects one edit
with a reason, night 3 folds both into a consolidated snapshot 3 (5 edits). One edit's subject is hostile
text (a script tag and a right-to-left override); one edit is still pending.
"""
from __future__ import annotations

from datetime import timedelta
from typing import Any

from sqlalchemy import update

from ledger.models import Batch, Edit, Snapshot, SnapshotEdit, utcnow
from ledger.status import EditStatus, transition
from ledger.store import Store, set_head
from ledger.validate import validate_edit

MODEL = "tiny-llama"
HOSTILE = '<script>window.pwned=1</script>Evil\u202eCorp'
REJECT_REASON = "gate: canary agreement 0.800 < 0.95 (isolated by bisection in a group of 1 edits: [5])"


def _spec(subject: str, target: str, **extra: Any) -> Any:
    return validate_edit({"subject": subject, "prompt": "The color of {} is", "target": target, **extra})


def _night(store: Store, n: int, *, gate: dict[str, Any], reject: int = 0, parent: int | None,
           kind: str = "incremental", carried: list[int] | None = None) -> tuple[int, list[int]]:
    """Claim n pending edits; reject the last `reject` of them; publish the rest as one snapshot."""
    claimed = store.claim_batch(n, base_model=MODEL, actor="test")
    ids = [e.id for e in claimed.edits]
    applied, refused = ids[: len(ids) - reject], ids[len(ids) - reject:]
    with store.session() as s:
        for i in refused:
            transition(s, [i], EditStatus.CLAIMED, EditStatus.REJECTED, actor="test", reason=REJECT_REASON,
                       batch_id=claimed.batch_id, values={"claim_token": None, "last_error": REJECT_REASON})
        metrics = {"gate": gate, "efficacy_mean": 0.9, "cumulative_norm_max": gate.pop("norm"),
                   "chain_length": 1 if parent is None else 2, "n_edits": len(applied)}
        snap = Snapshot(parent_id=parent, batch_id=claimed.batch_id, base_model=MODEL, kind=kind,
                        path=f"{MODEL}/b{claimed.batch_id:06d}.safetensors", sha256="0" * 64, bytes=1000 * n,
                        created_at=utcnow(), status="published", metrics=metrics)
        s.add(snap)
        s.flush()
        s.add_all(SnapshotEdit(snapshot_id=snap.id, edit_id=i) for i in (carried or []) + applied)
        set_head(s, MODEL, snap.id, actor="test", reason="test night")
        transition(s, applied, EditStatus.CLAIMED, EditStatus.APPLIED, actor="test", batch_id=claimed.batch_id,
                   snapshot_id=snap.id, values={"claim_token": None})
        batch = s.get(Batch, claimed.batch_id)
        batch.status, batch.finished_at = "published", utcnow() - timedelta(hours=3 - n)
        batch.metrics = {"gate": dict(gate), "n_claimed": len(ids), "n_applied": len(applied),
                         "n_failed": 0, "n_rejected": len(refused), "timings_s": {"edit": 1.5, "gate": 0.5,
                                                                                  "total": 2.5}}
        return snap.id, applied


def populate(store: Store) -> dict[str, Any]:
    """Fill `store` (empty, at the schema head) with three nights; returns the ids the tests look for."""
    specs = [_spec(f"Subject {i}", "red", source="https://example.org/facts", author="alice") for i in range(3)]
    specs.append(_spec(HOSTILE.replace("\u202e", ""), "blue", source="<b>bold</b>", author="mallory"))
    specs += [_spec("Subject 4", "gold", author="bob"), _spec("Subject 5", "jade", author="bob")]
    ids = [r.id for r in store.add_edits(specs, actor="cli:test")]
    with store.session() as s:  # validation refuses bidi controls now; a row from before that rule still has them
        s.execute(update(Edit).where(Edit.id == ids[3]).values(subject=HOSTILE, note="\u2067isolate\u2069"))
    s1, a1 = _night(store, 3, gate={"canary_agreement": 1.0, "retention": 1.0, "norm": 0.5}, parent=None)
    s2, a2 = _night(store, 3, gate={"canary_agreement": 0.97, "retention": 0.95, "ns": 0.8, "norm": 0.75},
                    reject=1, parent=s1)
    pending = store.add_edits([_spec("Subject 6", "teal", author="carol")], actor="cli:test")[0].id
    with store.session() as s:  # a fold: a consolidated snapshot of every edit on the chain, parent none
        batch = Batch(token="fold-token", base_model=MODEL, status="published", actor="test", n_edits=0,
                      started_at=utcnow(), finished_at=utcnow(), metrics={"gate": {"canary_agreement": 0.99}})
        s.add(batch)
        s.flush()
        snap = Snapshot(parent_id=None, batch_id=batch.id, base_model=MODEL, kind="consolidated", path="x",
                        sha256="1" * 64, bytes=5000, created_at=utcnow(), status="published",
                        metrics={"gate": {"canary_agreement": 0.99, "retention": 0.98, "ns": 0.82},
                                 "cumulative_norm_max": 0.6, "chain_length": 1})
        s.add(snap)
        s.flush()
        s.add_all(SnapshotEdit(snapshot_id=snap.id, edit_id=i) for i in a1 + a2)
        set_head(s, MODEL, snap.id, actor="test", reason="fold")
        s3 = snap.id
    return {"edits": ids, "hostile": ids[3], "rejected": ids[5], "pending": pending, "snapshots": [s1, s2, s3],
            "applied": a1 + a2}
