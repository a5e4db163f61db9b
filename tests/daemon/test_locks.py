"""daemon/locks.py: one applier per base model, across processes, on SQLite and PostgreSQL."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from daemon.errors import ApplierBusy
from daemon.locks import advisory_key, applier_lock, model_slug
from ledger.config import load_settings


def _settings(db_url, tmp_path):
    return load_settings(environ={}, db_url=db_url, data_dir=str(tmp_path), snapshot_dir=str(tmp_path / "snaps"))


def _other_process_tries(db_url, tmp_path, model):
    code = textwrap.dedent(f"""
        from daemon.errors import ApplierBusy
        from daemon.locks import applier_lock
        from ledger.config import load_settings
        s = load_settings(environ={{}}, db_url={db_url!r}, data_dir={str(tmp_path)!r},
                          snapshot_dir={str(tmp_path / 'snaps')!r})
        try:
            with applier_lock(s, {model!r}):
                print("got")
        except ApplierBusy as exc:
            print("busy:", exc)
    """)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60).stdout


def test_second_applier_is_refused_then_gets_the_lock(db_url, tmp_path):
    settings = _settings(db_url, tmp_path)
    with applier_lock(settings, "tiny-llama"):
        out = _other_process_tries(db_url, tmp_path, "tiny-llama")
        assert out.startswith("busy:") and "wait for it to finish" in out
        assert _other_process_tries(db_url, tmp_path, "tiny-gpt2").strip() == "got"  # other model: free
        with pytest.raises(ApplierBusy):  # also within one process (a second connection / fd)
            with applier_lock(settings, "tiny-llama"):
                pass
    assert _other_process_tries(db_url, tmp_path, "tiny-llama").strip() == "got"


def test_a_killed_holder_releases_the_file_lock(tmp_path):
    db_url = f"sqlite:///{tmp_path / 'ledger.db'}"
    code = textwrap.dedent(f"""
        import time
        from daemon.locks import applier_lock
        from ledger.config import load_settings
        s = load_settings(environ={{}}, db_url={db_url!r}, data_dir={str(tmp_path)!r})
        with applier_lock(s, "m"):
            print("held", flush=True)
            time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(ApplierBusy):
            with applier_lock(_settings(db_url, tmp_path), "m"):
                pass
    finally:
        proc.kill()
        proc.wait()
    with applier_lock(_settings(db_url, tmp_path), "m"):
        pass


def test_names_and_keys_are_stable():
    assert model_slug("tiny-llama") == "tiny-llama"
    assert model_slug("/srv/models/x").startswith("srv_models_x-")
    assert advisory_key("tiny-llama") == advisory_key("tiny-llama") != advisory_key("tiny-gpt2")
    assert -(2**63) <= advisory_key("m") < 2**63
