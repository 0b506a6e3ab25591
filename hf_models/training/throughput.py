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


class ThroughputCallback(TrainerCallback):
    def __init__(self, tokens_per_step: int, skip_first_steps: int = 5):
        self.tokens_per_step = tokens_per_step
        self.skip_first_steps = skip_first_steps
        self.steps = 0
        self.timed_steps = 0
        self.seconds = 0.0
        self._last: float | None = None
        self._evaluated = False

    def on_train_begin(self, args, state, control, **kwargs):
        # Short runs (smoke tests) skip fewer steps, so that some remain to be timed.
        self.skip_first_steps = min(self.skip_first_steps, state.max_steps // 10)

    def on_step_end(self, args, state, control, **kwargs):
        now = time.perf_counter()
        self.steps += 1
        if self._last is not None and not self._evaluated and self.steps > self.skip_first_steps:
            self.seconds += now - self._last
            self.timed_steps += 1
        self._last, self._evaluated = now, False

    def on_evaluate(self, args, state, control, **kwargs):
        self._evaluated = True  # the interval that holds an evaluation is not a training step

    @property
    def tokens_per_second(self) -> float:
        return self.tokens_per_step * self.timed_steps / self.seconds if self.seconds > 0 else float("nan")
