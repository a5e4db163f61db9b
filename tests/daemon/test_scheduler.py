"""daemon/scheduler.py: the cron job fires on a fake clock, coalesces, and SIGTERM stops cleanly."""
from __future__ import annotations

import datetime as dt
import threading
import time

import apscheduler.executors.base as ap_executors
import apscheduler.schedulers.base as ap_base
import pytest

from daemon.scheduler import BadSchedule, BatchRunner, build_scheduler, cron_trigger
from ledger.config import load_settings

UTC = dt.timezone.utc


class FakeClock:
    """Replaces `datetime` inside APScheduler so that 'now' is whatever the test says."""

    def __init__(self, now: dt.datetime) -> None:
        self.now_utc = now
        clock = self

        class _FakeDatetime(dt.datetime):
            @classmethod
            def now(cls, tz=None):  # noqa: D401 - mirrors datetime.now
                return clock.now_utc.astimezone(tz) if tz else clock.now_utc.replace(tzinfo=None)

        self.datetime = _FakeDatetime


@pytest.fixture
def fake_clock(monkeypatch):
    clock = FakeClock(dt.datetime(2030, 1, 1, 1, 59, 0, tzinfo=UTC))
    monkeypatch.setattr(ap_base, "datetime", clock.datetime)
    monkeypatch.setattr(ap_executors, "datetime", clock.datetime)
    return clock


class Cycles:
    """Counts the scheduler's job-processing rounds and the jobs it submitted, so a test can wait for a round to
    *finish* at the fake time instead of sleeping: "nothing fired" then means the scheduler looked and found
    nothing due, not that the test did not wait long enough."""

    def __init__(self, scheduler) -> None:
        from apscheduler.events import EVENT_JOB_SUBMITTED

        self.done = 0
        self.submitted: list[dt.datetime] = []
        self._cond = threading.Condition()
        original = scheduler._process_jobs  # the round the main loop runs after each wakeup

        def counted():
            try:
                return original()
            finally:
                with self._cond:
                    self.done += 1
                    self._cond.notify_all()

        scheduler._process_jobs = counted
        scheduler.add_listener(lambda event: self.submitted.append(event.scheduled_run_times), EVENT_JOB_SUBMITTED)
        self.scheduler = scheduler

    def one_more_round(self, timeout_s: float = 10.0) -> None:
        """Wake the scheduler and return once a whole round has run after this call (its events dispatched)."""
        with self._cond:
            target = self.done + 1
        self.scheduler.wakeup()
        with self._cond:
            assert self._cond.wait_for(lambda: self.done >= target, timeout_s), "the scheduler did not run a round"


def _wait_for(predicate, timeout_s=10.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return False


def test_cron_job_fires_at_the_scheduled_minute_on_a_fake_clock(fake_clock):
    settings = load_settings(environ={}, schedule_cron="0 2 * * *", misfire_grace_s=600)
    fired: list[dt.datetime] = []
    runner = BatchRunner(lambda stop: fired.append(fake_clock.now_utc))
    scheduler = build_scheduler(settings, runner, timezone=UTC)
    cycles = Cycles(scheduler)
    thread = threading.Thread(target=scheduler.start, daemon=True)
    thread.start()
    try:
        assert _wait_for(lambda: scheduler.get_job("nightly-batch").next_run_time is not None)
        job = scheduler.get_job("nightly-batch")
        assert job.next_run_time == dt.datetime(2030, 1, 1, 2, 0, tzinfo=UTC)
        assert (job.coalesce, job.max_instances, job.misfire_grace_time) == (True, 1, 600)
        fake_clock.now_utc = dt.datetime(2030, 1, 1, 1, 59, 59, tzinfo=UTC)
        cycles.one_more_round()  # a full round at 01:59:59 looked at the job and submitted nothing
        assert cycles.submitted == [] and fired == []
        fake_clock.now_utc = dt.datetime(2030, 1, 1, 2, 0, 1, tzinfo=UTC)
        cycles.one_more_round()
        assert cycles.submitted == [[dt.datetime(2030, 1, 1, 2, 0, tzinfo=UTC)]]
        assert _wait_for(lambda: len(fired) == 1)
        assert scheduler.get_job("nightly-batch").next_run_time == dt.datetime(2030, 1, 2, 2, 0, tzinfo=UTC)
    finally:
        scheduler.shutdown(wait=True)
        thread.join(5)
    assert runner.runs == 1


def test_missed_nights_coalesce_into_one_run(fake_clock):
    settings = load_settings(environ={}, schedule_cron="0 2 * * *", misfire_grace_s=3 * 86400)
    fired = []
    runner = BatchRunner(lambda stop: fired.append(1))
    scheduler = build_scheduler(settings, runner, timezone=UTC)
    cycles = Cycles(scheduler)
    thread = threading.Thread(target=scheduler.start, daemon=True)
    thread.start()
    try:
        assert _wait_for(lambda: scheduler.get_job("nightly-batch").next_run_time is not None)
        fake_clock.now_utc = dt.datetime(2030, 1, 3, 12, 0, tzinfo=UTC)  # slept through three nights
        cycles.one_more_round()
        assert _wait_for(lambda: len(fired) >= 1)
        cycles.one_more_round()  # another full round at the same time: nothing more is due
        assert cycles.submitted == [[dt.datetime(2030, 1, 3, 2, 0, tzinfo=UTC)]]  # three nights, one run
    finally:
        scheduler.shutdown(wait=True)
        thread.join(5)
    assert fired == [1]


def test_stop_flag_reaches_the_job_and_shutdown_waits_for_it():
    started, finished = threading.Event(), threading.Event()

    def job(stop):
        started.set()
        assert stop.wait(5)  # a batch sees the flag at its next stage boundary
        finished.set()

    runner = BatchRunner(job)
    thread = threading.Thread(target=runner, daemon=True)
    thread.start()
    assert started.wait(5)
    assert not runner.wait_idle(timeout_s=0.05)
    runner.stop.set()
    assert runner.wait_idle(timeout_s=5) and finished.is_set()
    assert runner() is None and runner.runs == 1  # no new batch once stopping


def test_a_bad_cron_line_says_how_to_fix_it():
    with pytest.raises(BadSchedule, match="5-field"):
        cron_trigger("every night")
