"""deploy/*.service and *.timer pass `systemd-analyze verify` (the CI installs systemd for this)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
UNITS = sorted(p.name for p in DEPLOY.iterdir() if p.suffix in (".service", ".timer"))


def test_units_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("systemd-analyze is missing: .ci/run installs the systemd package for this test")
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")
    assert {"horse-ledger.service", "horse-ledger-apply.service", "horse-ledger-apply.timer"} <= set(UNITS)
    for name in UNITS:  # the units name /opt/horse-ledger/venv/bin/horse-ledger: point them at a real program
        text = (DEPLOY / name).read_text()
        (tmp_path / name).write_text(text.replace("/opt/horse-ledger/venv/bin/horse-ledger", sys.executable))
    proc = subprocess.run([analyze, "verify", *(str(tmp_path / n) for n in UNITS)],
                          capture_output=True, text=True, timeout=120)
    problems = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert proc.returncode == 0 and not problems, "\n".join(problems)
