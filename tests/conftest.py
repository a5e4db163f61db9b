"""Shared fixtures: a real PostgreSQL server, and `db_url` parametrised over SQLite and PostgreSQL.

    def test_something(db_url):        # runs twice: [sqlite] (a real file) and [postgresql]
        store = Store(db_url)          # a fresh database at the schema head, dropped after the test

Fixtures:
    pg_server_url  session: an admin URL of a PostgreSQL server. $HORSE_LEDGER_TEST_PG_URL when set; else a
                   private cluster started with /usr/lib/postgresql/15/bin (initdb + pg_ctl, as the postgres
                   user when run as root, on 127.0.0.1 and a free port) and stopped at the end; else skipped
                   — but under CI=true a missing server FAILS the tests, never skips them.
    backend        "sqlite" | "postgresql" (the parameter)
    db_url         a fresh database at the Alembic head (copied from a migrated template: fast)
    empty_db_url   a fresh database with no schema at all (for migration tests)
    store          a Store on db_url, closed after the test
    edit_factory   edit_factory(**overrides) -> EditSpec with a unique subject
    run_cli        run_cli(*args, input=None) -> click Result of `horse-ledger --db <db_url> *args`
"""
from __future__ import annotations

import itertools
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

PG_BIN = Path("/usr/lib/postgresql/15/bin")
REPO_ROOT = Path(__file__).resolve().parent.parent


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "postgresql: runs against the PostgreSQL test server")


def _missing_server(reason: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true but no PostgreSQL server for the tests: {reason}", pytrace=False)
    pytest.skip(f"no PostgreSQL server: {reason} (set HORSE_LEDGER_TEST_PG_URL or install postgresql-15)")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class _PrivateCluster:
    """A throwaway PostgreSQL cluster in a temp dir, trust auth, loopback only, durability off (tests)."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="horse-ledger-pg-"))
        self.prefix: list[str] = []
        if os.geteuid() == 0:  # initdb refuses root: run the server as postgres
            import pwd

            pw = pwd.getpwnam("postgres")
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
            self.prefix = ["runuser", "-u", "postgres", "--"]
        self.data = self.dir / "data"
        self.port = _free_port()

    def _run(self, *args: str) -> None:
        proc = subprocess.run(self.prefix + list(args), capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(args[:2])} failed: {proc.stdout}\n{proc.stderr}")

    def start(self) -> str:
        self._run(str(PG_BIN / "initdb"), "-D", str(self.data), "-U", "postgres", "-A", "trust", "-E", "UTF8",
                  "--locale=C", "--no-sync")
        opts = (f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={self.dir} "
                "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200")
        self._run(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-l", str(self.dir / "server.log"), "-w",
                  "-t", "60", "-o", opts, "start")
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def stop(self) -> None:
        try:
            self._run(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_server_url() -> Iterator[str]:
    url = os.environ.get("HORSE_LEDGER_TEST_PG_URL")
    if url:
        yield url
        return
    if not (PG_BIN / "initdb").exists():
        _missing_server(f"HORSE_LEDGER_TEST_PG_URL is not set and {PG_BIN / 'initdb'} does not exist")
    cluster = _PrivateCluster()
    try:
        url = cluster.start()
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
        cluster.stop()
        _missing_server(f"the private cluster did not start: {exc}")
    try:
        yield url
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def _pg_admin(pg_server_url: str) -> Iterator[object]:
    from sqlalchemy import create_engine, text

    engine = create_engine(pg_server_url, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 10})
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as exc:  # noqa: BLE001
        engine.dispose()
        _missing_server(f"cannot connect to {pg_server_url}: {exc}")
    yield engine
    engine.dispose()


def _pg_url(base: str, database: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(base).set(database=database).render_as_string(hide_password=False)


@pytest.fixture(scope="session")
def _pg_template(pg_server_url: str, _pg_admin: object) -> Iterator[str]:
    from sqlalchemy import text

    from ledger.store import Store

    name = f"hl_tpl_{uuid.uuid4().hex[:12]}"
    with _pg_admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    Store(_pg_url(pg_server_url, name)).close()
    yield name
    with _pg_admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(scope="session")
def _sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from ledger.store import Store

    path = tmp_path_factory.mktemp("template") / "ledger.db"
    Store(f"sqlite:///{path}").close()
    return path


def _fresh_pg(request: pytest.FixtureRequest, template: str | None) -> Iterator[str]:
    from sqlalchemy import text

    base = request.getfixturevalue("pg_server_url")
    admin = request.getfixturevalue("_pg_admin")
    name = f"hl_t_{uuid.uuid4().hex[:16]}"
    clause = f' TEMPLATE "{template}"' if template else ""
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"{clause}'))
    try:
        yield _pg_url(base, name)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


BACKENDS = ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgresql)]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def db_url(request: pytest.FixtureRequest, backend: str, tmp_path: Path) -> Iterator[str]:
    """A fresh database at the schema head, on each backend."""
    if backend == "sqlite":
        path = tmp_path / "ledger.db"
        shutil.copyfile(request.getfixturevalue("_sqlite_template"), path)
        yield f"sqlite:///{path}"
    else:
        yield from _fresh_pg(request, request.getfixturevalue("_pg_template"))


@pytest.fixture
def empty_db_url(request: pytest.FixtureRequest, backend: str, tmp_path: Path) -> Iterator[str]:
    """A fresh database with no tables, on each backend."""
    if backend == "sqlite":
        yield f"sqlite:///{tmp_path / 'empty.db'}"
    else:
        yield from _fresh_pg(request, None)


@pytest.fixture
def store(db_url: str) -> Iterator[object]:
    from ledger.store import Store

    s = Store(db_url)
    yield s
    s.close()


_counter = itertools.count(1)


@pytest.fixture
def edit_factory() -> Callable[..., object]:
    """edit_factory(**overrides) -> a validated EditSpec; fields use the CLI names (target, not target_new)."""
    from ledger.validate import validate_edit

    def make(**overrides: object) -> object:
        n = next(_counter)
        raw = {"subject": f"Subject {n}", "prompt": "The mother tongue of {} is", "target": "English",
               "target_true": "French", **overrides}
        return validate_edit({k: v for k, v in raw.items() if v is not None})

    return make


@pytest.fixture
def run_cli(db_url: str) -> Callable[..., object]:
    """run_cli(*args, input=None) -> click.testing.Result of `horse-ledger --db <db_url> *args`."""
    from click.testing import CliRunner

    from ledger.cli import cli

    def run(*args: str, input: str | None = None, db: str | None = None) -> object:
        return CliRunner().invoke(cli, ["--db", db or db_url, *args], input=input, catch_exceptions=False)

    return run


@pytest.fixture(autouse=True)
def _restore_project_loggers():
    """CLI commands run in-process call daemon.logs.configure_logging(), which gives the project's loggers
    their own handler and stops propagation; put them back after each test so caplog sees later records."""
    import logging

    names = ("daemon", "ledger", "horse", "apscheduler")
    saved = {n: (logging.getLogger(n).propagate, list(logging.getLogger(n).handlers), logging.getLogger(n).level)
             for n in names}
    yield
    for name, (propagate, handlers, level) in saved.items():
        logger = logging.getLogger(name)
        logger.propagate, logger.handlers[:], logger.level = propagate, handlers, level
