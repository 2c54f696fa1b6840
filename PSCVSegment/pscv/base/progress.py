"""Progress events and cooperative cancel for long work (training, inference)."""

from __future__ import annotations

import time
from typing import Callable, Optional

ProgressCallback = Optional[Callable[[dict], None]]
StopCheck = Optional[Callable[[], bool]]


class Cancelled(Exception):
    """Raised inside long work when its `should_stop` callable said stop."""


class Reporter:
    """Counts the steps of one stage, reports them at most `per_second` times a second, checks for stop."""

    def __init__(self, stage: str, total: int, progress: ProgressCallback = None, should_stop: StopCheck = None,
                 device: str = "cpu", per_second: float = 4.0, first_step: int = 0):
        self.stage, self.total, self.device, self.first_step = stage, total, device, first_step
        self.progress, self.should_stop = progress, should_stop
        self.interval = 1.0 / per_second
        self.started = time.monotonic()
        self.last_report = -1.0

    def step(self, step: int, loss: float | None = None, force: bool = False, **extra) -> None:
        """Report that `step` of `total` steps are done; raise Cancelled if asked to stop."""
        if self.should_stop is not None and self.should_stop():
            raise Cancelled(f"{self.stage} cancelled at step {step} of {self.total}")
        if self.progress is None:
            return
        now = time.monotonic()
        if not force and step < self.total and now - self.last_report < self.interval:
            return
        self.last_report = now
        elapsed = now - self.started
        done = step - self.first_step  # steps done since this Reporter started (a resumed run starts later)
        seconds_left = elapsed / done * (self.total - step) if done > 0 else None
        event = {"event": "progress", "stage": self.stage, "step": int(step), "total": int(self.total),
                 "loss": None if loss is None else float(loss),
                 "seconds_left": None if seconds_left is None else round(seconds_left, 1),
                 "device": self.device}
        event.update(extra)
        self.progress(event)
