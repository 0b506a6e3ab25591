"""Expert utilisation over training: the share of routing slots each expert of each MoE layer receives.

A mixture of experts only pays off if its experts are used: a collapsed router sends most tokens
to a few experts, and the others are parameters that cost memory and learn nothing. So MoE
training logs the load, as frontier runs do (DeepSeek-V3 reports the per-expert load of every
layer; Switch and Mixtral watch the fraction of tokens per expert).

Each block returns its router logits with its output, so measuring costs a forward hook that takes
each token's top-k experts from those logits (the router's own choice: softmax is monotonic, so the
top-k logits are the top-k probabilities) and adds up the slots.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import TrainerCallback



class ExpertLoad:
    """Adds up the routing slots of every ``SparseMoeBlock`` in ``model`` over its training forwards.

    :meth:`snapshot` turns the counts since the last snapshot into shares, (layers, E) rows that sum
    to 1 (1/E each for a perfectly balanced router), appends them to :attr:`history` with the step,
    and starts counting again. Forwards in eval mode (evaluation, generation) are not counted; with
    activation checkpointing the backward's recomputation counts every token twice, which leaves
    the shares unchanged.
    """

    def __init__(self, model: nn.Module) -> None:
        # By name: lesson 10's block and lesson 12's copy of it are two classes (each lesson file is
        # whole), and a model loaded with trust_remote_code has its own copy of the class too.
        self.blocks = [m for m in model.modules() if type(m).__name__ == "SparseMoeBlock"]
        if not self.blocks:
            raise ValueError(f"ExpertLoad needs a model with SparseMoeBlock layers; {type(model).__name__} has none.")
        num_experts = self.blocks[0].router.num_experts
        self.counts = torch.zeros(len(self.blocks), num_experts, dtype=torch.long)
        self.history: list[tuple[int, torch.Tensor]] = []
        self._handles = [block.register_forward_hook(self._count(i)) for i, block in enumerate(self.blocks)]

    def _count(self, layer: int):
        def hook(module: nn.Module, args, output: tuple[torch.Tensor, torch.Tensor]) -> None:
            if module.training:
                _, router_logits = output  # (N, E)
                chosen = router_logits.detach().topk(module.router.top_k, dim=-1).indices  # (N, k)
                counts = torch.bincount(chosen.reshape(-1), minlength=module.router.num_experts)
                self.counts[layer] += counts.to(self.counts.device)

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
