"""File modes of everything horse-ledger creates: private by default, or shared with one group.

    file_mode_group = false (default): files 0600, directories 0700 (only the user running horse-ledger)
    file_mode_group = true:            files 0660, directories 0770 (that user and the owner's group)

`ledger.cli` sets the process umask from the setting for every command (`process_umask`), so every file
written by any package (the SQLite database and its WAL, snapshots, caches, measurements, exports) gets these
modes without each writer knowing the setting. Writers that must be private whatever the umask (a config file
that may hold a database URL) call `write_file` / `make_dir` with the setting.

    with process_umask(settings.file_mode_group): ...
    write_file(path, text, is_group=settings.file_mode_group)     # atomic: temp file, fsync, rename
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Modes:
    """Permission bits for new files and directories, and the umask that yields them."""

    file: int
    dir: int
    umask: int


PRIVATE = Modes(file=0o600, dir=0o700, umask=0o077)
GROUP = Modes(file=0o660, dir=0o770, umask=0o007)


def modes(is_group: bool = False) -> Modes:
    """PRIVATE, or GROUP when `file_mode_group` is set."""
    return GROUP if is_group else PRIVATE


@contextmanager
def process_umask(is_group: bool = False) -> Iterator[Modes]:
    """Set this process's umask for the block (files 0600/0660, dirs 0700/0770), then restore it."""
    chosen = modes(is_group)
    previous = os.umask(chosen.umask)
    try:
        yield chosen
    finally:
        os.umask(previous)


def make_dir(path: str | os.PathLike[str], *, is_group: bool = False) -> Path:
    """Create `path` and missing parents with the directory mode; an existing directory is left as it is."""
    path = Path(path)
    mode = modes(is_group).dir
    missing = []
    for parent in [path, *path.parents]:
        if parent.exists():
            break
        missing.append(parent)
    path.mkdir(mode=mode, parents=True, exist_ok=True)
    for created in missing:  # mkdir's mode is filtered by the umask: set it exactly on what we created
        os.chmod(created, mode)
    return path


def write_file(path: str | os.PathLike[str], data: bytes | str, *, is_group: bool = False) -> Path:
    """Write `data` to `path` atomically (temp file in the same directory, fsync, rename) with the file mode."""
    path = Path(path)
    make_dir(path.parent, is_group=is_group)
    mode = modes(is_group).file
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data.encode("utf-8") if isinstance(data, str) else data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def create_file(path: str | os.PathLike[str], *, is_group: bool = False) -> Path:
    """Create an empty `path` with the file mode if it does not exist (e.g. a SQLite database before it opens)."""
    path = Path(path)
    make_dir(path.parent, is_group=is_group)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, modes(is_group).file)
    except FileExistsError:
        return path
    os.fchmod(fd, modes(is_group).file)
    os.close(fd)
    return path
