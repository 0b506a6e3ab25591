"""Configuration of the bigram language model (lesson 1)."""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedConfig


# Copied from hf_models.configuration_gpt.require_positive_int
def require_positive_int(config: Any, field: str) -> None:
    """Raise if ``config.<field>`` is not an integer greater than zero."""
    value = getattr(config, field)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{type(config).__name__}.{field} must be a positive integer, got {value!r}.")


class BigramConfig(PreTrainedConfig):
    r"""
    The smallest language model there is: the next token depends only on the current one.

    Args:
        vocab_size (`int`, defaults to 96):
            Number of tokens; the model is a `vocab_size x vocab_size` table of logits.
        max_position_embeddings (`int`, defaults to 1024):
            The longest sequence (prompt plus generated tokens) the model accepts. A bigram table has no
            context limit in its math; this is the length it was trained and evaluated at, kept so every
            model in the zoo answers the same question. Raise it freely.
        initializer_range (`float`, defaults to 0.0):
            Standard deviation of the initial logits. 0 starts from the uniform distribution, which is
            exactly where counting starts too.
        use_cache (`bool`, defaults to `True`):
            Whether `forward` returns a cache for `generate()` to pass back.
    """

    model_type = "zoo_bigram"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]

    vocab_size: int = 96
    max_position_embeddings: int = 1024
    initializer_range: float = 0.0
    tie_word_embeddings: bool = False
    use_cache: bool = True

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.validate_architecture()

    def validate_architecture(self):
        """Fail on values the model cannot be built with, naming the field (also runs on `from_pretrained`)."""
        require_positive_int(self, "vocab_size")
        require_positive_int(self, "max_position_embeddings")


__all__ = ["BigramConfig"]
