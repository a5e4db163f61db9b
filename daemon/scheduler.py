"""The long-running `horse-ledger daemon`: a cron schedule that runs one batch at a time.

Owns: the APScheduler 3.x setup and signal handling. The ledger is the queue, so the scheduler keeps
nothing durable: a memory job store, one job, a cron trigger from `settings.schedule_cron`,
`coalesce=True` (runs missed while the machine slept collapse into one), `max_instances=1` (never two
batches at once in this process; the applier lock covers other processes) and
`misfire_grace_time = settings.misfire_grace_s`.

SIGTERM / SIGINT set a stop flag and stop the scheduler. The batch in progress sees the flag at its next
stage boundary: before publishing it abandons (claimed edits go back to `pending` through
`ledger.status.transition`), once publishing has started it finishes. The process exits when it is done.

    run_daemon(settings, lambda stop: run_batch(settings, stop=stop))
"""
from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from datetime import tzinfo
from typing import Any

from apscheduler.schedulers.blocking import BlockingScheduler
from apscheduler.triggers.cron import CronTrigger

from daemon.errors import DaemonError
from daemon.sdnotify import Notifier
from ledger.config import Settings

log = logging.getLogger("daemon.scheduler")

JOB_ID = "nightly-batch"


class BadSchedule(DaemonError):
    """schedule_cron is not a 5-field cron expression; fix it in the config (e.g. "0 2 * * *" for 02:00)."""


def cron_trigger(expression: str, timezone: tzinfo | str | None = None) -> CronTrigger:
    """A CronTrigger from a standard 5-field crontab line (minute hour day month weekday)."""
    try:
        return CronTrigger.from_crontab(expression, timezone=timezone)
    except ValueError as exc:
        raise BadSchedule(f"schedule_cron = {expression!r} is not a valid 5-field cron expression ({exc}); "
                          f'fix it in the config, e.g. "0 2 * * *" for every night at 02:00') from None


class BatchRunner:
    """Runs the batch job, one at a time, and lets the shutdown path wait for the one in progress."""

    def __init__(self, job: Callable[[threading.Event], Any], *,
                 after: Callable[[Any], None] | None = None) -> None:
        self.job = job
        self.after = after  # called with what each job returned (metrics textfile, sd_notify STATUS)
        self.stop = threading.Event()
        self._busy = threading.Lock()
        self.runs = 0

    def __call__(self) -> Any:
        if self.stop.is_set():
            log.info("stop requested; not starting a new batch")
            return None
        with self._busy:
            self.runs += 1
            try:
                result = self.job(self.stop)
            except Exception:  # noqa: BLE001 - a failed night must not kill the daemon; it is logged
                log.exception("batch job failed; the next scheduled run will try again")
                result = None
            if self.after is not None:
                try:
                    self.after(result)
                except Exception:  # noqa: BLE001 - reporting must not kill the daemon either
                    log.exception("reporting the batch (metrics, systemd status) failed")
            return result

    def wait_idle(self, timeout_s: float | None = None) -> bool:
        """Block until no batch is running (True) or the timeout passes (False)."""
        got = self._busy.acquire(timeout=-1 if timeout_s is None else timeout_s)
        if got:
            self._busy.release()
        return got


def build_scheduler(settings: Settings, runner: Callable[[], Any], *,
                    timezone: tzinfo | str | None = None) -> BlockingScheduler:
    """A BlockingScheduler with one cron job that calls `runner`.

    Args:
        timezone: the cron's time zone; None = the machine's local zone (cron semantics).
    """
    kwargs: dict[str, Any] = {} if timezone is None else {"timezone": timezone}
    scheduler = BlockingScheduler(
        jobstores={"default": {"type": "memory"}},
        executors={"default": {"type": "threadpool", "max_workers": 1}},
        job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": settings.misfire_grace_s},
        **kwargs,
    )
    scheduler.add_job(runner, cron_trigger(settings.schedule_cron, scheduler.timezone), id=JOB_ID,
                      name="horse-ledger nightly batch", replace_existing=True)
    return scheduler


def run_daemon(settings: Settings, job: Callable[[threading.Event], Any], *,
               timezone: tzinfo | str | None = None, install_signals: bool = True,
               after: Callable[[Any], None] | None = None, notifier: Notifier | None = None) -> BatchRunner:
    """Run `job(stop_event)` on the configured schedule until SIGTERM / SIGINT, then wait for it to end.

    Args:
        after: called with each job's result once it returns (None when it raised).
        notifier: systemd notifications (READY=1 once scheduled, STOPPING=1, the watchdog); default: from
            the environment (a no-op outside systemd).
    Returns:
        The BatchRunner (tests read `.runs`).
    """
    runner = BatchRunner(job, after=after)
    scheduler = build_scheduler(settings, runner, timezone=timezone)
    notifier = notifier or Notifier.from_environment()

    def _on_signal(signum: int, _frame: Any) -> None:
        log.info("received %s; finishing or abandoning the current batch", signal.Signals(signum).name)
        notifier.stopping("stopping: finishing or abandoning the current night")
        runner.stop.set()
        scheduler.shutdown(wait=False)

    if install_signals:
        signal.signal(signal.SIGTERM, _on_signal)
        signal.signal(signal.SIGINT, _on_signal)
    job_obj = scheduler.get_job(JOB_ID)
    log.info("daemon started", extra={"schedule_cron": settings.schedule_cron,
                                      "next_run": str(getattr(job_obj, "next_run_time", None) or "on start"),
                                      "misfire_grace_s": settings.misfire_grace_s})
    notifier.ready(f"idle; next night {getattr(job_obj, 'next_run_time', None) or 'on start'}")
    with notifier.watchdog():
        scheduler.start()  # blocks until shutdown
        runner.wait_idle()
    log.info("daemon stopped", extra={"batches_run": runner.runs})
    return runner
