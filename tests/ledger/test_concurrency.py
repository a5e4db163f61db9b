"""4 real processes claim from 1,000 pending edits at once: every edit is claimed exactly once (both backends)."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from sqlalchemy import func, select

from ledger.models import Batch, Edit, Event

WORKER = Path(__file__).with_name("claim_worker.py")
N_EDITS, N_WORKERS, BATCH_SIZE = 1000, 4, 25


def test_four_processes_claim_each_edit_exactly_once(store, db_url, edit_factory, tmp_path):
    store.add_edits([edit_factory() for _ in range(N_EDITS)], actor="t")
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, str(WORKER), db_url, str(BATCH_SIZE), str(go)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(N_WORKERS)]
    deadline = time.monotonic() + 120
    while len(list(tmp_path.glob("go.ready.*"))) < N_WORKERS:  # every worker has imported and connected
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "a worker never got ready"
        time.sleep(0.05)
    go.touch()
    outputs = []
    for p in procs:
        out, err = p.communicate(timeout=240)
        assert p.returncode == 0, err
        outputs.append(json.loads(out))

    claimed = [i for out in outputs for _, _, ids in out for i in ids]
    counts = Counter(claimed)
    assert len(claimed) == N_EDITS and set(counts.values()) == {1}
    assert sum(1 for out in outputs if out) >= 2, "the workers did not overlap; the test proves nothing"
    batches = [(b, tok, ids) for out in outputs for b, tok, ids in out]
    assert len({b for b, _, _ in batches}) == len(batches)
    with store.session(write=False) as s:
        rows = s.execute(select(Edit.id, Edit.status, Edit.attempts, Edit.batch_id, Edit.claim_token)).all()
        assert len(rows) == N_EDITS
        assert all(st == "claimed" and att == 1 for _, st, att, _, _ in rows)
        owner = {i: (b, tok) for b, tok, ids in batches for i in ids}
        assert all(owner[i] == (b, tok) for i, _, _, b, tok in rows)
        n_events = s.execute(select(func.count()).select_from(Event).where(Event.kind == "edit.claimed")).scalar()
        assert n_events == N_EDITS
        assert s.execute(select(func.sum(Batch.n_edits))).scalar() == N_EDITS
