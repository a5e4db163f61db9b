"""No command prints or writes a database password; files are private by default (ledger/files.py)."""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import pytest
from click.testing import CliRunner

from ledger.cli import cli
from ledger.config import load_settings, masked_url
from ledger.files import create_file, make_dir, process_umask, write_file
from ledger.store import Store
from ledger.validate import EditSpec

SECRET = "hunter2-secret"
PG_URL = f"postgresql+psycopg://ledger:{SECRET}@127.0.0.1:1/ledger"


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("url", [PG_URL, f"postgresql://u:{SECRET}@h/x", f"postgresql://h/x?password={SECRET}&a=1",
                                 f"postgresql://u:{SECRET}@with@at@h:5432/x"])
def test_masked_url_hides_the_password(url):
    assert SECRET not in masked_url(url) and "***" in masked_url(url)


def test_python_m_ledger_config_does_not_print_the_password(tmp_path):
    env = {**os.environ, "HORSE_LEDGER_DB": PG_URL, "XDG_CONFIG_HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-m", "ledger.config"], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert SECRET not in out.stdout + out.stderr and "ledger:***@127.0.0.1" in out.stdout


def test_init_writes_a_private_config_without_the_password(tmp_path):
    path = tmp_path / "conf" / "config.toml"
    r = CliRunner().invoke(cli, ["--db", PG_URL, "init", str(path)])
    assert r.exit_code == 0, r.output
    assert _mode(path) == 0o600 and SECRET not in path.read_text() + r.output


def test_an_unreachable_database_error_does_not_print_the_password(tmp_path):
    r = CliRunner().invoke(cli, ["--db", PG_URL, "status"], env={"XDG_CONFIG_HOME": str(tmp_path)})
    assert r.exit_code == 1 and "database" in r.stderr
    assert SECRET not in r.output + r.stderr


@pytest.mark.parametrize(("is_group", "file_mode", "dir_mode"), [(False, 0o600, 0o700), (True, 0o660, 0o770)])
def test_the_cli_creates_the_sqlite_database_private_or_group(tmp_path, is_group, file_mode, dir_mode):
    data = tmp_path / "data"
    env = {"XDG_DATA_HOME": str(data), "XDG_CONFIG_HOME": str(tmp_path / "cfg"), "HORSE_LEDGER_DB": None,
           "HORSE_LEDGER_FILE_MODE_GROUP": "true" if is_group else "false"}
    before = os.umask(0o022)
    try:
        r = CliRunner().invoke(cli, ["add", "--subject", "A", "--prompt", "{} is", "--target", "B"], env=env)
        assert r.exit_code == 0, r.output
        assert os.umask(0o022) == 0o022  # the command put the process umask back
    finally:
        os.umask(before)
    db = data / "horse-ledger" / "ledger.db"
    assert _mode(db) == file_mode and _mode(db.parent) == dir_mode


def test_files_helpers(tmp_path):
    d = make_dir(tmp_path / "a" / "b")
    assert _mode(tmp_path / "a") == 0o700 and _mode(d) == 0o700
    f = write_file(d / "x.json", json.dumps({"k": 1}))
    assert _mode(f) == 0o600 and json.loads(f.read_text()) == {"k": 1}
    assert _mode(write_file(d / "g.bin", b"1", is_group=True)) == 0o660
    assert _mode(create_file(tmp_path / "c" / "new.db")) == 0o600
    with process_umask(True):
        (tmp_path / "u").mkdir()
        (tmp_path / "u" / "f").write_text("x")
    assert _mode(tmp_path / "u") == 0o770 and _mode(tmp_path / "u" / "f") == 0o660


def test_group_mode_is_a_setting():
    assert load_settings(environ={"HORSE_LEDGER_FILE_MODE_GROUP": "true"}).file_mode_group is True
    assert load_settings(environ={}).file_mode_group is False


def test_list_and_show_never_print_raw_control_or_bidi_characters(tmp_path):
    url = f"sqlite:///{tmp_path / 'l.db'}"
    with Store(url) as store:  # an old row, stored before bidi controls were refused
        (res,) = store.add_edits([EditSpec(subject="Eve\u202eil", prompt="{} is \u2066x\u2069", target_new="A\x1bB")],
                                 actor="t")
    for args in (["list"], ["show", str(res.id)], ["list", "--json"], ["show", str(res.id), "--json"]):
        out = CliRunner().invoke(cli, ["--db", url, *args]).output
        assert not any(ch in out for ch in "\u202e\u2066\u2069\x1b"), out
        assert "\\u202e" in out
        if "--json" in args:  # escaped, the same JSON value
            data = json.loads(out)
            assert (data[0] if isinstance(data, list) else data)["subject"] == "Eve\u202eil"
