"""Structured logging for the daemon and the daemon's CLI commands.

Owns: the log format. On a terminal, one readable line per record; anywhere else (systemd's journal, a
pipe, a file) one JSON object per line, with the batch and snapshot ids of the work in progress attached
to every record, so `journalctl -u horse-ledger -o cat | jq 'select(.batch_id == 12)'` finds one batch.

    configure_logging("auto")               # settings.log_json: "auto" | "true" | "false"
    with log_context(batch_id=12):
        log.info("claimed", extra={"n_edits": 100})
"""
from __future__ import annotations

import contextlib
import contextvars
import datetime as _dt
import json
import logging
import sys
from collections.abc import Iterator
from typing import Any

_CONTEXT: contextvars.ContextVar[dict[str, Any]] = contextvars.ContextVar("horse_ledger_log_context", default={})

# Attributes every LogRecord has; anything else was passed through `extra=` and goes into the JSON object.
_STANDARD_ATTRS = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName"}


@contextlib.contextmanager
def log_context(**fields: Any) -> Iterator[None]:
    """Attach fields (batch_id, snapshot_id, …) to every record logged inside the block, in this thread."""
    token = _CONTEXT.set({**_CONTEXT.get(), **{k: v for k, v in fields.items() if v is not None}})
    try:
        yield
    finally:
        _CONTEXT.reset(token)


def current_context() -> dict[str, Any]:
    """The fields `log_context` attached in this thread (a copy)."""
    return dict(_CONTEXT.get())


class _ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in _CONTEXT.get().items():
            if not hasattr(record, key):
                setattr(record, key, value)
        return True


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD_ATTRS and not k.startswith("_")}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, the context ids and every `extra` field."""

    def format(self, record: logging.LogRecord) -> str:
        obj: dict[str, Any] = {
            "ts": _dt.datetime.fromtimestamp(record.created, _dt.timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        obj.update(_extras(record))
        if record.exc_info:
            obj["exc"] = self.formatException(record.exc_info)
        return json.dumps(obj, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """`HH:MM:SS level msg key=value …` for people at a terminal."""

    def format(self, record: logging.LogRecord) -> str:
        ts = _dt.datetime.fromtimestamp(record.created).strftime("%H:%M:%S")
        fields = " ".join(f"{k}={v}" for k, v in _extras(record).items())
        line = f"{ts} {record.levelname.lower():<7} {record.getMessage()}" + (f"  {fields}" if fields else "")
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def is_json_mode(mode: str, stream: Any = None) -> bool:
    """Resolve settings.log_json ("auto" | "true" | "false"): auto means JSON unless the stream is a TTY."""
    mode = str(mode).strip().lower()
    if mode in ("true", "1", "yes", "on", "json"):
        return True
    if mode in ("false", "0", "no", "off", "text"):
        return False
    stream = stream if stream is not None else sys.stderr
    return not (hasattr(stream, "isatty") and stream.isatty())


def configure_logging(mode: str = "auto", *, level: int = logging.INFO, stream: Any = None) -> None:
    """Send the `daemon`, `ledger` and `horse` loggers to `stream` (stderr) in the chosen format.

    Idempotent: a second call replaces the handler it installed before.
    """
    stream = stream if stream is not None else sys.stderr
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if is_json_mode(mode, stream) else TextFormatter())
    handler.addFilter(_ContextFilter())
    handler.set_name("horse-ledger")
    for name in ("daemon", "ledger", "horse", "apscheduler"):
        logger = logging.getLogger(name)
        for old in [h for h in logger.handlers if h.get_name() == "horse-ledger"]:
            logger.removeHandler(old)
        logger.addHandler(handler)
        logger.setLevel(level if name != "apscheduler" else max(level, logging.WARNING))
        logger.propagate = False
