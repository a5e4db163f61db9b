"""The single-applier lock: at most one process edits a given base model at a time.

Owns: how `apply`, the daemon and `rollback` exclude each other. One lock per base model, held for the
whole batch (claim → publish) and released by the OS or the server if the process dies:
- PostgreSQL: `pg_try_advisory_lock(key)` on a dedicated connection, key = the first 8 bytes of
  sha256("horse-ledger/apply/" + base_model) as a signed bigint. A session lock, so a killed process
  releases it when its connection drops.
- SQLite (and anything else): `fcntl.flock(LOCK_EX | LOCK_NB)` on `<db file>.apply-<model>.lock`
  next to the database (or in the snapshot dir for an in-memory database). The kernel drops it on exit.

    with applier_lock(settings, "tiny-llama"):
        ...            # ApplierBusy if another process holds it
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
from collections.abc import Iterator
from pathlib import Path

import sqlalchemy as sa

from daemon.errors import ApplierBusy
from ledger.config import Settings

LOCK_NAMESPACE = "horse-ledger/apply/"


def model_slug(base_model: str) -> str:
    """A file-name-safe, stable name for a base model ("smollm2-135m", "/srv/m/x" → "srv_m_x-1a2b3c4d")."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", base_model).strip("._") or "model"
    if slug != base_model:
        slug += "-" + hashlib.sha256(base_model.encode()).hexdigest()[:8]
    return slug


def advisory_key(base_model: str) -> int:
    """The PostgreSQL advisory-lock key for a base model: a signed 64-bit int from sha256."""
    digest = hashlib.sha256((LOCK_NAMESPACE + base_model).encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def lock_file_path(settings: Settings, base_model: str) -> Path:
    """Where the SQLite file lock for `base_model` lives."""
    db_path = settings.db_path
    if db_path is not None:
        return db_path.with_name(f"{db_path.name}.apply-{model_slug(base_model)}.lock")
    return Path(settings.snapshot_dir) / f".apply-{model_slug(base_model)}.lock"


@contextlib.contextmanager
def _file_lock(path: Path, base_model: str) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            raise ApplierBusy(f"another process (pid {holder}) is applying edits to {base_model}; "
                              f"wait for it to finish (lock file {path})") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _advisory_lock(db_url: str, base_model: str) -> Iterator[None]:
    key = advisory_key(base_model)
    engine = sa.create_engine(db_url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            got = conn.execute(sa.text("SELECT pg_try_advisory_lock(:k)"), {"k": key}).scalar()
            conn.commit()
            if not got:
                unsigned = key & 0xFFFFFFFFFFFFFFFF
                holder = conn.execute(
                    sa.text("SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted AND objsubid = 1 "
                            "AND classid = CAST(:c AS oid) AND objid = CAST(:o AS oid) LIMIT 1"),
                    {"c": unsigned >> 32, "o": unsigned & 0xFFFFFFFF}).scalar()
                raise ApplierBusy(f"another process (server pid {holder or 'unknown'}) is applying edits to "
                                  f"{base_model}; wait for it to finish (advisory lock {key})")
            try:
                yield
            finally:
                conn.execute(sa.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
                conn.commit()
    finally:
        engine.dispose()


@contextlib.contextmanager
def applier_lock(settings: Settings, base_model: str) -> Iterator[None]:
    """Hold the single-applier lock for `base_model` for the duration of the block.

    Raises:
        ApplierBusy: another process holds it (never waits: a second nightly run simply skips).
    """
    if settings.db_url.startswith("postgresql"):
        with _advisory_lock(settings.db_url, base_model):
            yield
    else:
        with _file_lock(lock_file_path(settings, base_model), base_model):
            yield
