"""Configuration of the GRU language model (lesson 3)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from transformers import PreTrainedConfig

# The GRU's two code paths: the hand-written loop ("eager") and torch's fused kernel ("torch").
GRU_IMPLEMENTATIONS = ("eager", "torch")


# Copied from hf_models.configuration_gpt.require_positive_int
def require_positive_int(config: Any, field: str) -> None:
    """Raise if ``config.<field>`` is not an integer greater than zero."""
    value = getattr(config, field)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{type(config).__name__}.{field} must be a positive integer, got {value!r}.")


# Copied from hf_models.configuration_gpt.require_choice
def require_choice(config: Any, field: str, allowed: Iterable[Any]) -> None:
    """Raise if ``config.<field>`` is not one of ``allowed``."""
    value = getattr(config, field)
    allowed = tuple(allowed)
    if value not in allowed:
        raise ValueError(f"{type(config).__name__}.{field} must be one of {list(allowed)}, got {value!r}.")


# Copied from hf_models.configuration_gpt.require_probability
def require_probability(config: Any, field: str) -> None:
    """Raise if ``config.<field>`` is not a number in [0, 1) (dropout rates and the like)."""
    value = getattr(config, field)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{type(config).__name__}.{field} must be a number in [0, 1), got {value!r}.")


class GRULMConfig(PreTrainedConfig):
    r"""
    A stack of GRU layers between a token embedding and a (tied) output projection.

    Args:
        vocab_size (`int`, defaults to 2048): Number of tokens.
        hidden_size (`int`, defaults to 384): Width of the embeddings and of every GRU state.
        num_hidden_layers (`int`, defaults to 2): Number of stacked GRU layers.
        dropout (`float`, defaults to 0.0): Dropout between layers during training.
        gru_implementation (`str`, defaults to `"torch"`):
            `"eager"` runs the hand-written loop of `gru.GRULayer`; `"torch"` runs the same weights through
            the fused `torch.gru` kernel that `torch.nn.GRU` uses. They give the same outputs.
        max_position_embeddings (`int`, defaults to 1024):
            The longest sequence the model accepts. A recurrent net has no context limit in its math; this is
            the length it was trained and evaluated at. Raise it freely.
        initializer_range (`float`, defaults to 0.1):
            Standard deviation of the embedding (and untied output) init. Larger than a transformer's 0.02
            (PyTorch's word-language-model example uses U(-0.1, 0.1)): the embedding is the GRU's input, and
            its gates see `W x` with `W ~ U(-1/sqrt(H), 1/sqrt(H))`, so 0.02-sized inputs barely move them
            and the first hundreds of steps are spent growing the embedding.
        tie_word_embeddings (`bool`, defaults to `True`): Share the embedding and output matrices.
        use_cache (`bool`, defaults to `True`): Whether `forward` returns the recurrent state for `generate()`.
    """

    model_type = "zoo_gru"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]

    vocab_size: int = 2048
    hidden_size: int = 384
    num_hidden_layers: int = 2
    dropout: float = 0.0
    gru_implementation: str = "torch"
    max_position_embeddings: int = 1024
    initializer_range: float = 0.1
    tie_word_embeddings: bool = True
    use_cache: bool = True

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.validate_architecture()

    def validate_architecture(self):
        """Fail on values the model cannot be built with, naming the field (also runs on `from_pretrained`)."""
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "max_position_embeddings"):
            require_positive_int(self, name)
        require_probability(self, "dropout")
        require_choice(self, "gru_implementation", GRU_IMPLEMENTATIONS)


__all__ = ["GRULMConfig"]
