"""At least 150 distinct bad inputs through the CLI, on SQLite and PostgreSQL (issue 27's table).

For each case (tests/ledger/bad_inputs.py): the exit code (2: usage error, 1: refused), a message without a
traceback that says what to do, and unchanged row counts in every table. One database per backend for the
whole module, seeded once, so the file stays fast.

    python -m pytest -q tests/ledger/test_bad_inputs_table.py
"""
from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import func, select

from ledger.cli import cli
from ledger.models import Batch, Edit, Event, ProtectedFact, Snapshot
from ledger.store import Store
from tests.conftest import BACKENDS, _fresh_pg
from tests.ledger.bad_inputs import GOOD, all_cases, prepare_files

CASES = all_cases()
TABLES = (Edit, Event, ProtectedFact, Batch, Snapshot)
# a message says what to do: it names a next step (or click's "Try ... --help")
NEXT_STEP = re.compile(r"\b(give|fix|remove|use|save|split|keep|pass|see|write|choose|run|check|drop|set|name|"
                       r"quote|create|shorten|Try)\b")


@pytest.fixture(scope="module", params=BACKENDS)
def shared_db(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """One seeded database per backend, and a folder of prepared bad files."""
    files = tmp_path_factory.mktemp("bad-inputs")
    prepare_files(files)
    if request.param == "sqlite":
        path = files / "ledger.db"
        shutil.copyfile(request.getfixturevalue("_sqlite_template"), path)
        urls: Iterator[str] = iter([f"sqlite:///{path}"])
    else:
        urls = _fresh_pg(request, request.getfixturevalue("_pg_template"))
    url = next(urls)
    runner = CliRunner()
    for n in range(3):
        r = runner.invoke(cli, ["--db", url, "add", "--subject", f"{GOOD['subject']} {n}", "--prompt", GOOD["prompt"],
                                "--target", GOOD["target"]], catch_exceptions=False)
        assert r.exit_code == 0, r.output
    r = runner.invoke(cli, ["--db", url, "protect", "add", "--prompt", "Water boils at", "--target", "100"])
    assert r.exit_code == 0, r.output
    yield url, files
    next(urls, None)  # PostgreSQL: drop the database


def _counts(url: str) -> dict[str, int]:
    with Store(url) as store, store.session(write=False) as s:
        return {t.__tablename__: s.execute(select(func.count()).select_from(t)).scalar_one() for t in TABLES}


def test_the_table_has_150_distinct_inputs():
    ids = [c[0] for c in CASES]
    assert len(ids) == len(set(ids))
    distinct = {(tuple(c[1]), tuple(sorted((c[4] or {}).items()))) for c in CASES}
    assert len(distinct) == len(CASES) >= 150, len(distinct)


def test_bad_inputs(shared_db: tuple[str, Path], tmp_path: Path) -> None:
    url, files = shared_db
    before = _counts(url)
    env = {"XDG_CONFIG_HOME": str(tmp_path / "config"), "XDG_DATA_HOME": str(tmp_path / "data"),
           "XDG_CACHE_HOME": str(tmp_path / "cache"), "HORSE_LEDGER_CONFIG": None}
    failures = []
    for case_id, argv, code, fragment, extra_env in CASES:
        args = [a.replace("{d}", str(files)) for a in argv]
        r = CliRunner().invoke(cli, ["--db", url, *args], env={**env, **(extra_env or {})})
        out = r.stdout + r.stderr
        problems = []
        if r.exit_code != code:
            problems.append(f"exit {r.exit_code}, expected {code}")
        if "Traceback" in out or (r.exception is not None and not isinstance(r.exception, SystemExit)):
            problems.append(f"traceback / {type(r.exception).__name__}: {r.exception}")
        if fragment not in r.stderr:
            problems.append(f"message lacks {fragment!r}")
        if not r.stderr.lstrip().startswith(("Error", "Usage")) or not NEXT_STEP.search(r.stderr):
            problems.append("message does not start with Error/Usage or names no next step")
        if problems:
            failures.append(f"{case_id}: {'; '.join(problems)}\n    stderr: {r.stderr.strip()[-400:]!r}")
    assert not failures, f"{len(failures)} of {len(CASES)} cases:\n" + "\n".join(failures)
    assert _counts(url) == before
