"""Progress events: the time left follows the recent pace, not the average since the start."""

import pytest

from pscv.base.progress import Cancelled, Reporter


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_time_left_follows_the_pace_of_the_last_window():
    clock, events = Clock(), []
    reporter = Reporter("train", 1000, events.append, clock=clock, window=60.0, per_second=1000)
    for step in range(1, 101):  # 100 fast steps: 0.1 s each (a quiet machine, no pseudo-labels yet)
        clock.now += 0.1
        reporter.step(step)
    assert events[-1]["seconds_left"] == pytest.approx(900 * 0.1)
    for step in range(101, 401):  # then 1 s a step (a busy machine, an extra loss term)
        clock.now += 1.0
        reporter.step(step)
    # the last 60 s held 60 steps of 1 s: 600 steps left take 600 s (the average since the start says 460 s)
    assert events[-1]["seconds_left"] == pytest.approx(600, rel=0.02)


def test_a_resumed_run_estimates_from_its_own_steps_and_stop_is_honoured():
    clock, events = Clock(), []
    reporter = Reporter("train", 100, events.append, clock=clock, first_step=90)
    assert reporter.seconds_left(clock.now, 90) is None
    clock.now += 2.0
    reporter.step(92, force=True)
    assert events[-1]["seconds_left"] == pytest.approx(8.0)
    with pytest.raises(Cancelled, match="train cancelled at step 93 of 100"):
        Reporter("train", 100, should_stop=lambda: True).step(93)
