"""Configuration of the n-gram MLP language model (lesson 2, Bengio et al. 2003)."""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedConfig


# Copied from hf_models.configuration_gpt.require_positive_int
def require_positive_int(config: Any, field: str) -> None:
    """Raise if ``config.<field>`` is not an integer greater than zero."""
    value = getattr(config, field)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{type(config).__name__}.{field} must be a positive integer, got {value!r}.")


# Copied from hf_models.configuration_gpt.require_probability
def require_probability(config: Any, field: str) -> None:
    """Raise if ``config.<field>`` is not a number in [0, 1) (dropout rates and the like)."""
    value = getattr(config, field)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{type(config).__name__}.{field} must be a number in [0, 1), got {value!r}.")


class NGramMLPConfig(PreTrainedConfig):
    r"""
    A fixed window of the previous tokens, embedded, concatenated and fed through one hidden layer.

    Args:
        vocab_size (`int`, defaults to 2048): Number of tokens.
        context_size (`int`, defaults to 6): How many previous tokens the model sees (n - 1 of the n-gram).
        embedding_dim (`int`, defaults to 64): Size of each token's feature vector (Bengio's `m`).
        hidden_size (`int`, defaults to 512): Width of the tanh hidden layer (Bengio's `h`).
        direct_connection (`bool`, defaults to `False`):
            Add Bengio's optional linear path from the concatenated embeddings straight to the logits.
        dropout (`float`, defaults to 0.0): Dropout on the hidden layer during training.
        max_position_embeddings (`int`, defaults to 1024):
            The longest sequence the model accepts. An n-gram model has no context limit in its math (it only
            ever looks back `context_size` tokens); this is the length it was trained and evaluated at.
        initializer_range (`float`, defaults to 0.02): Standard deviation of the initial weights.
        use_cache (`bool`, defaults to `True`): Whether `forward` returns the token window for `generate()`.
    """

    model_type = "zoo_ngram_mlp"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]

    vocab_size: int = 2048
    context_size: int = 6
    embedding_dim: int = 64
    hidden_size: int = 512
    direct_connection: bool = False
    dropout: float = 0.0
    max_position_embeddings: int = 1024
    initializer_range: float = 0.02
    use_cache: bool = True
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.validate_architecture()

    def validate_architecture(self):
        """Fail on values the model cannot be built with, naming the field (also runs on `from_pretrained`)."""
        for name in ("vocab_size", "context_size", "embedding_dim", "hidden_size", "max_position_embeddings"):
            require_positive_int(self, name)
        require_probability(self, "dropout")


__all__ = ["NGramMLPConfig"]
