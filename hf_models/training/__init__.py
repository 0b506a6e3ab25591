"""Lesson 7: the training loop ``Trainer`` runs for us, written by hand in one file, ``loop.py``.

``loop.py`` reads top to bottom as the lesson: the warm-up + cosine schedule, what a step reads,
what a checkpoint holds (without pickle), and :class:`~hf_models.training.loop.TrainingLoop`.
Lesson 8 trains its hand-written LoRA on it, lesson 11 subclasses it for DPO
(``hf_models.alignment.dpo_loop``) and lesson 12 runs every ablation cell on it.

What is not the loop lives elsewhere: the recipes' plumbing (arguments, data, ``Trainer`` set-up,
saving and publishing) in ``hf_models.recipe_support``; the step clock it shares with ``Trainer``
and the memory measure in ``hf_models.benchmarking``. Saved models never import this package.
"""

from .loop import LoopResult, TrainingLoop, WarmupCosineSchedule, read_metrics

__all__ = ["LoopResult", "TrainingLoop", "WarmupCosineSchedule", "read_metrics"]
