"""Route files: what a routed snapshot holds, and the head's route table built from its chain.

A routed night's snapshot file is a `horse.route` table of the subjects the night changed (each subject's whole
delta: its earlier edits still served plus the night's), with the subjects it removes listed in the metadata.
The head's table is the fold of its chain, root first: a later file's route replaces an earlier one of the same
subject. Rollback moves the head, so the table at any snapshot is exactly the one published with it. The weights
never change (the model is the base model plus routes), so a routed snapshot adds no weight delta.

    table = head_table(settings, chain_links, tokenizer)           # factors read lazily, on first use
    file = write_routes(settings, stem, routes, metadata, on_stage)
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from daemon import snapshots
from daemon.errors import SnapshotCorrupt
from ledger.config import Settings
from ledger.files import modes

ROUTED = "routed"   # Snapshot.kind of a routed night
REMOVED_KEY = "removed_subjects"


def write_routes(settings: Settings, stem: str, routes, metadata: Mapping[str, str], *,
                 removed: Sequence[str] = (), on_stage: Callable[[str], None] | None = None) -> snapshots.SnapshotFile:
    """Write `routes` (subject key → horse.route.Route) durably as `<model dir>/<stem>.safetensors`: temp file,
    fsync, rename, fsync the directory. A crash leaves no file or one no row names (`remove_orphans`)."""
    from horse.route import RouteTable, save_table

    directory = snapshots.model_dir(settings.snapshot_dir, settings.model)
    file_modes = modes(settings.file_mode_group)
    directory.mkdir(parents=True, exist_ok=True, mode=file_modes.dir)
    final = directory / f"{stem}.safetensors"
    if final.exists():
        raise SnapshotCorrupt(f"snapshot file {final} already exists; a snapshot file is never overwritten — run "
                              "`horse-ledger verify` and remove the stray file if no snapshot names it")
    tmp = directory / f".{stem}.safetensors{snapshots.TMP_SUFFIX}"
    save_table(tmp, RouteTable(dict(routes)), {**metadata, "kind": ROUTED, REMOVED_KEY: json.dumps(sorted(removed))})
    os.chmod(tmp, file_modes.file)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    sha256 = snapshots.hash_file(tmp)
    if on_stage is not None:
        on_stage("mid-write")
    os.replace(tmp, final)
    snapshots._fsync_dir(directory)
    return snapshots.SnapshotFile(rel_path=str(final.relative_to(Path(settings.snapshot_dir))), sha256=sha256,
                                  bytes=final.stat().st_size)


def read_routes(settings: Settings, link, *, check_sha256: bool = False):
    """A routed snapshot's (table, removed subject keys), factors read lazily."""
    from horse.route import RouteError, load_table

    path = snapshots.resolve(settings.snapshot_dir, link.path)
    if not path.is_file():
        raise SnapshotCorrupt(f"snapshot file {path} is missing; restore it from a backup or roll back past it")
    if check_sha256 and snapshots.hash_file(path) != link.sha256:
        raise SnapshotCorrupt(f"snapshot file {path} does not match the sha256 the ledger recorded; restore it from "
                              "a backup or roll back past it (`horse-ledger verify` says which)")
    try:
        table, meta = load_table(path, lazy=True)
        return table, json.loads(meta.get(REMOVED_KEY, "[]"))
    except (RouteError, ValueError) as exc:
        raise SnapshotCorrupt(f"snapshot file {path} cannot be read as routes ({exc}); roll back past it") from exc


def is_routed(chain_links) -> bool:
    return any(getattr(link, "kind", "") == ROUTED for link in chain_links)


def head_table(settings: Settings, chain_links: Sequence, tokenizer, *, check_sha256: bool = False):
    """The route table the chain serves (indexed with `tokenizer`).

    Raises:
        SnapshotCorrupt: a file is missing or unreadable (or, with `check_sha256`, altered).
        DaemonError: the chain mixes routed and weight-delta snapshots.
    """
    from daemon.errors import DaemonError
    from horse.route import RouteTable

    routes: dict = {}
    for link in chain_links:
        if getattr(link, "kind", "") != ROUTED:
            raise DaemonError(f"snapshot {link.id} holds weight deltas (scope = off/subject) and the chain is served "
                              "routed; roll back to base and re-apply with `horse-ledger rollback base --requeue`, "
                              "or set scope = subject")
        table, removed = read_routes(settings, link, check_sha256=check_sha256)
        routes.update(table.routes)
        for key in removed:
            routes.pop(key, None)
    return RouteTable(routes).index(tokenizer)


def served_table(settings: Settings, chain_links, tokenizer):
    """The head's route table, its files checked against their recorded sha256 and the table against the
    snapshot's recorded digest (`weights_sha256`)."""
    from horse.route import table_digest

    table = head_table(settings, chain_links, tokenizer, check_sha256=True)
    if chain_links and chain_links[-1].weights_sha256 and table_digest(table) != chain_links[-1].weights_sha256:
        raise SnapshotCorrupt(f"the routes of snapshot {chain_links[-1].id} do not match the digest the ledger "
                              f"recorded; run `horse-ledger verify {chain_links[-1].id}`")
    return table
