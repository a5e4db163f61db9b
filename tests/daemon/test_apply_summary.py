"""daemon/cli.py: the apply summary names the published snapshot's real parent, never the old head's id."""
from __future__ import annotations

import click
import pytest

from daemon.cli import _print_batch
from daemon.cycle import BatchResult
from ledger.cli import AppContext
from ledger.config import load_settings
from ledger.models import Snapshot, utcnow
from ledger.store import Store


@pytest.mark.parametrize("has_parent", [False, True])
def test_summary_names_the_snapshot_row_parent(tmp_path, capsys, has_parent):
    url = f"sqlite:///{tmp_path / 'l.db'}"
    with Store(url) as store, store.session() as s:
        first = Snapshot(parent_id=None, base_model="m", path="m/b000001-00000000.safetensors", sha256="0" * 64,
                         bytes=10, created_at=utcnow(), metrics={})
        s.add(first)
        s.flush()
        snap = Snapshot(parent_id=first.id if has_parent else None, base_model="m", kind="consolidated"
                        if not has_parent else "incremental", path="m/b000002-00000000.safetensors",
                        sha256="0" * 64, bytes=10, created_at=utcnow(), metrics={})
        s.add(snap)
        s.flush()
        ids = (first.id, snap.id)
    app = AppContext(settings=load_settings(db_url=url, environ={}))
    result = BatchResult("published", batch_id=2, snapshot_id=ids[1], parent_snapshot_id=ids[0])  # head was ids[0]
    with click.Context(click.Command("apply"), obj=app):
        _print_batch(result)
    out = capsys.readouterr().out
    if has_parent:
        assert f"published snapshot {ids[1]} (parent {ids[0]})" in out
    else:
        assert f"published snapshot {ids[1]} (no parent: from the base)" in out and "(parent " not in out
