"""The one step clock: how long each step of a loop took, and the tokens per second between steps.

A *step* is whatever a loop repeats: an optimizer step of training, or one new token of
``generate()``. The same clock times all three loops of the project:

* lesson 7's hand-written loop (``hf_models.training.loop``) ticks it after every optimizer step;
* ``Trainer`` ticks it through :class:`ThroughputCallback`;
* ``generate()`` ticks it itself: it calls its stopping criteria once per new token, so a
  :class:`StepClock` passed as one (``stopping_criteria=StoppingCriteriaList([clock])``) records
  every decoding step, and one call gives the whole tokens/s-against-length curve
  (``hf_models.benchmarking.generation.clocked_generate``).

``Trainer``'s own ``train_samples_per_second`` divides by the whole run, periodic evaluation
included. The clock instead times the interval between consecutive steps (data loading, forward,
backward, clipping, optimizer, logging: everything nanoGPT's per-iteration ``dt`` covers), and
:attr:`StepClock.tokens_per_second` leaves out the intervals marked as interrupted (they held an
evaluation or a checkpoint) and the first ``skip_first_steps``, which pay one-off warm-up costs.
"""

from __future__ import annotations

import math
import time

import torch
from transformers import StoppingCriteria, TrainerCallback


class StepClock(StoppingCriteria):
    """Records the duration of every step; a stopping criterion that never stops.

    ``step_seconds[i]`` is how long step ``i`` took, from the end of step ``i - 1`` (for the first
    step: from :meth:`start`, or ``nan`` if :meth:`start` was not called). A step marked
    ``interrupted`` keeps its duration but is left out of :attr:`tokens_per_second`.
    """

    def __init__(self, tokens_per_step: float = 0.0, skip_first_steps: int = 0) -> None:
        self.tokens_per_step = tokens_per_step
        self.skip_first_steps = skip_first_steps
        self.step_seconds: list[float] = []
        self.interrupted: list[bool] = []
        self._last: float | None = None

    def start(self) -> None:
        """Start timing the first step now."""
        self._last = time.perf_counter()

    def step_done(self, interrupted: bool = False) -> None:
        now = time.perf_counter()
        self.step_seconds.append(now - self._last if self._last is not None else math.nan)
        self.interrupted.append(interrupted)
        self._last = now

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        """generate()'s per-token call, after it appended the new token: one step done, never stop."""
        self.step_done()
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    @property
    def steps(self) -> int:
        return len(self.step_seconds)

    def timed_seconds(self) -> list[float]:
        """The durations that count: past the first ``skip_first_steps``, not interrupted, timed at all."""
        return [
            seconds
            for index, (seconds, interrupted) in enumerate(zip(self.step_seconds, self.interrupted))
            if index >= self.skip_first_steps and not interrupted and not math.isnan(seconds)
        ]

    @property
    def tokens_per_second(self) -> float:
        timed = self.timed_seconds()
        return self.tokens_per_step * len(timed) / sum(timed) if timed and sum(timed) > 0 else float("nan")


class ThroughputCallback(TrainerCallback):
    """A :class:`StepClock` driven by ``Trainer``'s step and evaluation events."""

    def __init__(self, tokens_per_step: float, skip_first_steps: int = 5):
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


__all__ = ["StepClock", "ThroughputCallback"]
