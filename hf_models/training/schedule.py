"""The learning-rate schedule almost every LLM is trained with: linear warm-up, then cosine decay to a floor.

Why warm up? At step 0 Adam's second-moment estimates are built from a handful of gradients, so
its per-parameter step sizes are noisy, and a freshly initialised network has large, badly
conditioned gradients. Ramping the learning rate from 0 to its peak over the first few hundred
steps lets those statistics settle before the big steps come. Why cosine? Loss falls fastest at a
high rate early and needs a small rate late to settle into a minimum; a half cosine goes from one
to the other smoothly, spending most of the run near the peak and slowing at the end. GPT-2/3,
LLaMA and nanoGPT all use it, decaying to a floor (often a tenth of the peak) rather than to 0.

For step ``s`` of ``S``, with ``W`` warm-up steps, peak ``lr`` and floor ``min_lr``::

    s < W:   lr * s / W
    s >= W:  min_lr + (lr - min_lr) * 0.5 * (1 + cos(pi * (s - W) / (S - W)))

This equals transformers' ``get_cosine_schedule_with_warmup`` (``min_lr = 0``) and the
``"cosine_with_min_lr"`` schedule at every step (tests/test_training_loop.py checks to 1e-12).
Frontier runs use the same shape, sometimes with "warmup-stable-decay" (a long flat middle, decayed
at the end) so that a run can be extended without restarting the schedule.
"""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler


def warmup_cosine_lr(step: int, peak_lr: float, warmup_steps: int, total_steps: int, min_lr: float = 0.0) -> float:
    """The learning rate at optimizer step ``step`` (0-based: the rate the ``step``-th update uses)."""
    if step < warmup_steps:
        return peak_lr * step / max(1, warmup_steps)
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    cosine = max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    return min_lr + (peak_lr - min_lr) * cosine


class WarmupCosineSchedule(LRScheduler):
    """:func:`warmup_cosine_lr` as a torch scheduler: call ``step()`` once after every optimizer step.

    The rate is a closed form of the step count, so the scheduler's whole state is that count
    (``last_epoch``), which is what a checkpoint saves.
    """

    def __init__(self, optimizer: Optimizer, warmup_steps: int, total_steps: int, min_lr: float = 0.0, last_epoch: int = -1):
        if warmup_steps < 0 or total_steps <= 0:
            raise ValueError(f"warmup_steps must be >= 0 and total_steps > 0, got {warmup_steps} and {total_steps}.")
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.min_lr = min_lr
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        return [
            warmup_cosine_lr(self.last_epoch, base_lr, self.warmup_steps, self.total_steps, self.min_lr)
            for base_lr in self.base_lrs
        ]
