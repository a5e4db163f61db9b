"""Crash safety with real processes: SIGKILL at every stage of a batch, SIGTERM, and two appliers at once.

A batch runs in a subprocess (`_runner.py`-style script below) that prints each stage as it reaches it and
sleeps at the stage under test; the test kills it there with SIGKILL, then runs the next batch in process
and checks: no edit lost or stuck, no partial snapshot visible, orphan temp files removed, head = the last
published snapshot. On SQLite and PostgreSQL.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from daemon.cycle import run_batch
from daemon.snapshots import model_dir
from ledger.store import Store
from tests.daemon.conftest import REPO_ROOT, fact, subprocess_env, write_config

RUNNER = textwrap.dedent("""
    import os, signal, sys, threading, time
    from ledger.config import load_settings
    from ledger.store import Store
    from daemon.cycle import run_batch
    cfg, pause_at, pause_s = sys.argv[1], sys.argv[2], float(sys.argv[3])
    go_file = sys.argv[4] if len(sys.argv) > 4 else None
    settings = load_settings(config_path=cfg, environ={})
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    def on_stage(name):
        print("STAGE", name, flush=True)
        if name == pause_at:
            deadline = time.monotonic() + pause_s
            while time.monotonic() < deadline and not (go_file and os.path.exists(go_file)):
                time.sleep(0.05)
    result = run_batch(settings, Store(settings.db_url), on_stage=on_stage, stop=stop)
    print("RESULT", result.status, result.snapshot_id, flush=True)
""")


def _start(cfg: Path, pause_at: str, pause_s: float = 600.0, go_file: Path | None = None) -> subprocess.Popen:
    extra = [str(go_file)] if go_file else []
    return subprocess.Popen([sys.executable, "-c", RUNNER, str(cfg), pause_at, str(pause_s), *extra], cwd=REPO_ROOT,
                            env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_stage(proc: subprocess.Popen, stage: str, timeout_s: float = 300.0) -> list[str]:
    seen = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise AssertionError(f"runner exited before stage {stage}: seen {seen}; stderr: {proc.stderr.read()[-3000:]}")
        if line.startswith("STAGE "):
            seen.append(line.split()[1])
            if seen[-1] == stage:
                return seen
    raise AssertionError(f"stage {stage} not reached in {timeout_s} s: {seen}")


def _setup(db_url, daemon_settings, tmp_path, n_edits=3, scope="off"):
    settings = daemon_settings(db_url, gate_min_efficacy=0.0, scope=scope)  # every edit publishes: about state
    cfg = write_config(tmp_path / "config.toml", settings)
    store = Store(db_url)
    from ledger.validate import validate_edit
    store.add_edits([validate_edit(fact(i)) for i in range(n_edits)], actor="test")
    return settings, cfg, store


@pytest.mark.parametrize("scope,stage", [("off", "claimed"), ("off", "editing"), ("off", "mid-write"),
                                         ("off", "written"), ("routed", "editing"), ("routed", "mid-write"),
                                         ("routed", "written")])
def test_sigkill_at_each_stage_loses_nothing(scope, stage, db_url, daemon_settings, tmp_path):
    settings, cfg, store = _setup(db_url, daemon_settings, tmp_path, scope=scope)
    proc = _start(cfg, stage)
    try:
        _wait_for_stage(proc, stage)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stdout.close()
        proc.stderr.close()
    # the killed batch left its edits claimed and no snapshot visible
    assert store.status_counts()["claimed"] == 3
    assert store.list_snapshots() == [] and store.head("tiny-llama") is None
    files = sorted(p.name for p in model_dir(settings.snapshot_dir, "tiny-llama").glob("*")) \
        if model_dir(settings.snapshot_dir, "tiny-llama").is_dir() else []
    if stage == "mid-write":
        assert any(".tmp" in f for f in files), files
    if stage == "written":
        assert any(f.endswith(".safetensors") and not f.startswith(".") for f in files), files

    # the next batch recovers: claims back, debris removed, everything published once
    result = run_batch(settings, store)
    assert result.status == "published", result
    counts = store.status_counts()
    assert counts["claimed"] == 0 and counts["pending"] == 0 and counts["applied"] == 3, counts
    snaps = store.list_snapshots()
    assert [s.id for s in snaps] == [result.snapshot_id] and store.head("tiny-llama").id == result.snapshot_id
    left = sorted(p.name for p in model_dir(settings.snapshot_dir, "tiny-llama").iterdir() if p.is_file())
    assert left == [Path(snaps[0].path).name], left  # orphans gone, only the published file
    kinds = [e.kind for e in store.events(limit=None, oldest_first=True)]
    assert "batch.abandoned" in kinds
    batches = [store.get_batch(i) for i in (1, 2)]
    assert batches[0].status == "abandoned" and batches[1].status == "published"
    from daemon.audit import verify
    assert verify(settings, store).ok
    store.close()


def test_sigterm_abandons_the_batch_cleanly(db_url, daemon_settings, tmp_path):
    settings, cfg, store = _setup(db_url, daemon_settings, tmp_path)
    proc = _start(cfg, "materialised", pause_s=3.0)
    try:
        _wait_for_stage(proc, "materialised")
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-2000:]
    assert "RESULT abandoned" in out
    assert store.status_counts()["pending"] == 3 and store.list_snapshots() == []
    assert store.get_batch(1).status == "abandoned"
    store.close()


def test_two_appliers_never_both_edit(db_url, daemon_settings, tmp_path):
    settings, cfg, store = _setup(db_url, daemon_settings, tmp_path)
    go = tmp_path / "go"
    first = _start(cfg, "editing", pause_s=600.0, go_file=go)  # holds the lock mid-batch until `go` exists
    try:
        _wait_for_stage(first, "editing")
        second = subprocess.run([sys.executable, "-m", "ledger", "--config", str(cfg), "apply", "--json"],
                                cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
        go.touch()
        out, err = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
    assert second.returncode == 1 and "is applying edits to tiny-llama" in second.stderr, second.stderr[-2000:]
    assert first.returncode == 0 and "RESULT published" in out, err[-2000:]
    assert len(store.list_snapshots()) == 1 and store.last_batch().id == 1  # the second never claimed
    assert store.status_counts()["applied"] == 3
    store.close()
