"""daemon/sdnotify.py and its use in daemon/scheduler.py: READY=1, STATUS= lines, WATCHDOG=1 over a real socket."""
from __future__ import annotations

import os
import signal
import socket
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from daemon.scheduler import BatchRunner, run_daemon
from daemon.sdnotify import Notifier, describe_night
from ledger.config import ServiceManager, load_settings, service_manager


@pytest.fixture
def listener(tmp_path: Path):
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(5)
    yield path, sock
    sock.close()


def messages(sock: socket.socket, n: int) -> list[str]:
    return [sock.recv(4096).decode() for _ in range(n)]


def test_ready_and_status_reach_the_socket(listener) -> None:
    path, sock = listener
    notifier = Notifier.from_environment(service_manager({"NOTIFY_SOCKET": path}))
    assert notifier.ready("idle") and notifier.status("night running: editing\nsecond line")
    assert messages(sock, 2) == ["READY=1\nSTATUS=idle", "STATUS=night running: editing second line"]


def test_abstract_socket_names_work() -> None:
    name = f"horse-ledger-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        assert Notifier("@" + name).stopping()
        assert sock.recv(100) == b"STOPPING=1"


def test_outside_systemd_nothing_is_sent_and_a_dead_socket_is_not_fatal(tmp_path) -> None:
    assert not Notifier.from_environment(ServiceManager()).ready()
    assert not Notifier(str(tmp_path / "gone.sock")).status("x")


def test_watchdog_pings_every_half_interval_only_when_asked(listener) -> None:
    path, sock = listener
    env = service_manager({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "40000", "WATCHDOG_PID": str(os.getpid())})
    with Notifier.from_environment(env).watchdog() as running:
        assert running is not None
        assert messages(sock, 3) == ["WATCHDOG=1"] * 3
    other = service_manager({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "40000", "WATCHDOG_PID": "1"})
    with Notifier.from_environment(other).watchdog() as running:  # the watchdog is another process's
        assert running is None


def test_daemon_says_ready_and_stopping_and_reports_each_night(listener) -> None:
    path, sock = listener
    reported = []
    notifier = Notifier(path)
    settings = load_settings(environ={}, schedule_cron="0 2 * * *")
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    timer = threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGTERM))
    timer.start()
    try:
        run_daemon(settings, lambda stop: None, after=reported.append, notifier=notifier)
    finally:
        timer.cancel()
        for sig, handler in saved.items():
            signal.signal(sig, handler)
    got = messages(sock, 2)
    assert got[0].startswith("READY=1\nSTATUS=idle; next night") and got[1].startswith("STOPPING=1")
    runner = BatchRunner(lambda stop: SimpleNamespace(status="empty"), after=reported.append)
    runner()
    failing = BatchRunner(lambda stop: 1 / 0, after=lambda r: (_ for _ in ()).throw(RuntimeError("x")))
    assert failing() is None  # neither the job's error nor the report's stops the daemon
    assert [r.status for r in reported] == ["empty"]


def test_night_status_lines() -> None:
    published = SimpleNamespace(status="published", batch_id=4, snapshot_id=9, applied=[1, 2], failed={},
                                rejected={3: "gate"})
    assert describe_night(published) == ("idle; last night: batch 4 published snapshot 9 "
                                         "(2 applied, 0 failed, 1 rejected)")
    assert describe_night(SimpleNamespace(status="empty")) == "idle; last night: nothing pending"
    assert "see the journal" in describe_night(None)
