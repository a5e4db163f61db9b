"""daemon/snapshots.py: atomic delta files, hashes, orphan cleanup; daemon/cli.py init."""
from __future__ import annotations

import json

import pytest
import torch

from daemon import snapshots
from daemon.errors import SnapshotCorrupt
from horse.deltas import LayerDelta


def _deltas():
    g = torch.Generator().manual_seed(0)
    return {"model.layers.5.mlp.down_proj": LayerDelta(keys_NK=torch.randn(3, 8, generator=g),
                                                       coef_NV=torch.randn(3, 4, generator=g))}


def test_write_read_hash_and_metadata(tmp_path):
    meta = snapshots.snapshot_metadata(base_model="tiny-llama", base_fingerprint="b" * 64, hypernet_fingerprint="h",
                                       parent_snapshot_id=None, batch_id=7, edit_ids=[3, 1])
    seen = []
    f = snapshots.write_snapshot(tmp_path, "tiny-llama", "b000007-x", _deltas(), meta, on_stage=seen.append)
    assert seen == ["mid-write"] and f.rel_path == "tiny-llama/b000007-x.safetensors"
    assert snapshots.hash_file(tmp_path / f.rel_path) == f.sha256 and f.bytes == (tmp_path / f.rel_path).stat().st_size
    deltas, got = snapshots.read_snapshot(tmp_path, f.rel_path, sha256=f.sha256)
    assert torch.equal(deltas["model.layers.5.mlp.down_proj"].to_dense(), _deltas()["model.layers.5.mlp.down_proj"].to_dense())
    assert got["edit_ids"] == "[1, 3]" and got["parent_snapshot"] == "" and got["batch_id"] == "7"
    with pytest.raises(SnapshotCorrupt):  # never overwritten
        snapshots.write_snapshot(tmp_path, "tiny-llama", "b000007-x", _deltas(), meta)
    (tmp_path / f.rel_path).write_bytes((tmp_path / f.rel_path).read_bytes()[:-3] + b"xyz")
    with pytest.raises(SnapshotCorrupt, match="sha256"):
        snapshots.read_snapshot(tmp_path, f.rel_path, sha256=f.sha256)


def test_a_crash_mid_write_leaves_a_temp_file_that_cleanup_removes(tmp_path):
    class Crash(Exception):
        pass

    def crash(stage):
        raise Crash(stage)

    keep = snapshots.write_snapshot(tmp_path, "m", "b000001-0000aaaa", _deltas(), {"a": "b"})
    with pytest.raises(Crash):
        snapshots.write_snapshot(tmp_path, "m", "b000002-0000bbbb", _deltas(), {"a": "b"}, on_stage=crash)
    uncommitted = snapshots.write_snapshot(tmp_path, "m", "c000003-0000cccc", _deltas(), {"a": "b"})
    (tmp_path / "m" / "notes.safetensors").write_bytes(b"a user's file")  # not our name: never deleted
    names = sorted(p.name for p in (tmp_path / "m").iterdir())
    assert ".b000002-0000bbbb.safetensors.tmp" in names and "c000003-0000cccc.safetensors" in names
    removed = snapshots.remove_orphans(tmp_path, "m", [keep.rel_path])
    assert sorted(p.name for p in removed) == [".b000002-0000bbbb.safetensors.tmp", "c000003-0000cccc.safetensors"]
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["b000001-0000aaaa.safetensors", "notes.safetensors"]
    assert uncommitted.rel_path not in [p.name for p in (tmp_path / "m").iterdir()]


def test_init_writes_a_loadable_commented_config(tmp_path):
    from click.testing import CliRunner

    from ledger.cli import cli
    from ledger.config import load_settings

    path = tmp_path / "config.toml"
    runner = CliRunner()
    r = runner.invoke(cli, ["--db", f"sqlite:///{tmp_path / 'l.db'}", "init", str(path)])
    assert r.exit_code == 0, r.output
    text = path.read_text()
    assert "# --- the regression gate" in text and 'schedule_cron = "0 2 * * *"' in text
    s = load_settings(config_path=path, environ={})
    assert (s.model, s.gate_bisect_depth) == ("smollm2-135m", 4)
    again = runner.invoke(cli, ["--db", f"sqlite:///{tmp_path / 'l.db'}", "init", str(path)])
    assert again.exit_code == 1 and "already exists" in again.output


def test_log_lines_are_json_with_batch_ids():
    import io
    import logging

    from daemon.logs import configure_logging, log_context

    buf = io.StringIO()
    configure_logging("auto", stream=buf)  # not a TTY → JSON
    with log_context(batch_id=12):
        with log_context(snapshot_id=3):
            logging.getLogger("daemon.cycle").info("published", extra={"bytes": 10})
    line = json.loads(buf.getvalue().strip().splitlines()[-1])
    assert (line["msg"], line["batch_id"], line["snapshot_id"], line["bytes"]) == ("published", 12, 3, 10)


@pytest.mark.parametrize("stored", ["/etc/passwd", "../outside.safetensors", "m/../../outside.safetensors", ""])
def test_a_stored_path_outside_the_snapshot_dir_is_refused(tmp_path, stored):
    with pytest.raises(SnapshotCorrupt, match="run `horse-ledger verify`"):
        snapshots.resolve(tmp_path / "snaps", stored)
    with pytest.raises(SnapshotCorrupt):
        snapshots.read_snapshot(tmp_path / "snaps", stored)


def test_a_symlink_out_of_the_snapshot_dir_is_refused_and_never_deleted(tmp_path):
    outside = tmp_path / "precious.safetensors"
    outside.write_bytes(b"x")
    (tmp_path / "snaps" / "m").mkdir(parents=True)
    link = tmp_path / "snaps" / "m" / "b000001-0000aaaa.safetensors"
    link.symlink_to(outside)
    with pytest.raises(SnapshotCorrupt, match="symlink"):
        snapshots.resolve(tmp_path / "snaps", "m/b000001-0000aaaa.safetensors")
    assert snapshots.remove_orphans(tmp_path / "snaps", "m", ["/etc/passwd", "../x"]) == []
    assert outside.exists() and link.is_symlink()


def test_orphan_cleanup_deletes_only_the_project_names():
    ok = ["b000012-1a2b3c4d.safetensors", ".b000012-1a2b3c4d.safetensors.tmp", "c000003-deadbeef.safetensors",
          "b1234567-00000000.normaliser.safetensors", ".b000012-1a2b3c4d.normaliser.safetensors.tmp"]
    not_ours = ["model.safetensors", "b12-1a2b3c4d.safetensors", "b000012-1A2B3C4D.safetensors", "notes.txt",
                "b000012-1a2b3c4d.safetensors.bak", "x.tmp", "b000012-1a2b3c4d.safetensors/evil"]
    assert all(snapshots.is_snapshot_file_name(n) for n in ok)
    assert not any(snapshots.is_snapshot_file_name(n) for n in not_ours)


def test_verify_reports_a_stored_path_outside_the_snapshot_dir(tmp_path):
    from click.testing import CliRunner

    from ledger.cli import cli
    from ledger.models import Snapshot, utcnow
    from ledger.store import Store

    url = f"sqlite:///{tmp_path / 'l.db'}"
    with Store(url) as store, store.session() as s:
        snap = Snapshot(parent_id=None, base_model="tiny-llama", path="../../etc/passwd", sha256="0" * 64,
                        bytes=10, created_at=utcnow(), metrics={})
        s.add(snap)
        s.flush()
        snap_id = snap.id
    env = {"HORSE_LEDGER_MODEL": "tiny-llama", "HORSE_LEDGER_SNAPSHOT_DIR": str(tmp_path / "snaps")}
    r = CliRunner().invoke(cli, ["--db", url, "verify", str(snap_id), "--no-materialise"], env=env)
    assert r.exit_code == 1 and isinstance(r.exception, SystemExit), r.output  # a report, not a traceback
    assert "FAIL" in r.output and "is not inside the snapshot directory" in r.output
