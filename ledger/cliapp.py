"""What every `horse-ledger` command shares: `AppContext` (`ctx.obj`: the settings, flags, the store opened on first
use), `pass_app`, and the output helpers (JSON and tables with stored text made safe for the terminal, times in
UTC). Imported by the root group (`ledger.cli`) and by every module of commands; it imports none of them.
"""
from __future__ import annotations

import json
import os
import unicodedata
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Sequence

import click

from ledger.config import Settings
from ledger.files import create_file, make_dir
from ledger.text import for_terminal, json_for_terminal

DATE_FORMATS = ["%Y-%m-%d", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M:%S", "%Y-%m-%dT%H:%M"]


@dataclass
class AppContext:
    """`ctx.obj` of every command: the settings, the debug flag, and the store (opened on first use)."""

    settings: Settings
    debug: bool = False
    verbose: bool = False  # log lines (stages, counts) on a terminal too
    _store: Any = field(default=None, repr=False)

    def store(self, *, upgrade: bool = True) -> "Store":  # noqa: F821 - imported lazily
        """The Store for settings.db_url, opened once and upgraded to the schema head (unless upgrade=False)."""
        if self._store is None:
            from ledger.store import Store

            path = self.settings.db_path
            default = f"sqlite:///{Path(self.settings.data_dir) / 'ledger.db'}"
            if path is not None and self.settings.db_url == default:
                make_dir(path.parent, is_group=self.settings.file_mode_group)  # only the default location is created
            if path is not None and path.parent.is_dir():  # SQLite would create it 0644 & ~umask; its WAL copies it
                create_file(path, is_group=self.settings.file_mode_group)
            self._store = Store(self.settings.db_url, auto_upgrade=upgrade,
                                night_cap_per_identity=self.settings.review_max_edits_per_night)
            click.get_current_context().call_on_close(self._store.close)
        return self._store

    @property
    def actor(self) -> str:
        """Who is acting, for the audit trail: cli:<login name>."""
        try:
            import pwd

            return f"cli:{pwd.getpwuid(os.getuid()).pw_name}"
        except (ImportError, KeyError):
            return "cli"


pass_app = click.make_pass_decorator(AppContext)


# ------------------------------------------------------------------------------------------- output

def echo_json(data: Any) -> None:
    # control and bidi characters escaped (the same JSON value): the terminal never acts on stored text
    click.echo(json_for_terminal(json.dumps(data, ensure_ascii=False, indent=2, default=str)))


def fmt_time(value: datetime | None) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S") if value else "-"


def clip(text: str | None, width: int) -> str:
    text = "-" if text is None or text == "" else for_terminal(str(text))
    return text if len(text) <= width else text[: width - 1] + "…"


def columns(text: str) -> int:
    """Terminal columns: wide (CJK) characters take two."""
    return sum(2 if unicodedata.east_asian_width(ch) in "WF" else 0 if unicodedata.combining(ch) else 1
               for ch in text)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    cells = [[str(c) for c in row] for row in rows]
    widths = [max([columns(h)] + [columns(r[i]) for r in cells]) for i, h in enumerate(headers)]
    for row in [list(headers), *cells]:
        click.echo("  ".join(c + " " * (w - columns(c)) for c, w in zip(row, widths)).rstrip())


def since_utc(value: datetime | None) -> datetime | None:
    return value.replace(tzinfo=UTC) if value is not None and value.tzinfo is None else value
