"""ledger/clihelp.py and ledger/configcli.py: the grouped root --help and `horse-ledger config`."""
from __future__ import annotations

import importlib
import json
import subprocess
import sys

from click.testing import CliRunner

from ledger.cli import LAZY_COMMANDS, cli
from ledger.clihelp import COMMAND_GROUPS, LAZY_HELP
from ledger.configcli import mask


def test_root_help_lists_every_command_with_its_own_line_in_groups_without_importing_torch(tmp_path) -> None:
    code = ("import sys; from click.testing import CliRunner; from ledger.cli import cli; "
            "r = CliRunner().invoke(cli, ['--help'], terminal_width=200); print(r.output); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path,
                         timeout=120).stdout
    assert out.rstrip().endswith("False")  # no engine import for --help
    names = cli.list_commands(None)
    assert len(names) >= 23 and "(see `horse-ledger" not in out
    for title in COMMAND_GROUPS:
        assert title + ":" in out
    for name in names:
        line = next(line for line in out.splitlines() if line.strip().startswith(name + " "))
        assert len(line.split(None, 1)[1]) > 10, line


def test_lazy_help_lines_are_the_commands_own() -> None:
    grouped = {n for members in COMMAND_GROUPS.values() for n in members}
    assert set(cli.list_commands(None)) <= grouped  # nothing lands in "Other commands"
    for name, target in LAZY_COMMANDS.items():
        module, attr = target.split(":")
        if name not in LAZY_HELP:  # imported for --help: only ledger's own modules may be (no torch)
            assert module.startswith("ledger."), f"add the one-line help of {name} to ledger.clihelp.LAZY_HELP"
            continue
        cmd = getattr(importlib.import_module(module), attr)
        assert cmd.get_short_help_str(1000) == LAZY_HELP[name], name


def test_config_shows_values_sources_and_masks_passwords(tmp_path, monkeypatch) -> None:
    cfg = tmp_path / "config.toml"
    cfg.write_text('model = "tiny-llama"\nbatch_max_edits = 7\n')
    monkeypatch.setenv("HORSE_LEDGER_SCOPE", "subject")
    url = "postgresql+psycopg://alice:s3cr3t@db.example/ledger?sslpassword=hunter2"
    result = CliRunner().invoke(cli, ["--db", url, "--config", str(cfg), "config", "--json"])
    assert result.exit_code == 0, result.output
    rows = {r["name"]: r for r in json.loads(result.output)}
    assert "s3cr3t" not in result.output and "hunter2" not in result.output
    assert rows["db_url"]["value"] == "postgresql+psycopg://alice:***@db.example/ledger?sslpassword=***"
    assert rows["db_url"]["source"] == "option --db"
    assert (rows["model"]["value"], rows["model"]["source"]) == ("tiny-llama", f"file {cfg}")
    assert rows["batch_max_edits"]["value"] == "7"
    assert rows["scope"]["source"] == "env HORSE_LEDGER_SCOPE"
    assert rows["gate_min_retention"]["source"] == "default"
    text = CliRunner().invoke(cli, ["--db", url, "--config", str(cfg), "config", "--verbose"]).output
    assert "s3cr3t" not in text and "env HORSE_LEDGER_METRICS_TEXTFILE" in text


def test_mask_leaves_urls_without_a_password_and_hides_secret_named_settings() -> None:
    assert mask("db_url", "sqlite:////var/lib/x.db") == "sqlite:////var/lib/x.db"
    assert mask("api_token", "abc") == "***"
    assert mask("db_url", "not a url://x:y@z") == "not a url://x:***@z"
