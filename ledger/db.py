"""The ledger's connection: `open_engine` (SQLite: WAL, foreign keys, busy timeout, `BEGIN IMMEDIATE` for writes;
PostgreSQL: pre-ping, connect timeout) and `StoreBase`, the part of `ledger.store.Store` that opens the
database, upgrades its schema and hands out sessions. The Store's queries and writes are mixins on it
(`ledger.submit`, `ledger.claims`, `ledger.store`).
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Self

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from ledger.errors import DatabaseUnavailable, EditNotFound
from ledger.models import Edit

__all__ = ["StoreBase", "open_engine", "chunks", "SQLITE_BUSY_TIMEOUT_MS"]

SQLITE_BUSY_TIMEOUT_MS = 30_000
_IN_CHUNK = 500
_PG_MIGRATE_LOCK = 0x6D696772


def open_engine(url: str, *, echo: bool = False) -> Engine:
    """An Engine with the ledger's connection settings (SQLite: WAL, foreign keys, busy timeout, explicit
    BEGIN so write transactions can be `BEGIN IMMEDIATE`).

    Raises:
        DatabaseUnavailable: the URL is malformed or names a driver that is not installed.
    """
    try:
        parsed = make_url(url)
        if parsed.get_backend_name() == "sqlite":
            engine = create_engine(parsed, echo=echo,
                                   connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000})
            _configure_sqlite(engine)
        else:
            connect_args = {"connect_timeout": 10} if parsed.get_backend_name() == "postgresql" else {}
            engine = create_engine(parsed, echo=echo, pool_pre_ping=True, connect_args=connect_args)
    except (ArgumentError, NoSuchModuleError, ImportError, ValueError) as exc:
        raise DatabaseUnavailable(f"the database URL {_safe(url)!r} cannot be used ({exc}); "
                                  "give a SQLAlchemy URL such as sqlite:///path/ledger.db or "
                                  "postgresql+psycopg://user@host/dbname") from None
    return engine


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # we emit BEGIN ourselves (see _on_begin)
        cur = dbapi_conn.cursor()
        cur.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
        cur.execute("PRAGMA foreign_keys = ON")
        if cur.execute("PRAGMA journal_mode").fetchone()[0].lower() not in ("wal", "memory"):
            cur.execute("PRAGMA journal_mode = WAL")
        cur.execute("PRAGMA synchronous = NORMAL")  # safe with WAL: a crash loses at most the last commit
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        conn.exec_driver_sql(conn.get_execution_options().get("sqlite_begin", "BEGIN"))


def _safe(url: str) -> str:
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - only for the message
        return url


class StoreBase:
    """The ledger database: the engine, sessions and schema. Thread-safe to share; open one per process."""

    def __init__(self, url: str, *, auto_upgrade: bool = True, echo: bool = False,
                 night_cap_per_identity: int = 0) -> None:
        self.url = url
        # claim_batch claims at most this many edits of one submitter (0 = no cap): Settings.review_max_edits_per_night
        self.night_cap_per_identity = night_cap_per_identity
        self.engine = open_engine(url, echo=echo)
        self.dialect = self.engine.dialect.name
        # SQLite writers take the write lock up front (BEGIN IMMEDIATE): no deadlock on lock upgrade.
        self._write_engine = (self.engine.execution_options(sqlite_begin="BEGIN IMMEDIATE")
                              if self.dialect == "sqlite" else self.engine)
        self._read = sessionmaker(self.engine, expire_on_commit=False)
        self._write = sessionmaker(self._write_engine, expire_on_commit=False)
        try:
            with self.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
        except (DBAPIError, SQLAlchemyError) as exc:
            self.engine.dispose()
            reason = str(getattr(exc, "orig", exc)).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise DatabaseUnavailable(f"cannot open the database {_safe(url)}: {reason}; check the --db URL "
                                      "(HORSE_LEDGER_DB), that the directory exists and the server is running") from exc
        if auto_upgrade:
            self.upgrade()

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- schema
    def upgrade(self, revision: str = "head") -> str | None:
        """Upgrade the schema to `revision` (under a lock, so racing processes migrate once); returns it."""
        from migrations import current_revision, head_revision, upgrade

        if revision == "head":  # the common case: already at head, no lock, no Alembic environment
            with self.engine.connect() as conn:
                if _has_version_table(conn) and current_revision(conn) == head_revision():
                    return head_revision()
        with self._write_engine.begin() as conn:
            if self.dialect == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_MIGRATE_LOCK})
            upgrade(conn, revision)
            return current_revision(conn)

    def current_revision(self) -> str | None:
        from migrations import current_revision

        with self.engine.connect() as conn:
            return current_revision(conn)

    # ---- sessions
    @contextmanager
    def session(self, *, write: bool = True) -> Iterator[Session]:
        """A session in one transaction: commits on success, rolls back on error.

        write=True (the default) takes SQLite's write lock at BEGIN; keep such transactions short.
        """
        maker = self._write if write else self._read
        with maker() as session:
            with session.begin():
                yield session

    # ---- helpers of the mixins
    def _lock(self, q: Any) -> Any:
        return q.with_for_update(skip_locked=True) if self.dialect == "postgresql" else q

    @staticmethod
    def _require_edit(s: Session, edit_id: int) -> Edit:
        row = s.get(Edit, edit_id)
        if row is None:
            raise EditNotFound(f"no edit has id {edit_id}; see `horse-ledger list` for the ids that exist")
        return row


def _has_version_table(conn: Any) -> bool:
    from sqlalchemy import inspect

    return inspect(conn).has_table("alembic_version")


def chunks(items: list[Any], size: int = _IN_CHUNK) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]

