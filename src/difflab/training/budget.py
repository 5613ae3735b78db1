"""A wall-clock budget turned into a step count for the LR schedule's horizon."""

from __future__ import annotations


class StepBudget:
    """How many steps ``seconds`` of training will take, re-estimated as the run goes.

    The cosine LR schedule needs a horizon, so a budget in minutes becomes a step count: first
    estimated at step 15 from the rate since step 5, then at steps 30, 60, ..., at least every
    5 % of the budget, and whenever the estimate is reached before the budget is spent — each
    time from the rate of the latest window (at least 20 steps, else since step 5), since the
    machine's speed may change under load: a slow start must not end the run early once the
    machine is free again. The budget itself is a hard stop. A resumed run passes the time its
    checkpoint had used in ``elapsed``."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.recalibrate_s = max(5.0, 0.05 * seconds)
        self.next_estimate = 15
        self.first: tuple[int, float] | None = None  # (step, time) where the rate is measured
        self.last: tuple[int, float] | None = None  # ... from: step 5, the latest estimate

    def total(self, step: int, total: int | None, elapsed: float,
              now: float) -> tuple[int | None, bool]:
        """The step count to stop at after ``step`` steps and ``elapsed`` seconds of the
        budget (``now``: a monotonic clock's time; ``total``: the current estimate, None before
        the first), and whether the budget is spent."""
        if self.first is None and step >= 5:
            self.first = self.last = (step, now)
        if elapsed >= self.seconds:
            return step, True
        if self.first is None or step < self.first[0] + 5 or not (
                step >= self.next_estimate or now - self.last[1] >= self.recalibrate_s
                or (total is not None and step >= total)):  # (about to stop early)
            return total, False
        ref = self.last if step - self.last[0] >= 20 else self.first
        rate = (step - ref[0]) / (now - ref[1])  # steps per second, latest window
        self.last = (step, now)
        while self.next_estimate <= step:
            self.next_estimate *= 2
        return max(step + 1, step + int((self.seconds - elapsed) * rate)), False
