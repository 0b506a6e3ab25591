"""A ``Cache`` for models whose past is a fixed-size state, not a growing list of keys and values.

A transformer must keep every past key and value, because attention looks back at all of them.
A recurrent network (lesson 3) squeezes the whole past into its hidden state ``h_t``, and an
n-gram model (lesson 2) only ever looks at its last ``n - 1`` tokens. For both, the cache that
makes generation cheap is a fixed-size tensor per layer, and each new token costs one step
instead of re-running the prefix.

transformers' ``generate()`` talks to any past through the ``Cache`` API, and its
``cache_utils`` already has a layer type for recurrent state (``LinearAttentionLayer``, used by
Mamba-style and linear-attention models). This module reuses it, adding two things:

* ``get_seq_length()`` counts the tokens seen. A state has no sequence axis, but ``generate()``
  asks the cache how long the past is to decide which input ids are new.
* ``is_compileable`` is False, so ``generate()`` does not try to build 4-D attention masks for a
  model without attention.

Beam search works unchanged: ``Cache.reorder_cache`` reorders the states along the batch axis.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, LinearAttentionLayer


class RecurrentStateLayer(LinearAttentionLayer):
    """One layer's state, stored by transformers' linear-attention layer (in place, fixed shape)."""

    def update_recurrent_state(self, recurrent_states: torch.Tensor, state_idx: int = 0, **kwargs) -> torch.Tensor:
        state = super().update_recurrent_state(recurrent_states, state_idx, **kwargs)
        # The parent marks a state as present only through its conv path; we have no conv state.
        self.has_previous_state[state_idx] = True
        return state


class RecurrentStateCache(Cache):
    """Per-layer fixed-size states plus a count of the tokens they summarise.

    Args:
        num_layers: how many layers keep a state (0 is fine: a bigram model needs none).
    """

    def __init__(self, num_layers: int) -> None:
        super().__init__(layers=[RecurrentStateLayer() for _ in range(num_layers)])
        self.seen_tokens = 0

    def get_state(self, layer_idx: int) -> torch.Tensor | None:
        """The state after the last token seen, or None before the first forward."""
        return self.get_recurrent_state(layer_idx)

    def set_state(self, state: torch.Tensor, layer_idx: int) -> None:
        self.update_recurrent_state(state, layer_idx)

    def advance(self, num_tokens: int) -> None:
        """Record that the states now also summarise ``num_tokens`` more tokens."""
        self.seen_tokens += num_tokens

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    @property
    def is_compileable(self) -> bool:
        return False

    def reset(self) -> None:
        super().reset()
        self.seen_tokens = 0
