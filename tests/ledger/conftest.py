"""Ledger tests run with review off unless they turn it on: review defaults to on for PostgreSQL ledgers
(ledger/config.py `review`), and the tests written before it expect `add` to create pending edits.
tests/ledger/test_review.py sets HORSE_LEDGER_REVIEW itself."""
from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _review_off_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HORSE_LEDGER_REVIEW", "off")
