"""Daemon errors: one class per refusal, each message says what happened and what to do next.

They derive from `ledger.errors.LedgerError`, so `horse-ledger`'s top level prints them and exits 1.
"""
from __future__ import annotations

from ledger.errors import LedgerError, NotOnChain  # noqa: F401  (NotOnChain: raised by ledger.rollback)


class DaemonError(LedgerError):
    """The daemon refused the request."""


class ApplierBusy(DaemonError):
    """Another `horse-ledger apply` / daemon holds the applier lock for this model; wait for it to finish."""


class SnapshotCorrupt(DaemonError):
    """A snapshot file is missing, altered or unreadable; run `horse-ledger verify` and roll back past it."""


class BatchRefused(DaemonError):
    """The batch was refused and nothing was published; see `horse-ledger log --batch ID` for why."""
