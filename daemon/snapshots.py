"""Snapshot files: one safetensors weight-delta file per published snapshot, and their housekeeping.

Owns: where snapshot files live, how they are written (atomically), read back, hashed and cleaned up.
The delta format itself (dense or factored layers, fp32) is `horse.deltas`; the rows that make a file a
published snapshot are the ledger's (`cycle.publish` writes them after the file is durable).

Layout: `<snapshot_dir>/<model slug>/<stem>.safetensors`; the snapshot row stores the path relative to
`snapshot_dir`, so the directory can move. A file is written as `.<stem>.safetensors.tmp` in the same
directory (so the rename is atomic), fsynced by `horse.deltas.save_deltas`, renamed, and the directory
fsynced. Anything in a model's directory that no snapshot row names is debris of a crash
(a temp file, or a file renamed but never committed) and `remove_orphans` deletes it under the applier lock.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from daemon.errors import SnapshotCorrupt
from daemon.locks import model_slug

FORMAT = "horse-ledger/snapshot/1"
TMP_SUFFIX = ".tmp"
# the stems cycle.py (b<batch>-<token>) and consolidate.py (c<head>-<uuid>) give, with the files beside them
SNAPSHOT_NAME = re.compile(r"^\.?[bc]\d{6,}-[0-9a-f]{8}(\.normaliser)?\.safetensors(\.tmp)?$")


@dataclass(frozen=True)
class SnapshotFile:
    """A durable delta file: where it is (relative to snapshot_dir), its sha256 and its size."""

    rel_path: str
    sha256: str
    bytes: int


def model_dir(snapshot_dir: str | os.PathLike[str], base_model: str) -> Path:
    """The directory holding one base model's snapshot files."""
    return Path(snapshot_dir) / model_slug(base_model)


def resolve(snapshot_dir: str | os.PathLike[str], rel_path: str) -> Path:
    """The path of a snapshot row's file, confined to `snapshot_dir` (loading, verifying and deleting go through
    here).

    Raises:
        SnapshotCorrupt: the stored path is absolute, has a `..` part, or leads out of snapshot_dir through a
            symlink: a row edited by hand or a hostile database must not make the daemon read or delete files
            elsewhere.
    """
    path = Path(rel_path)
    if not str(rel_path) or path.is_absolute() or ".." in path.parts:
        raise SnapshotCorrupt(f"snapshot path {str(rel_path)!r} is not inside the snapshot directory (absolute, or "
                              "with '..'); a snapshot row stores a path relative to snapshot_dir: restore the row's "
                              "path, then run `horse-ledger verify`")
    full = Path(snapshot_dir) / path
    root = Path(snapshot_dir).resolve()
    if not full.resolve().is_relative_to(root):
        raise SnapshotCorrupt(f"snapshot path {str(rel_path)!r} leads out of the snapshot directory {root} through a "
                              "symlink; replace the link with the file, then run `horse-ledger verify`")
    return full


def is_snapshot_file_name(name: str) -> bool:
    """Whether `name` is one the daemon writes into a model's snapshot directory: `b000012-1a2b3c4d.safetensors`
    (a night), `c000012-….safetensors` (a consolidation), their `.normaliser.safetensors` and `.….tmp` files."""
    return SNAPSHOT_NAME.match(name) is not None


def snapshot_metadata(*, base_model: str, base_fingerprint: str, hypernet_fingerprint: str,
                      parent_snapshot_id: int | None, batch_id: int | None, edit_ids: Iterable[int],
                      kind: str = "incremental", extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The str → str safetensors metadata every snapshot file carries (issue 4, step 6)."""
    meta = {
        "format": FORMAT,
        "kind": kind,
        "base_model": base_model,
        "base_fingerprint": base_fingerprint,
        "hypernet_fingerprint": hypernet_fingerprint,
        "parent_snapshot": "" if parent_snapshot_id is None else str(parent_snapshot_id),
        "batch_id": "" if batch_id is None else str(batch_id),
        "edit_ids": json.dumps(sorted(int(i) for i in edit_ids)),
    }
    meta.update({k: str(v) for k, v in (extra or {}).items()})
    return meta


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_snapshot(snapshot_dir: str | os.PathLike[str], base_model: str, stem: str, deltas: Mapping,
                   metadata: Mapping[str, str], *, on_stage: Callable[[str], None] | None = None) -> SnapshotFile:
    """Write `deltas` durably as `<model dir>/<stem>.safetensors` and return its hash and size.

    Temp file in the same directory → fsync (save_deltas) → rename → fsync the directory. A crash at any
    point leaves either no file or a complete one that no DB row names yet; `remove_orphans` deletes both.

    Args:
        deltas: `horse.deltas.Deltas` (module path → LayerDelta), already checked finite by the caller.
        metadata: str → str, see `snapshot_metadata`.
        on_stage: test hook, called with "mid-write" when the temp file exists and is not yet renamed.
    """
    from horse.deltas import save_deltas  # torch: import on use, so `horse-ledger snapshots` stays light

    directory = model_dir(snapshot_dir, base_model)
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"{stem}.safetensors"
    if final.exists():
        raise SnapshotCorrupt(f"snapshot file {final} already exists; a snapshot file is never overwritten — "
                              f"run `horse-ledger verify` and remove the stray file if no snapshot names it")
    tmp = directory / f".{stem}.safetensors{TMP_SUFFIX}"
    sha256 = save_deltas(tmp, dict(deltas), dict(metadata))
    if on_stage is not None:
        on_stage("mid-write")
    os.replace(tmp, final)
    _fsync_dir(directory)
    return SnapshotFile(rel_path=str(final.relative_to(Path(snapshot_dir))), sha256=sha256,
                        bytes=final.stat().st_size)


NORMALISER_SUFFIX = ".normaliser.safetensors"


def normaliser_path(snapshot_dir: str | os.PathLike[str], rel_path: str) -> Path:
    """The hypernet normaliser statistics saved beside a snapshot file (`running_normaliser`)."""
    path = resolve(snapshot_dir, rel_path)
    return path.with_name(path.name.removesuffix(".safetensors") + NORMALISER_SUFFIX)


def write_normaliser(snapshot_dir: str | os.PathLike[str], rel_path: str, state: Mapping) -> None:
    """Save the statistics (name → float64 tensor) beside the snapshot: temp file, fsync, rename."""
    from safetensors.torch import save_file

    final = normaliser_path(snapshot_dir, rel_path)
    tmp = final.with_name(f".{final.name}{TMP_SUFFIX}")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, final)
    _fsync_dir(final.parent)


def read_normaliser(snapshot_dir: str | os.PathLike[str], rel_path: str) -> dict | None:
    """The statistics saved beside the snapshot, or None when it has none."""
    from safetensors.torch import load_file

    path = normaliser_path(snapshot_dir, rel_path)
    if not path.is_file():
        return None
    try:
        return load_file(str(path))
    except Exception as exc:  # noqa: BLE001 - unreadable = corrupt, with what to do
        raise SnapshotCorrupt(f"normaliser statistics {path} cannot be read ({exc}); delete the file to start "
                              f"from the hypernet's training statistics") from exc


def read_snapshot(snapshot_dir: str | os.PathLike[str], rel_path: str, *, sha256: str | None = None):
    """Load a snapshot file's deltas and metadata, checking its hash first when `sha256` is given.

    Returns:
        (deltas, metadata) as `horse.deltas.load_deltas` returns them.
    Raises:
        SnapshotCorrupt: the file is missing, its hash differs, or it cannot be parsed.
    """
    from horse.deltas import load_deltas

    path = resolve(snapshot_dir, rel_path)
    if not path.is_file():
        raise SnapshotCorrupt(f"snapshot file {path} is missing; restore it from a backup or roll back past it")
    if sha256 is not None:
        actual = hash_file(path)
        if actual != sha256:
            raise SnapshotCorrupt(f"snapshot file {path} has sha256 {actual[:12]}…, the ledger recorded "
                                  f"{sha256[:12]}…; restore it from a backup or roll back past it")
    try:
        return load_deltas(path)
    except Exception as exc:  # noqa: BLE001 - any parse failure is a corrupt file to the user
        raise SnapshotCorrupt(f"snapshot file {path} cannot be read ({exc}); roll back past it") from exc


def hash_file(path: str | os.PathLike[str], *, chunk_bytes: int = 1 << 20) -> str:
    """sha256 of a file's bytes, hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def remove_orphans(snapshot_dir: str | os.PathLike[str], base_model: str, referenced: Iterable[str]) -> list[Path]:
    """Delete files in the model's snapshot directory that no snapshot row names and whose name is one the
    daemon writes (`is_snapshot_file_name`; other files are left alone). Call under the applier lock.

    Args:
        referenced: the `path` of every snapshot row of this base model (any status).
    Returns:
        The files removed (temp files of an interrupted write, files renamed but never committed).
    """
    directory = model_dir(snapshot_dir, base_model)
    if not directory.is_dir():
        return []
    keep: set[Path] = set()
    for p in referenced:
        try:
            keep |= {resolve(snapshot_dir, p).resolve(), normaliser_path(snapshot_dir, p).resolve()}
        except SnapshotCorrupt:  # a row that points outside names nothing here; `verify` reports it
            continue
    removed = []
    for path in sorted(directory.iterdir()):
        # only regular files (not symlinks) with the project's own names: nothing else is ever deleted
        if path.is_symlink() or not path.is_file() or not is_snapshot_file_name(path.name):
            continue
        if path.resolve() not in keep:
            path.unlink(missing_ok=True)
            removed.append(path)
    if removed:
        _fsync_dir(directory)
    return removed


# ------------------------------------------------------------------ the weights cache (derived, deletable)

CACHE_DIR = "cache"


def weights_cache_path(snapshot_dir: str | os.PathLike[str], base_model: str, snapshot_id: int) -> Path:
    return model_dir(snapshot_dir, base_model) / CACHE_DIR / f"s{snapshot_id:08d}.weights.safetensors"


def write_weights_cache(snapshot_dir: str | os.PathLike[str], base_model: str, snapshot_id: int,
                        weights: Mapping, *, keep: int = 4) -> Path:
    """Keep the materialised weights of a snapshot's touched modules (tensors in the model's dtype) so that
    materialising it does not re-add its whole chain; prune all but the newest `keep` cache files."""
    from safetensors.torch import save as st_save

    path = weights_cache_path(snapshot_dir, base_model, snapshot_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = st_save({k: v.detach().cpu().contiguous() for k, v in weights.items()},
                   metadata={"format": "horse-ledger/weights-cache/1", "snapshot_id": str(snapshot_id)})
    _replace_with(path, data)
    prune_weights_cache(snapshot_dir, base_model, keep=keep)
    return path


def _replace_with(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a synced temp file and an atomic rename (a crash leaves the old file)."""
    tmp = path.with_name(path.name + TMP_SUFFIX)
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def read_weights_cache(snapshot_dir: str | os.PathLike[str], base_model: str, snapshot_id: int):
    """The cached weights of a snapshot ({module: tensor}) or None when there is none or it is unreadable.
    The caller checks them against the snapshot's recorded digest before trusting them."""
    from safetensors.torch import load_file

    path = weights_cache_path(snapshot_dir, base_model, snapshot_id)
    if not path.is_file():
        return None
    try:
        return load_file(str(path))
    except Exception:  # noqa: BLE001 - a damaged cache is simply not used
        return None


def prune_weights_cache(snapshot_dir: str | os.PathLike[str], base_model: str, *, keep: int = 4,
                        valid_ids: Iterable[int] | None = None, folder: str = CACHE_DIR) -> list[Path]:
    """Delete temp files, caches of snapshots not in `valid_ids` (when given), and all but the newest `keep`
    (in `folder`: the weights cache, or the edit sums' SUMS_DIR)."""
    directory = model_dir(snapshot_dir, base_model) / folder
    if not directory.is_dir():
        return []
    valid = None if valid_ids is None else {int(i) for i in valid_ids}
    removed = []
    caches = []
    for path in sorted(directory.iterdir()):
        if ".tmp" in path.name:
            path.unlink(missing_ok=True)
            removed.append(path)
            continue
        try:
            sid = int(path.name.split(".")[0][1:])
        except ValueError:
            continue
        if valid is not None and sid not in valid:
            path.unlink(missing_ok=True)
            removed.append(path)
        else:
            caches.append((sid, path))
    for _, path in sorted(caches)[:-keep] if keep > 0 else caches:
        path.unlink(missing_ok=True)
        removed.append(path)
    return removed


# ------------------------------------------------ derived statistics beside a snapshot (deletable)

SUMS_DIR = "sums"
SUMS_FORMAT = "horse-ledger/edit-sums/1"
PROTECT_DIR = "protect"
PROTECT_FORMAT = "horse-ledger/protect-moments/1"
MEASURED_DIR = "measured"
MEASURED_FORMAT = "horse-ledger/gate-measurements/1"
# folder → (file suffix, format tag): the edit sums of a re-deriving night (`horse.sums`), and the key moments
# of a consolidated snapshot's edits that the nights after it protect (`protect_earlier`)
_DERIVED = {SUMS_DIR: (".sums.safetensors", SUMS_FORMAT), PROTECT_DIR: (".protect.safetensors", PROTECT_FORMAT),
            MEASURED_DIR: (".measured.safetensors", MEASURED_FORMAT)}


def derived_cache_path(snapshot_dir: str | os.PathLike[str], base_model: str, snapshot_id: int,
                       folder: str = SUMS_DIR) -> Path:
    return model_dir(snapshot_dir, base_model) / folder / f"s{snapshot_id:08d}{_DERIVED[folder][0]}"


def sums_cache_path(snapshot_dir: str | os.PathLike[str], base_model: str, snapshot_id: int) -> Path:
    return derived_cache_path(snapshot_dir, base_model, snapshot_id, SUMS_DIR)


def write_derived_cache(snapshot_dir: str | os.PathLike[str], base_model: str, snapshot_id: int,
                        tensors: Mapping, metadata: Mapping[str, str], *, folder: str = SUMS_DIR,
                        keep: int = 2) -> Path:
    """Keep statistics derived from a snapshot beside it (in `folder`: SUMS_DIR, the additive edit statistics
    of a re-deriving snapshot, so that the next night adds its own edits' instead of re-capturing every edit it
    carries; PROTECT_DIR, the protected key moments of a consolidated snapshot's edits; MEASURED_DIR, what the gate
    measured on the published weights, so that the next night's head measurement reuses it); prune all but `keep`."""
    from safetensors.torch import save as st_save

    path = derived_cache_path(snapshot_dir, base_model, snapshot_id, folder)
    path.parent.mkdir(parents=True, exist_ok=True)
    _replace_with(path, st_save(dict(tensors), metadata={"format": _DERIVED[folder][1], **metadata}))
    prune_weights_cache(snapshot_dir, base_model, keep=keep, folder=folder)
    return path


def read_derived_cache(snapshot_dir: str | os.PathLike[str], base_model: str, snapshot_id: int, *,
                       folder: str = SUMS_DIR):
    """(tensors, metadata) kept by `write_derived_cache`, or None when there are none or they are unreadable;
    the caller checks the metadata (hypernet, base, the edits) before using them."""
    return _read_tagged(derived_cache_path(snapshot_dir, base_model, snapshot_id, folder), _DERIVED[folder][1])


def _read_tagged(path: Path, format_tag: str):
    """(tensors, metadata) of a safetensors file whose metadata "format" is `format_tag`; None when it is missing,
    of another format or unreadable (derived data: a damaged file is simply not used)."""
    from safetensors import safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as fh:
            metadata = fh.metadata() or {}
            if metadata.get("format") != format_tag:
                return None
            return {k: fh.get_tensor(k) for k in fh.keys()}, metadata
    except Exception:  # noqa: BLE001 - a damaged cache is simply not used
        return None


# ------------------------------------------------ the gate's prefix cache (derived, deletable)

PREFIX_DIR = "prefix"
PREFIX_FORMAT = "horse-ledger/prefix-cache/1"


def prefix_cache_path(snapshot_dir: str | os.PathLike[str], base_model: str) -> Path:
    return model_dir(snapshot_dir, base_model) / PREFIX_DIR / "prefix.safetensors"


def write_prefix_cache(snapshot_dir: str | os.PathLike[str], base_model: str, rows: Mapping,
                       metadata: Mapping[str, str]) -> Path:
    """Keep the block inputs of the texts the gate measures (`horse.prefix.PrefixCache.to_tensors`); one file per
    model, replaced atomically (its metadata carries the prefix fingerprint it belongs to)."""
    from safetensors.torch import save as st_save

    path = prefix_cache_path(snapshot_dir, base_model)
    path.parent.mkdir(parents=True, exist_ok=True)
    _replace_with(path, st_save(dict(rows), metadata={"format": PREFIX_FORMAT, **metadata}))
    return path


def read_prefix_cache(snapshot_dir: str | os.PathLike[str], base_model: str):
    """(rows, metadata) kept by `write_prefix_cache`, or None when there are none or they are unreadable; the
    caller checks the fingerprint, dtype and device in the metadata."""
    return _read_tagged(prefix_cache_path(snapshot_dir, base_model), PREFIX_FORMAT)
