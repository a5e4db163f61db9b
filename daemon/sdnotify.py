"""systemd's notification protocol for `horse-ledger daemon` under `Type=notify` (no dependency).

Owns sd_notify: one datagram of `KEY=value` lines to the unix socket in $NOTIFY_SOCKET (an abstract socket
when it starts with "@"), read through `ledger.config.service_manager()`. Outside systemd every call is a
no-op. The daemon sends `READY=1` once the schedule is set, `STATUS=…` at each stage of a night and between
nights (`systemctl status horse-ledger` shows the last one), `STOPPING=1` on SIGTERM, and, when the unit sets
`WatchdogSec=`, `WATCHDOG=1` from a thread every half interval.

    notifier = Notifier.from_environment()
    notifier.ready("idle; next night 02:00")
    notifier.status("night: editing (batch 12)")
    with notifier.watchdog():   # pings while the block runs
        ...
"""
from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
from collections.abc import Iterator

from ledger.config import ServiceManager, service_manager

log = logging.getLogger("daemon.sdnotify")


class Notifier:
    """Sends sd_notify messages to one socket (or nowhere, when `socket_path` is empty)."""

    def __init__(self, socket_path: str = "", *, watchdog_usec: int = 0) -> None:
        self.socket_path = socket_path
        self.watchdog_usec = watchdog_usec
        self._warned = False

    @classmethod
    def from_environment(cls, env: ServiceManager | None = None) -> Notifier:
        """From $NOTIFY_SOCKET / $WATCHDOG_USEC (the watchdog only when $WATCHDOG_PID is unset or ours)."""
        env = env or service_manager()
        ours = env.watchdog_pid in (0, os.getpid())
        return cls(env.notify_socket, watchdog_usec=env.watchdog_usec if ours else 0)

    @property
    def enabled(self) -> bool:
        return bool(self.socket_path)

    def notify(self, *lines: str) -> bool:
        """Send `lines` as one message; True when sent. Failures are logged once, never raised."""
        if not self.enabled:
            return False
        address = "\0" + self.socket_path[1:] if self.socket_path.startswith("@") else self.socket_path
        message = "\n".join(line.replace("\n", " ") for line in lines).encode("utf-8", "replace")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto(message, address)
        except OSError as exc:
            if not self._warned:
                log.warning("sd_notify to %s failed: %s; systemd will not see the daemon's state (check "
                            "NotifyAccess= and Type=notify in the unit)", self.socket_path, exc)
                self._warned = True
            return False
        return True

    def ready(self, status: str = "") -> bool:
        return self.notify("READY=1", *([f"STATUS={status}"] if status else []))

    def status(self, text: str) -> bool:
        return self.notify(f"STATUS={text}")

    def stopping(self, status: str = "") -> bool:
        return self.notify("STOPPING=1", *([f"STATUS={status}"] if status else []))

    def ping(self) -> bool:
        return self.notify("WATCHDOG=1")

    @contextlib.contextmanager
    def watchdog(self) -> Iterator[threading.Event | None]:
        """Ping `WATCHDOG=1` every half WatchdogSec while the block runs (nothing when no watchdog is set)."""
        if not (self.enabled and self.watchdog_usec > 0):
            yield None
            return
        done = threading.Event()
        interval_s = self.watchdog_usec / 2e6

        def loop() -> None:
            while not done.wait(interval_s):
                self.ping()

        self.ping()
        thread = threading.Thread(target=loop, name="sd-watchdog", daemon=True)
        thread.start()
        try:
            yield done
        finally:
            done.set()
            thread.join(timeout=5)


def describe_night(result: object) -> str:
    """A one-line STATUS for after a night: "last night: batch 12 published snapshot 7 (20 applied, …)"."""
    if result is None:
        return "idle; the last night did not run to the end (another applier, or an error: see the journal)"
    status = getattr(result, "status", "?")
    if status == "empty":
        return "idle; last night: nothing pending"
    batch = getattr(result, "batch_id", None)
    what = f"published snapshot {result.snapshot_id}" if status == "published" else status  # type: ignore[attr-defined]
    counts = (f"{len(getattr(result, 'applied', []))} applied, {len(getattr(result, 'failed', {}))} failed, "
              f"{len(getattr(result, 'rejected', {}))} rejected")
    return f"idle; last night: batch {batch} {what} ({counts})"
