"""horse/progress.py: logged stages with counts, a bar only on a terminal; used by the covariance estimate."""
from __future__ import annotations

import io
import logging

import pytest

from horse import progress as progress_mod
from horse.progress import Progress, log_stage

log = logging.getLogger("horse.test_progress")


def test_progress_logs_start_periodic_counts_and_end(caplog, monkeypatch) -> None:
    monkeypatch.setattr(progress_mod, "is_terminal", lambda stream=None: False)
    with caplog.at_level(logging.INFO, logger="horse.test_progress"):
        with Progress("fold", 4, unit="edit", logger=log, every_s=0.0) as p:
            p.update(2)
            p.set(4)
    events = [(r.event, r.done, r.total) for r in caplog.records]
    assert events == [("started", 0, 4), ("progress", 2, 4), ("progress", 4, 4), ("done", 4, 4)]
    assert "fold progress: 2/4 edit (50 %)" in caplog.records[1].getMessage()
    assert caplog.records[1].eta_s >= 0 and p._bar is None


def test_progress_says_stopped_when_the_block_raises(caplog, monkeypatch) -> None:
    monkeypatch.setattr(progress_mod, "is_terminal", lambda stream=None: False)
    with caplog.at_level(logging.INFO, logger="horse.test_progress"), pytest.raises(RuntimeError):
        with Progress("fine-tune", None, logger=log):
            raise RuntimeError("boom")
    assert caplog.records[-1].event == "stopped" and "fine-tune stopped: 0 it" in caplog.records[-1].getMessage()


def test_bar_only_on_a_terminal(monkeypatch) -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(progress_mod.sys, "stderr", Tty())
    log.setLevel(logging.INFO)
    p = Progress("covariance", 10, logger=log)
    assert p._bar is not None
    p.update(10)
    p.close()
    assert "covariance" in progress_mod.sys.stderr.getvalue()
    monkeypatch.setattr(progress_mod.sys, "stderr", io.StringIO())
    assert Progress("covariance", 10, logger=log)._bar is None


def test_log_stage_carries_counts_as_fields(caplog) -> None:
    with caplog.at_level(logging.INFO, logger="horse.test_progress"):
        log_stage(log, "fold: edit done", edits=512, seconds=3.5)
    (record,) = caplog.records
    assert record.getMessage() == "fold: edit done (edits 512, seconds 3.5)" and record.edits == 512


def test_covariance_estimate_reports_its_progress(caplog) -> None:
    import torch

    from horse.covariance import estimate_second_moments
    from horse.zoo import load_model

    model, _ = load_model("tiny-llama", progress=False)
    layer = "model.layers.1.mlp.down_proj"
    with caplog.at_level(logging.INFO, logger="horse.covariance"):
        estimate_second_moments(model, [layer], torch.randint(0, 100, (4, 16)), batch_size=2)
    done = [r for r in caplog.records if getattr(r, "event", None) == "done"]
    assert len(done) == 1 and done[0].done == done[0].total == 64
