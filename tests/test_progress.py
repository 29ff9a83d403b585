"""Long one-off work reports rate and ETA in the log when no terminal shows a bar (nohup, SLURM, pipes)."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest

from cnnfeat.data.feature_cache import FrozenFeatureDataModule
from cnnfeat.models import FrozenAlexNet
from cnnfeat.run import progress


def test_log_lines_carry_count_rate_and_eta(caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = iter(float(t) for t in range(100))
    monkeypatch.setattr(progress.time, "perf_counter", lambda: next(clock))
    with (
        caplog.at_level(logging.INFO, logger="cnnfeat"),
        progress.task_progress("work", 10, "images", every_s=1.0, terminal=False) as advance,
    ):
        for _ in range(5):
            advance(2)
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "work: 10 images"
    # the clock ticks 1 s per call: after 4 images in 2 s, 2.0 images/s and 6 images to go = 3 s
    assert "work: 4/10 (40%), 2.0 images/s, ETA 0:00:03" in lines
    assert all(re.fullmatch(r"work: \d+/10 \(\d+%\), [\d.]+ images/s, ETA 0:00:\d\d", m) for m in lines[1:-1])
    assert re.fullmatch(r"work: 10/10 \(100%\), [\d.]+ images/s in 0:00:\d\d", lines[-1])


def test_work_that_fails_says_where_it_stopped(caplog: pytest.LogCaptureFixture) -> None:
    with (
        caplog.at_level(logging.INFO, logger="cnnfeat"),
        pytest.raises(KeyError),
        progress.task_progress("work", 10, "images", terminal=False) as advance,
    ):
        advance(3)
        raise KeyError("boom")
    assert [r.getMessage() for r in caplog.records] == ["work: 10 images", "work: stopped after 3/10 images"]


def test_a_terminal_gets_a_bar_and_no_log_lines(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="cnnfeat"), progress.task_progress("work", 3, terminal=True) as advance:
        advance(3)
    assert not caplog.records


def test_feature_extraction_logs_progress_without_a_terminal(
    data_dir: Path, cache_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    dm = FrozenFeatureDataModule(
        FrozenAlexNet("none", input_size=64), data_dir=data_dir, cache_dir=cache_dir, max_images=32, download=False
    )
    with caplog.at_level(logging.INFO, logger="cnnfeat"):
        dm.prepare_data()  # pytest captures stdout: not a terminal
    messages = [r.getMessage() for r in caplog.records]
    assert "AlexNet features, train (cpu): 32 images" in messages
    assert "AlexNet features, test (cpu): 32 images" in messages
