"""A claiming process for test_concurrency.py: claims batches until none are left, prints the ids as JSON.

    python tests/ledger/claim_worker.py URL BATCH_SIZE GO_FILE
It opens its Store first, writes GO_FILE.ready.<pid>, then waits for GO_FILE to exist, so every worker
starts claiming at once. It yields the CPU for a moment after each claim, as a real applier would while it
edits, so that one fast process cannot drain the queue before the others get a turn.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from ledger.store import Store  # noqa: E402


def main() -> None:
    url, batch_size, go_file = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
    store = Store(url, auto_upgrade=False)
    go_file.with_name(f"{go_file.name}.ready.{os.getpid()}").touch()
    deadline = time.monotonic() + 60
    while not go_file.exists():
        if time.monotonic() > deadline:
            raise SystemExit("never told to go")
        time.sleep(0.01)
    claimed: list[list[int]] = []
    while (batch := store.claim_batch(batch_size, base_model="m", actor="worker")) is not None:
        claimed.append([batch.batch_id, batch.token, [e.id for e in batch.edits]])
        time.sleep(0.02)
    store.close()
    print(json.dumps(claimed))


if __name__ == "__main__":
    main()
