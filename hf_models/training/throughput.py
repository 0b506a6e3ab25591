"""Training throughput in tokens per second, measured around the optimizer steps only.

``Trainer``'s own ``train_samples_per_second`` divides by the whole run, periodic evaluation
included; to compare implementations we want the time of the training steps alone.
"""

from __future__ import annotations

import time

from transformers import TrainerCallback


class ThroughputCallback(TrainerCallback):
    """Accumulates step time between ``on_step_begin`` and ``on_step_end`` and the tokens processed."""

    def __init__(self, tokens_per_step: int, skip_first_steps: int = 2):
        self.tokens_per_step = tokens_per_step
        self.skip_first_steps = skip_first_steps  # the first steps include one-off warm-up costs
        self.steps = 0
        self.seconds = 0.0
        self._start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        elapsed = time.perf_counter() - self._start
        self.steps += 1
        if self.steps > self.skip_first_steps:
            self.seconds += elapsed

    @property
    def tokens_per_second(self) -> float:
        timed_steps = self.steps - self.skip_first_steps
        return self.tokens_per_step * timed_steps / self.seconds if timed_steps > 0 and self.seconds > 0 else float("nan")
