"""Ledger errors: one class per failure, each message says what happened and what to do next.

Every domain error the ledger raises derives from `LedgerError`; `ledger.cli` catches it once at the top,
prints the message (and its cause chain) on stderr and exits 1. The class docstring is the default message.
"""
from __future__ import annotations


class LedgerError(Exception):
    """The ledger refused the request."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "").strip())

    @property
    def message(self) -> str:
        return str(self)


class ConfigError(LedgerError):
    """The configuration cannot be read; fix the TOML file or the HORSE_LEDGER_* variable it names."""


class DatabaseUnavailable(LedgerError):
    """The database cannot be opened; check the --db URL / HORSE_LEDGER_DB and that the server is running."""


class SchemaError(LedgerError):
    """The database schema is not one this version knows; run `horse-ledger db upgrade` or upgrade horse-ledger."""


class InvalidEdit(LedgerError):
    """An edit is invalid; fix the field named in the message and submit it again. Nothing was written."""

    def __init__(self, message: str | None = None, *, where: str | None = None, field: str | None = None) -> None:
        self.where = where
        self.field = field
        prefix = ": ".join(p for p in (where, f"field {field!r}" if field else None) if p)
        body = message or (self.__doc__ or "").strip()
        super().__init__(f"{prefix}: {body}" if prefix else body)


class InvalidInputFile(InvalidEdit):
    """The input file cannot be read; fix the line named in the message. Nothing from the file was written."""


class IllegalTransition(LedgerError):
    """An edit is not in the status this move starts from; see `horse-ledger show ID` for its history."""

    def __init__(self, message: str | None = None, *, current: dict[int, str] | None = None) -> None:
        self.current = dict(current or {})
        super().__init__(message)


class EditNotFound(LedgerError):
    """No edit has this id; see `horse-ledger list` for the ids that exist."""


class BatchNotFound(LedgerError):
    """No batch has this id or token; see `horse-ledger log` for recent batches."""


class SnapshotNotFound(LedgerError):
    """No snapshot has this id; see `horse-ledger snapshots` for the ones that exist."""


class NotOnChain(LedgerError):
    """That snapshot cannot be rolled back to; pick one listed by `horse-ledger snapshots` as published."""


class ProtectedFactNotFound(LedgerError):
    """No protected fact has this id; see `horse-ledger protect list`."""
