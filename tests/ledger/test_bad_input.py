"""Bad input: each case gives a clear message, a non-zero exit, and writes nothing (both backends)."""
from __future__ import annotations

import json

import pytest
from sqlalchemy import func, select

from ledger.models import Edit, Event
from ledger.store import Store

GOOD = {"subject": "Danielle Darrieux", "prompt": "The mother tongue of {} is", "target": "English",
        "target_true": "French"}


def _flags(**fields: str) -> list[str]:
    args = ["add"]
    for k, v in {**GOOD, **fields}.items():
        args += [f"--{k.replace('_', '-')}", v]
    return args


def _assert_nothing_written(db_url: str) -> None:
    with Store(db_url) as store, store.session(write=False) as s:
        assert s.execute(select(func.count()).select_from(Edit)).scalar() == 0
        assert s.execute(select(func.count()).select_from(Event)).scalar() == 0


FLAG_CASES = [
    ({"subject": ""}, "field 'subject': is empty or only whitespace"),
    ({"target": "   \t "}, "field 'target': is empty or only whitespace"),
    ({"prompt": "Her mother tongue is"}, "neither has a '{}' slot nor contains the subject 'Danielle Darrieux'"),
    ({"prompt": "{} and {} speak"}, "has 2 '{}' slots"),
    ({"target": "French"}, "field 'target': target 'French' equals target_true"),
    ({"target": "x" * 2001}, "field 'target': is 2,001 characters long; the limit is 2,000"),
    ({"note": "n" * 5000}, "field 'note': is 5,000 characters long"),
    ({"subject": "Danielle\x00Darrieux"}, "field 'subject': contains the control character U+0000"),
    ({"target": "Eng\x1blish"}, "contains the control character U+001B"),
]


@pytest.mark.parametrize(("fields", "message"), FLAG_CASES, ids=[c[1][:30] for c in FLAG_CASES])
def test_bad_flags(run_cli, db_url, fields, message):
    r = run_cli(*_flags(**fields))
    assert r.exit_code == 1
    assert message in r.stderr and r.stderr.startswith("Error: ")
    _assert_nothing_written(db_url)


def _jsonl(*records: object) -> str:
    return "\n".join(r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) for r in records) + "\n"


FILE_CASES = [
    ("unknown-field.jsonl", _jsonl(GOOD, {**GOOD, "subject": "B", "targte": "x"}),
     "line 2: field 'targte': unknown field 'targte'"),
    ("malformed-middle.jsonl", _jsonl(GOOD, '{"subject": "B", "prompt": ', {**GOOD, "subject": "C"}),
     "line 2: malformed JSON"),
    ("not-object.jsonl", _jsonl(GOOD, '["a", "b"]'), "line 2: a JSON list, not an object"),
    ("empty-field.jsonl", _jsonl(GOOD, {**GOOD, "subject": "B", "prompt": "{} x", "target": " "}),
     "line 2: field 'target': is empty"),
    ("wrong-type.jsonl", _jsonl({**GOOD, "paraphrases": "ok"}, {**GOOD, "subject": "B", "target": 3}),
     "line 2: field 'target': must be text, not int 3"),
    ("control.jsonl", _jsonl({**GOOD, "note": "bell\u0007"}), "line 1: field 'note': contains the control character U+0007"),
    ("long.jsonl", _jsonl({**GOOD, "paraphrases": ["Danielle Darrieux " + "y" * 2000]}),
     "line 1: field 'paraphrases[0]': is 2,018 characters long"),
    ("missing-cols.csv", "subject,target\nParis,Italy\n", "line 1: missing column(s) prompt"),
    ("unknown-col.csv", "subject,prompt,target,colour\nParis,{} is in,Italy,red\n", "unknown column 'colour'"),
    ("bad-row.csv", "subject,prompt,target\nParis,{} is in,Italy\nRome,{} is in,Spain,extra\n",
     "line 3: more cells than header columns"),
    ("same.csv", "subject,prompt,target,target_true\nParis,{} is in,Italy,italy\n",
     "line 2: field 'target': target 'Italy' equals target_true"),
    ("facts.txt", _jsonl(GOOD), "cannot tell the format from the extension '.txt'"),
]


@pytest.mark.parametrize(("name", "content", "message"), FILE_CASES, ids=[c[0] for c in FILE_CASES])
def test_bad_files(run_cli, db_url, tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    r = run_cli("add", "--from", str(path))
    assert r.exit_code == 1, r.output
    assert message in r.stderr
    assert f"nothing from {name} was written" in r.stderr
    _assert_nothing_written(db_url)


def test_invalid_utf8_names_the_line(run_cli, db_url, tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(_jsonl(GOOD).encode() + b'{"subject": "Z\xfcrich", "prompt": "{} is in", "target": "X"}\n')
    r = run_cli("add", "--from", str(path))
    assert r.exit_code == 1
    assert "latin1.jsonl: line 2: not valid UTF-8 (byte 0xfc at column 15); save the file as UTF-8" in r.stderr
    _assert_nothing_written(db_url)


def test_unopenable_db_url(run_cli, tmp_path):
    for url in (f"sqlite:///{tmp_path / 'no' / 'such' / 'dir' / 'l.db'}", "postgresql+psycopg://u@127.0.0.1:1/x",
                "bogus://nowhere"):
        r = run_cli(*_flags(), db=url)
        assert r.exit_code == 1 and "Error: " in r.stderr and "database" in r.stderr, (url, r.stderr)
    assert not (tmp_path / "no").exists()


VERBATIM = [
    ("Robert'); DROP TABLE edits;--", "{} was born in", "Bobby \"Tables\" % _ \\ ;"),
    ("東京タワー", "{}は何色ですか", "赤と白"),
    ("Москва", "{} является столицей", "России"),
    ("القاهرة", "{} هي عاصمة", "مصر"),
    ("👩‍🔬 Marie Curie", "{} was born in", "Warszawa"),
]


def test_sql_metacharacters_and_scripts_are_stored_verbatim(run_cli, db_url):
    for subject, prompt, target in VERBATIM:
        r = run_cli("add", "--subject", subject, "--prompt", prompt, "--target", target, "--note", "'; --")
        assert r.exit_code == 0, r.stderr
    for i, (subject, prompt, target) in enumerate(VERBATIM, start=1):
        data = json.loads(run_cli("show", str(i), "--json").stdout)
        assert (data["subject"], data["prompt"], data["target_new"], data["note"]) == (subject, prompt, target, "'; --")
        assert data["rendered_prompt"] == prompt.replace("{}", subject)
        listed = json.loads(run_cli("list", "--subject", subject, "--json").stdout)
        assert [e["id"] for e in listed] == [i]
        assert subject in run_cli("show", str(i)).stdout
    assert json.loads(run_cli("status", "--json").stdout)["counts"]["pending"] == len(VERBATIM)
