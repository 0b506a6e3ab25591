"""Does a tokenizer fit a model? A training-side check: saved models never import it."""

from __future__ import annotations

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
