"""Progress of long steps (fine-tunes, folds, covariance estimation, benchmark checkpoints): logged stages
with counts, and a progress bar when stderr is a terminal.

Owns one helper, used by horse/ and, through it, by daemon/ and benchmarks/ (horse reads no configuration:
the caller picks the logger). Log records go to the caller's logger at INFO, at the start, at most every
`every_s` seconds, and at the end, with `done`, `total`, `elapsed_s` and `eta_s` as record fields (JSON
logs carry them); a tqdm bar is drawn only when `bar` is true and stderr is a TTY.

    with Progress("fine-tune", total=epochs * steps_per_epoch, unit="step", logger=log) as p:
        for ...:
            p.update()          # or p.update(n), p.set(done)
    log_stage(log, "fold: captured", edits=512)
"""
from __future__ import annotations

import logging
import sys
import time
from typing import Any


def is_terminal(stream: Any = None) -> bool:
    """Whether `stream` (default stderr) is a terminal."""
    stream = sys.stderr if stream is None else stream
    return bool(getattr(stream, "isatty", lambda: False)())


def log_stage(logger: logging.Logger, stage: str, **counts: Any) -> None:
    """One INFO record "stage", with the counts as record fields (e.g. edits=512, layers=6)."""
    text = ", ".join(f"{k} {v}" for k, v in counts.items())
    logger.info("%s%s", stage, f" ({text})" if text else "", extra={"stage": stage, **counts})


class Progress:
    """Counts work done out of `total`; logs it now and then, and draws a bar on a terminal."""

    def __init__(self, label: str, total: int | None, *, logger: logging.Logger, unit: str = "it",
                 every_s: float = 30.0, bar: bool = True) -> None:
        self.label, self.total, self.unit, self.every_s = label, total, unit, every_s
        self.logger = logger
        self.done = 0
        self.t0 = self._last = time.monotonic()
        self._bar = None
        if bar and is_terminal() and logger.isEnabledFor(logging.INFO):
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc=label, unit=unit, leave=False, file=sys.stderr, dynamic_ncols=True)
        self._log("started")

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        self.close(ok=exc_type is None)

    def update(self, n: int = 1) -> None:
        """`n` more units done."""
        self.set(self.done + n)

    def set(self, done: int) -> None:
        """`done` units done in all."""
        if self._bar is not None:
            self._bar.update(done - self.done)
        self.done = done
        now = time.monotonic()
        if now - self._last >= self.every_s:
            self._last = now
            self._log("progress")

    def close(self, *, ok: bool = True) -> None:
        """End: the bar goes away and one record says how far it got and how long it took."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        self._log("done" if ok else "stopped")

    def _log(self, event: str) -> None:
        elapsed = time.monotonic() - self.t0
        eta = (elapsed / self.done * (self.total - self.done)) if self.total and self.done and event == "progress" \
            else None
        of = f"/{self.total}" if self.total is not None else ""
        pct = f" ({100 * self.done / self.total:.0f} %)" if self.total else ""
        tail = f", about {eta:.0f} s left" if eta is not None else ""
        self.logger.info("%s %s: %d%s %s%s, %.1f s%s", self.label, event, self.done, of, self.unit, pct, elapsed,
                         tail, extra={"stage": self.label, "event": event, "done": self.done, "total": self.total,
                                      "elapsed_s": round(elapsed, 3),
                                      **({"eta_s": round(eta, 1)} if eta is not None else {})})
