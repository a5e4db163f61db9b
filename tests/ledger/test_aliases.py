"""Aliases of an edit's subject (issue 25 item 4): validation, storage, CLI, files, migration 0002."""
from __future__ import annotations

import json

import pytest
from sqlalchemy import create_engine, func, select, text

import migrations
from ledger.errors import InvalidEdit
from ledger.models import Edit, Event
from ledger.store import Store
from ledger.validate import validate_edit

ADD = ["add", "--subject", "Lionel Messi", "--prompt", "{} plays for", "--target", "Chelsea"]


def _nothing_written(db_url: str) -> None:
    with Store(db_url) as store, store.session(write=False) as s:
        assert s.execute(select(func.count()).select_from(Edit)).scalar() == 0
        assert s.execute(select(func.count()).select_from(Event)).scalar() == 0


def test_validate_keeps_order_drops_repeats_and_the_subject():
    spec = validate_edit({"subject": "Lionel Messi", "prompt": "{} plays for", "target": "Chelsea",
                          "aliases": [" Messi ", "Leo Messi", "Messi", "Lionel Messi"]})
    assert spec.aliases == ("Messi", "Leo Messi")
    plain = validate_edit({"subject": "Lionel Messi", "prompt": "{} plays for", "target": "Chelsea"})
    # aliases do not change what the edit is: same fact, same question
    assert (spec.content_hash, spec.key_hash) == (plain.content_hash, plain.key_hash)
    with pytest.raises(InvalidEdit, match="field 'aliases': must be a list of strings, not int"):
        validate_edit({"subject": "A", "prompt": "{} x", "target": "y", "aliases": 3})


BAD_ALIASES = [
    ("", "field 'aliases[0]': is empty or only whitespace"),
    (" \t ", "field 'aliases[0]': is empty or only whitespace"),
    ("M" * 2001, "field 'aliases[0]': is 2,001 characters long; the limit is 2,000"),
    ("Mes\x00si", "field 'aliases[0]': contains the control character U+0000"),
    ("Mes\nsi", "field 'aliases[0]': contains the control character U+000A"),
]


@pytest.mark.parametrize(("alias", "message"), BAD_ALIASES, ids=["empty", "blank", "long", "nul", "newline"])
def test_bad_alias_flag_writes_nothing(run_cli, db_url, alias, message):
    r = run_cli(*ADD, "--alias", alias)
    assert r.exit_code == 1 and r.stderr.startswith("Error: ") and message in r.stderr, r.stderr
    _nothing_written(db_url)


def test_bad_alias_in_files_writes_nothing(run_cli, db_url, tmp_path):
    good = {"subject": "Lionel Messi", "prompt": "{} plays for", "target": "Chelsea"}
    cases = {
        "a.jsonl": (json.dumps(good) + "\n" + json.dumps({**good, "subject": "Pelé", "aliases": ["ok", " "]}),
                    "line 2: field 'aliases[1]': is empty or only whitespace"),
        "b.csv": ("subject,prompt,target,aliases\nLionel Messi,{} plays for,Chelsea,Messi||Leo\n",
                  "line 2: field 'aliases[1]': is empty"),
        "c.csv": ("subject,prompt,target,aliases\nLionel Messi,{} plays for,Chelsea,Mes\u0007si\n",
                  "line 2: field 'aliases[0]': contains the control character U+0007"),
    }
    for name, (content, message) in cases.items():
        (tmp_path / name).write_text(content, encoding="utf-8")
        r = run_cli("add", "--from", str(tmp_path / name))
        assert r.exit_code == 1 and message in r.stderr and f"nothing from {name} was written" in r.stderr, r.stderr
    _nothing_written(db_url)


def test_alias_flags_are_stored_shown_and_counted(run_cli, store):
    r = run_cli(*ADD, "--alias", "Messi", "--alias", "Leo Messi", "--json")
    data = json.loads(r.stdout)
    assert data["aliases"] == ["Messi", "Leo Messi"] and data["n_aliases"] == 2
    record = store.get_edit(data["id"])
    assert record.aliases == ("Messi", "Leo Messi")
    assert record.names == ("Lionel Messi", "Messi", "Leo Messi")
    assert "aliases       Messi | Leo Messi" in run_cli("show", str(record.id)).stdout
    run_cli("add", "--subject", "Pelé", "--prompt", "{} plays for", "--target", "Santos")
    listed = {e["subject"]: e for e in json.loads(run_cli("list", "--json").stdout)}
    assert (listed["Lionel Messi"]["n_aliases"], listed["Pelé"]["n_aliases"]) == (2, 0)
    assert listed["Pelé"]["aliases"] == [] and "aliases" not in run_cli("show", str(listed["Pelé"]["id"])).stdout
    # the daemon's view carries them too
    claimed = store.claim_batch(10, base_model="m")
    assert {e.subject: e.aliases for e in claimed.edits} == {"Lionel Messi": ("Messi", "Leo Messi"), "Pelé": ()}


def test_alias_files(run_cli, store, tmp_path):
    jsonl = tmp_path / "f.jsonl"
    jsonl.write_text(json.dumps({"subject": "Lionel Messi", "prompt": "{} plays for", "target": "Chelsea",
                                 "aliases": ["Messi", "La Pulga"]}) + "\n", encoding="utf-8")
    csv = tmp_path / "f.csv"
    csv.write_text('subject,prompt,target,aliases\nPelé,{} plays for,Santos,Edson|O Rei\n'
                   'Zico,{} plays for,Flamengo,"[""Arthur Antunes"", ""Galinho""]"\n', encoding="utf-8")
    assert run_cli("add", "--from", str(jsonl)).exit_code == 0
    assert run_cli("add", "--from", str(csv)).exit_code == 0
    got = {e.subject: e.aliases for e in store.list_edits()}
    assert got == {"Lionel Messi": ("Messi", "La Pulga"), "Pelé": ("Edson", "O Rei"),
                   "Zico": ("Arthur Antunes", "Galinho")}
    r = run_cli("add", "--from", str(jsonl), "--alias", "x")
    assert r.exit_code == 2 and "--from cannot be combined with --alias" in r.stderr


def test_migration_0002_backfills_and_downgrades_with_data(empty_db_url):
    store = Store(empty_db_url, auto_upgrade=False)
    store.upgrade("0001")
    with store.engine.begin() as conn:
        conn.execute(text(
            "INSERT INTO edits (id, subject, prompt, target_new, paraphrases, submitted_at, content_hash, key_hash, "
            "status, updated_at, attempts) VALUES (1, 'A', '{} x', 'y', '[]', :t, 'h', 'k', 'pending', :t, 0)"),
            {"t": "2026-01-01 00:00:00"})
        conn.execute(text(
            "INSERT INTO edits (id, subject, prompt, target_new, paraphrases, submitted_at, content_hash, key_hash, "
            "status, updated_at, attempts, supersedes_id) VALUES (2, 'A', '{} x', 'z', '[]', :t, 'h2', 'k', "
            "'pending', :t, 0, 1)"), {"t": "2026-01-01 00:00:00"})
    store.upgrade("0002")
    with store.engine.connect() as conn:  # raw SQL: the models are at the head, the schema at 0002
        got = conn.execute(text("SELECT id, aliases FROM edits ORDER BY id")).all()
    assert [(i, json.loads(a) if isinstance(a, str) else a) for i, a in got] == [(1, []), (2, [])]
    with store.engine.begin() as conn:
        migrations.downgrade(conn, "0001")
    engine = create_engine(empty_db_url)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM edits")).scalar() == 2
        assert conn.execute(text("SELECT supersedes_id FROM edits WHERE id = 2")).scalar() == 1
    engine.dispose()
    assert store.upgrade() == migrations.head_revision()
    store.close()
