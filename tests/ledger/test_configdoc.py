"""ledger/configdoc.py: docs/configuration.md is what `python -m ledger.configdoc` prints from Settings."""
from __future__ import annotations

import subprocess
import sys
from dataclasses import fields
from pathlib import Path

from ledger.config import Settings, env_var
from ledger.configdoc import render

DOC = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


def test_the_configuration_reference_is_not_stale() -> None:
    assert DOC.read_text(encoding="utf-8") == render(), (
        "docs/configuration.md is stale; regenerate it: python -m ledger.configdoc > docs/configuration.md")


def test_every_setting_is_listed_once_with_its_env_var_unit_and_help() -> None:
    text = render()
    for f in fields(Settings):
        rows = [line for line in text.splitlines() if line.startswith(f"| `{f.name}` |")]
        assert len(rows) == 1, f.name
        assert f"`{env_var(f.name)}`" in rows[0] and f.metadata["help"].split()[0] in rows[0]
    assert "`HORSE_LEDGER_DB`" in text  # db_url's env var is not HORSE_LEDGER_DB_URL


def test_the_module_prints_the_reference(tmp_path) -> None:
    out = subprocess.run([sys.executable, "-m", "ledger.configdoc"], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2], timeout=60).stdout
    assert out == render()
