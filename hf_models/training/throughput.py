"""Training throughput in tokens per second, as a loop delivers it.

``Trainer``'s own ``train_samples_per_second`` divides by the whole run, periodic evaluation
included. This callback times the interval between consecutive optimizer steps (data loading,
forward, backward, clipping, optimizer, logging: everything nanoGPT's per-iteration ``dt``
covers) and leaves out the intervals that contain an evaluation, plus the first steps, which pay
one-off warm-up costs.
"""

from __future__ import annotations

import time

from transformers import TrainerCallback


class StepClock:
    """Tokens per second over the intervals between consecutive optimizer steps.

    Leaves out the first ``skip_first_steps`` steps (one-off warm-up costs) and any interval marked
    as interrupted (it held an evaluation or a checkpoint, not only training). The interval before the
    first step is timed only if :meth:`start` was called before it.
    """

    def __init__(self, tokens_per_step: int, skip_first_steps: int = 5):
        self.tokens_per_step = tokens_per_step
        self.skip_first_steps = skip_first_steps
        self.steps = 0
        self.timed_steps = 0
        self.seconds = 0.0
        self._last: float | None = None

    def start(self) -> None:
        self._last = time.perf_counter()

    def step_done(self, interrupted: bool = False) -> None:
        now = time.perf_counter()
        self.steps += 1
        if self._last is not None and not interrupted and self.steps > self.skip_first_steps:
            self.seconds += now - self._last
            self.timed_steps += 1
        self._last = now

    @property
    def tokens_per_second(self) -> float:
        return self.tokens_per_step * self.timed_steps / self.seconds if self.seconds > 0 else float("nan")


class ThroughputCallback(TrainerCallback):
    """A :class:`StepClock` driven by ``Trainer``'s step and evaluation events."""

    def __init__(self, tokens_per_step: int, skip_first_steps: int = 5):
        self.clock = StepClock(tokens_per_step, skip_first_steps)
        self._evaluated = False

    def on_train_begin(self, args, state, control, **kwargs):
        # Short runs (smoke tests) skip fewer steps, so that some remain to be timed.
        self.clock.skip_first_steps = min(self.clock.skip_first_steps, state.max_steps // 10)

    def on_step_end(self, args, state, control, **kwargs):
        self.clock.step_done(interrupted=self._evaluated)
        self._evaluated = False

    def on_evaluate(self, args, state, control, **kwargs):
        self._evaluated = True  # the interval that holds an evaluation is not a training step

    @property
    def tokens_per_second(self) -> float:
        return self.clock.tokens_per_second
