"""Click parameter types shared by every `horse-ledger` command: ids, limits, snapshot references, prompts,
output directories. A bad value is a usage error (exit 2) that names the value and what to give instead,
before the command opens the database or loads a model.

    @click.argument("edit_id", type=EDIT_ID)           @click.option("--limit", type=LIMIT, default=50)
    @click.argument("snapshot", type=SNAPSHOT_REF)     @click.argument("snapshot", type=SNAPSHOT_REF_NO_HEAD)
    @click.argument("prompt", type=PROMPT)             @click.option("--out", type=NEW_DIR)

Ids are INTEGER columns on both backends (PostgreSQL's 4-byte integer is the narrower): 1 … 2,147,483,647.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import click

MAX_DB_INT = 2**31 - 1  # PostgreSQL INTEGER; SQLite's 8-byte integers hold it too
MAX_PROMPT_CHARS = 2000  # the ledger's MAX_FIELD_CHARS: a prompt longer than any stored field is a mistake


class DbInt(click.ParamType):
    """An integer the database can hold: `low` … 2,147,483,647 (ids, --limit)."""

    name = "integer"

    def __init__(self, what: str, *, low: int = 1, hint: str = "") -> None:
        self.what, self.low, self.hint = what, low, hint

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int) and not isinstance(value, bool):
            number = value
        else:
            text = str(value).strip()
            try:
                number = int(text, 10)
            except ValueError:
                self.fail(f"{value!r} is not a whole number; give {self._range()}{self.hint}", param, ctx)
        if not self.low <= number <= MAX_DB_INT:
            shown = str(number) if len(str(number)) <= 30 else str(number)[:27] + "…"
            self.fail(f"{shown} is out of range; give {self._range()}{self.hint}", param, ctx)
        return number

    def _range(self) -> str:
        return f"{self.what} from {self.low} to {MAX_DB_INT:,}"


EDIT_ID = DbInt("an edit id", hint=" (see `horse-ledger list`)")
BATCH_ID = DbInt("a batch id", hint=" (see `horse-ledger log`)")
PROTECTED_ID = DbInt("a protected fact id", hint=" (see `horse-ledger protect list`)")
LIMIT = DbInt("a count")


class SnapshotRef(click.ParamType):
    """A snapshot id, `base`, or (where allowed) `head`; returns the normalised text ("12", "base", "head")."""

    name = "snapshot"

    def __init__(self, *, allow_head: bool = True) -> None:
        self.allow_head = allow_head

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        text = str(value).strip().lower()
        words = ("base", "head") if self.allow_head else ("base",)
        if text in words:
            return text
        choices = "a snapshot id from `horse-ledger snapshots`, `base`" + (" or `head`" if self.allow_head else "")
        try:
            number = int(text, 10)
        except ValueError:
            self.fail(f"{_show(value)} is not a snapshot id; give {choices}", param, ctx)
        if not 1 <= number <= MAX_DB_INT:
            shown = text if len(text) <= 30 else text[:27] + "…"
            self.fail(f"snapshot {shown} is out of range; give {choices} (ids run from 1 to {MAX_DB_INT:,})",
                      param, ctx)
        return str(number)


SNAPSHOT_REF = SnapshotRef()
SNAPSHOT_REF_NO_HEAD = SnapshotRef(allow_head=False)


class PromptText(click.ParamType):
    """Text to give the model: not empty, no control, bidi-override or invisible-only characters."""

    name = "text"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        from ledger.text import text_problem

        text = str(value)
        if not text.strip():
            self.fail("is empty; give the text to continue, e.g. \"The capital of France is\"", param, ctx)
        if len(text) > MAX_PROMPT_CHARS:
            self.fail(f"is {len(text):,} characters long; the limit is {MAX_PROMPT_CHARS:,}", param, ctx)
        problem = text_problem(text)
        if problem:
            self.fail(f"{problem}; remove it (use plain text)", param, ctx)
        return text


PROMPT = PromptText()


class NewDir(click.ParamType):
    """A directory that exists or can be created: every existing parent is a writable directory."""

    name = "directory"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Path:
        path = Path(os.fsdecode(value)).expanduser()
        if str(value).strip() == "":
            self.fail("is empty; give the directory to write", param, ctx)
        if path.exists() and not path.is_dir():
            self.fail(f"{str(path)!r} exists and is not a directory; give a new or empty directory", param, ctx)
        parent = path.absolute()
        while not parent.exists():
            parent = parent.parent
        if not parent.is_dir():
            self.fail(f"{str(path)!r} cannot be created: {str(parent)!r} is a file; give another directory",
                      param, ctx)
        try:  # a real probe: os.access says yes to root on read-only or virtual file systems (/proc)
            os.rmdir(tempfile.mkdtemp(prefix=".horse-ledger-probe-", dir=parent))
        except OSError as exc:
            self.fail(f"{str(path)!r} cannot be written: {str(parent)!r}: {exc.strerror}; give a directory "
                      "you can write", param, ctx)
        return path


NEW_DIR = NewDir()


def _show(value: Any) -> str:
    text = repr(str(value))
    return text if len(text) <= 40 else text[:37] + "…'"

