"""A tokenizer next to its model: does it fit, and the copy that is saved with it. Training-side: saved models never import it."""

from __future__ import annotations

import copy

from torch import nn


def check_tokenizer_matches_model(tokenizer, model: nn.Module) -> None:
    """Raise when a tokenizer can produce ids the model has no embedding for."""
    vocab_size = model.config.vocab_size
    if len(tokenizer) > vocab_size:
        raise ValueError(
            f"The tokenizer has {len(tokenizer)} tokens but the model's config.vocab_size is {vocab_size}: "
            f"ids >= {vocab_size} would have no embedding. Use the tokenizer the model was trained with, "
            f"or build the model with vocab_size=len(tokenizer)."
        )


def tokenizer_for_saving(tokenizer, model: nn.Module):
    """A copy of ``tokenizer`` whose ``model_max_length`` is the model's context.

    A freshly built tokenizer says ``model_max_length = 1e30`` ("no limit"), so ``pipeline`` and
    ``tokenizer(..., truncation=True)`` would feed a saved model sequences longer than it accepts.
    The copy leaves the caller's tokenizer as it was.
    """
    saved = copy.deepcopy(tokenizer)
    saved.model_max_length = model.config.max_position_embeddings
    return saved
