"""ledger/cli.py: the commands people use, their output, exit codes, and the lazy root group."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from ledger import cli as cli_module
from ledger.cli import LAZY_COMMANDS, cli

REPO_ROOT = Path(__file__).resolve().parents[2]
ADD = ["add", "--subject", "Danielle Darrieux", "--prompt", "The mother tongue of {} is", "--target", "English",
       "--target-true", "French"]


def test_add_prints_id_and_is_idempotent(run_cli):
    r = run_cli(*ADD, "--source", "https://en.wikipedia.org/wiki/Danielle_Darrieux", "--author", "alice")
    assert r.exit_code == 0 and r.stdout.strip() == "1"
    again = run_cli(*ADD)
    assert again.exit_code == 0 and again.stdout.strip() == "1"
    assert "already holds this fact (pending); nothing added" in again.stderr
    newer = run_cli("add", "--subject", "Danielle Darrieux", "--prompt", "The mother tongue of {} is",
                    "--target", "German", "--json")
    data = json.loads(newer.stdout)
    assert data["id"] == 2 and data["created"] and data["superseded_id"] == 1 and data["supersedes_id"] == 1
    assert data["rendered_prompt"] == "The mother tongue of Danielle Darrieux is"
    assert "edit 2 supersedes pending edit 1" in newer.stderr


def test_list_show_log_status_cancel(run_cli):
    run_cli(*ADD, "--paraphrase", "Danielle Darrieux grew up speaking", "--note", "demo")
    run_cli("add", "--subject", "Eiffel Tower", "--prompt", "The Eiffel Tower is in", "--target", "Rome")
    out = run_cli("list").stdout
    assert out.splitlines()[0].split() == ["ID", "STATUS", "SUBMITTED", "SUBJECT", "PROMPT", "TARGET"]
    assert "Eiffel Tower" in out.splitlines()[1]  # newest first
    assert [e["id"] for e in json.loads(run_cli("list", "--json", "--subject", "darr").stdout)] == [1]
    assert json.loads(run_cli("list", "--status", "cancelled", "--json").stdout) == []
    assert run_cli("list", "--since", "2000-01-01", "--limit", "1", "--json").stdout.count('"id"') == 1

    shown = run_cli("show", "1").stdout
    assert "The mother tongue of Danielle Darrieux is" in shown and "history" in shown and "edit.created" in shown
    data = json.loads(run_cli("show", "1", "--json").stdout)
    assert data["paraphrases"] == ["Danielle Darrieux grew up speaking"] and data["events"][0]["kind"] == "edit.created"

    r = run_cli("cancel", "2", "--reason", "wrong")
    assert r.exit_code == 0 and "edit 2 cancelled" in r.stdout
    again = run_cli("cancel", "2")
    assert again.exit_code == 1 and "edit 2 is already cancelled; nothing to do" in again.stderr
    log = json.loads(run_cli("log", "--edit", "2", "--json").stdout)
    assert [e["kind"] for e in log] == ["edit.cancelled", "edit.created"] and log[0]["reason"] == "wrong"
    assert "edit.cancelled" in run_cli("log").stdout.splitlines()[0]

    status = json.loads(run_cli("status", "--json").stdout)
    assert status["counts"]["pending"] == 1 and status["counts"]["cancelled"] == 1 and status["total"] == 2
    assert status["last_batch"] is None and status["heads"] == {}
    assert "pending" in run_cli("status").stdout

    missing = run_cli("show", "99")
    assert missing.exit_code == 1 and "no edit has id 99" in missing.stderr


def test_add_from_files(run_cli, tmp_path):
    jsonl = tmp_path / "facts.jsonl"
    jsonl.write_text("\n".join(json.dumps(x) for x in [
        {"subject": "Paris", "prompt": "{} is the capital of", "target": "Italy", "target_true": "France"},
        {"subject": "Rome", "prompt": "{} is the capital of", "target": "France", "paraphrases": ["Rome lies in"]},
        {"subject": "Paris", "prompt": "{} is the capital of", "target": "Italy", "target_true": "France"},
    ]) + "\n", encoding="utf-8")
    r = run_cli("add", "--from", str(jsonl))
    assert r.exit_code == 0, r.output
    assert "added 2 edits (ids 1–2) from facts.jsonl; 1 already present" in r.stdout
    csv_file = tmp_path / "facts.csv"
    csv_file.write_text('subject,prompt,target,paraphrases,source\nBerlin,"{} is in, of course,",Spain,'
                        'a Berlin|b Berlin,wiki\n', encoding="utf-8")
    data = json.loads(run_cli("add", "--from", str(csv_file), "--json").stdout)
    assert data["added"] == 1 and data["results"][0]["id"] == 3
    edit = json.loads(run_cli("show", "3", "--json").stdout)
    assert edit["prompt"] == "{} is in, of course," and edit["paraphrases"] == ["a Berlin", "b Berlin"]
    assert edit["source"] == "wiki"
    mixed = run_cli("add", "--from", str(jsonl), "--subject", "x")
    assert mixed.exit_code == 2 and "--from cannot be combined with --subject" in mixed.stderr


def test_db_commands(run_cli, empty_db_url):
    from migrations import head_revision

    r = run_cli("db", "current", db=empty_db_url)
    assert r.exit_code == 0 and "none (empty database" in r.stdout
    assert run_cli("db", "upgrade", db=empty_db_url).stdout.strip() == f"{head_revision()} (head)"
    assert run_cli("db", "current", db=empty_db_url).stdout.strip() == f"{head_revision()} (head)"


def test_protect_commands(run_cli):
    r = run_cli("protect", "add", "--prompt", "The capital of {} is", "--subject", "France", "--target", "Paris",
                "--note", "geography")
    assert r.exit_code == 0 and r.stdout.strip() == "1"
    run_cli("protect", "add", "--prompt", "Water boils at", "--target", "100 °C")
    listed = json.loads(run_cli("protect", "list", "--json").stdout)
    assert [(p["id"], p["rendered_prompt"], p["target"]) for p in listed] == [
        (1, "The capital of France is", "Paris"), (2, "Water boils at", "100 °C")]
    assert "The capital of France is" in run_cli("protect", "list").stdout
    assert "protected fact 1 removed" in run_cli("protect", "remove", "1").stdout
    gone = run_cli("protect", "remove", "1")
    assert gone.exit_code == 1 and "no protected fact has id 1" in gone.stderr
    bad = run_cli("protect", "add", "--prompt", " ", "--target", "x")
    assert bad.exit_code == 1 and "empty" in bad.stderr
    assert run_cli("protect", "add", "--target", "x").exit_code == 2


def test_usage_errors_exit_2(run_cli):
    r = run_cli("add", "--subject", "x")
    assert r.exit_code == 2 and "missing --prompt, --target" in r.stderr
    assert run_cli("list", "--status", "bogus").exit_code == 2
    assert run_cli("nosuchcommand").exit_code == 2


# ------------------------------------------------------------------------------------ the root group

def test_lazy_commands_are_the_contract():
    assert LAZY_COMMANDS == {
        "review": "ledger.review_cli:review",
        "hypernet": "horse.cli:hypernet", "eval": "horse.evalcli:eval_cmd", "model": "horse.evalcli:model",
        "apply": "daemon.cli:apply", "rollback": "daemon.cli:rollback", "snapshots": "daemon.cli:snapshots",
        "diff": "daemon.cli:diff", "verify": "daemon.cli:verify", "export": "daemon.cli:export",
        "ask": "daemon.cli:ask", "daemon": "daemon.cli:daemon", "init": "daemon.cli:init",
        "consolidate": "daemon.cli:consolidate", "serve": "daemon.web:serve", "config": "ledger.configcli:config"}


def test_missing_lazy_module_is_not_listed(monkeypatch):
    monkeypatch.setitem(LAZY_COMMANDS, "ghost", "no_such_package.cli:ghost")
    ctx = click.Context(cli)
    assert "ghost" not in cli.list_commands(ctx) and cli.get_command(ctx, "ghost") is None
    assert {"add", "list", "show", "log", "status", "cancel", "db", "protect"} <= set(cli.list_commands(ctx))


def test_add_does_not_import_torch(tmp_path):
    code = ("import sys; from ledger.cli import main\n"
            "try:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n    assert e.code in (0, None), e.code\n"
            "print('torch' in sys.modules, 'horse' in sys.modules, 'daemon' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, "--db", f"sqlite:///{tmp_path / 'l.db'}", *ADD],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1", "False", "False", "False"]


def test_domain_errors_exit_1_with_traceback_only_under_debug():
    from ledger.errors import LedgerError

    @cli.command("boom-test")
    def boom() -> None:
        raise LedgerError("the ledger said no; do something else")

    @cli.command("engine-boom-test")
    def engine_boom() -> None:
        from horse.errors import ModelNotFound

        raise ModelNotFound()

    @cli.command("bug-test")
    def bug() -> None:
        raise KeyError("a bug")

    try:
        r = CliRunner().invoke(cli, ["boom-test"])
        assert r.exit_code == 1 and r.stderr == "Error: the ledger said no; do something else\n"
        r = CliRunner().invoke(cli, ["--debug", "boom-test"])
        assert r.exit_code == 1 and "Traceback" in r.stderr and "the ledger said no" in r.stderr
        r = CliRunner().invoke(cli, ["engine-boom-test"])
        assert r.exit_code == 1 and "The model cannot be found" in r.stderr and "Traceback" not in r.stderr
        r = CliRunner().invoke(cli, ["bug-test"])
        assert r.exit_code == 1 and isinstance(r.exception, KeyError)  # bugs are not dressed up as refusals
    finally:
        for name in ("boom-test", "engine-boom-test", "bug-test"):
            cli.commands.pop(name, None)


def test_console_entry_point_and_bad_config(tmp_path):
    bad = tmp_path / "config.toml"
    bad.write_text("batch_max_edits = 'many'\n")
    r = subprocess.run([sys.executable, "-m", "ledger", "--config", str(bad), "status"], cwd=REPO_ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "batch_max_edits = 'many' is not a valid int" in r.stderr
    assert cli_module.main.__module__ == "ledger.cli"
