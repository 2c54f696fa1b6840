"""Progress events and cooperative cancel for long work (training, inference)."""

from __future__ import annotations

import time
from collections import deque
from typing import Callable, Optional

ProgressCallback = Optional[Callable[[dict], None]]
StopCheck = Optional[Callable[[], bool]]


class Cancelled(Exception):
    """Raised inside long work when its `should_stop` callable said stop."""


class Reporter:
    """Counts the steps of one stage, reports them at most `per_second` times a second, checks for stop.

    The time left is the steps left at the pace of the last `window` seconds (all of them, early on): a
    slow first step, a machine that gets busier or a loss term that starts later in the run then moves the
    estimate within a minute or two, where the average since the start would lag behind for hours."""

    def __init__(self, stage: str, total: int, progress: ProgressCallback = None, should_stop: StopCheck = None,
                 device: str = "cpu", per_second: float = 4.0, first_step: int = 0, window: float = 120.0,
                 clock: Callable[[], float] = time.monotonic):
        self.stage, self.total, self.device, self.first_step = stage, total, device, first_step
        self.progress, self.should_stop = progress, should_stop
        self.interval, self.window, self.clock = 1.0 / per_second, window, clock
        self.started = clock()
        self.last_report = -1.0
        self.samples = deque([(self.started, first_step)])  # (time, step) of the reports in the window

    def step(self, step: int, loss=None, force: bool = False, ask: bool = True, **extra) -> None:
        """Report that `step` of `total` steps are done, with the loss of that step (a number, or a callable
        giving it: called only when the step is reported); raise Cancelled if asked to stop (`ask`: whether to
        ask `should_stop`)."""
        if ask and self.should_stop is not None and self.should_stop():
            raise Cancelled(f"{self.stage} cancelled at step {step} of {self.total}")
        if self.progress is None:
            return
        now = self.clock()
        if not force and step < self.total and now - self.last_report < self.interval:
            return
        self.last_report = now
        seconds_left = self.seconds_left(now, step)
        loss = loss() if callable(loss) else loss
        event = {"event": "progress", "stage": self.stage, "step": int(step), "total": int(self.total),
                 "loss": None if loss is None else float(loss),
                 "seconds_left": None if seconds_left is None else round(seconds_left, 1),
                 "device": self.device}
        event.update(extra)
        self.progress(event)

    def seconds_left(self, now: float, step: int) -> float | None:
        """The steps left at the pace of the last `window` seconds (None before the first step is done)."""
        while len(self.samples) > 1 and now - self.samples[1][0] >= self.window:
            self.samples.popleft()  # keep the newest sample at least `window` old as the reference
        then, step_then = self.samples[0]
        self.samples.append((now, step))
        done = step - step_then
        return (now - then) / done * (self.total - step) if done > 0 else None
