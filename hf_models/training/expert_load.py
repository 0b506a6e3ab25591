"""Expert utilisation over training: the share of routing slots each expert of each MoE layer receives.

A mixture of experts only pays off if its experts are used: a collapsed router sends most tokens
to a few experts, and the others are parameters that cost memory and learn nothing. So MoE
training logs the load, as frontier runs do (DeepSeek-V3 reports the per-expert load of every
layer; Switch and Mixtral watch the fraction of tokens per expert).

The blocks count their routing slots during the forward anyway (``SparseMoeBlock.tokens_per_expert``,
needed to split the batch), so measuring costs a forward hook that adds those counts up.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import TrainerCallback

from ..moe import SparseMoeBlock


class ExpertLoad:
    """Adds up the routing slots of every ``SparseMoeBlock`` in ``model`` over its training forwards.

    :meth:`snapshot` turns the counts since the last snapshot into shares, (layers, E) rows that sum
    to 1 (1/E each for a perfectly balanced router), appends them to :attr:`history` with the step,
    and starts counting again. Forwards in eval mode (evaluation, generation) are not counted; with
    activation checkpointing the backward's recomputation counts every token twice, which leaves
    the shares unchanged.
    """

    def __init__(self, model: nn.Module) -> None:
        self.blocks = [m for m in model.modules() if isinstance(m, SparseMoeBlock)]
        if not self.blocks:
            raise ValueError(f"ExpertLoad needs a model with SparseMoeBlock layers; {type(model).__name__} has none.")
        num_experts = self.blocks[0].router.num_experts
        self.counts = torch.zeros(len(self.blocks), num_experts, dtype=torch.long)
        self.history: list[tuple[int, torch.Tensor]] = []
        self._handles = [block.register_forward_hook(self._count(i)) for i, block in enumerate(self.blocks)]

    def _count(self, layer: int):
        def hook(module: SparseMoeBlock, args, output) -> None:
            if module.training:
                self.counts[layer] += module.tokens_per_expert.to(self.counts.device)

        return hook

    def snapshot(self, step: int) -> torch.Tensor | None:
        """Record the shares since the last snapshot at ``step`` (None if nothing was routed)."""
        totals = self.counts.sum(dim=-1, keepdim=True)
        if not bool((totals > 0).all()):
            return None
        shares = self.counts.double() / totals  # (layers, E)
        self.history.append((step, shares))
        self.counts.zero_()
        return shares

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


class ExpertLoadCallback(TrainerCallback):
    """An :class:`ExpertLoad` snapshot every ``every`` optimizer steps of a ``Trainer`` run."""

    def __init__(self, every: int = 10) -> None:
        self.every = every
        self.load: ExpertLoad | None = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.load = ExpertLoad(model)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every == 0:
            self.load.snapshot(state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        self.load.snapshot(state.global_step)
        self.load.remove()


def imbalance(shares: torch.Tensor) -> torch.Tensor:
    """Max load over the uniform load per layer: 1.0 is perfectly balanced, ``E / k`` means k experts take everything."""
    return shares.max(dim=-1).values * shares.shape[-1]


__all__ = ["ExpertLoad", "ExpertLoadCallback", "imbalance"]
