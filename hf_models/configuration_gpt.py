"""Configuration of the GPT decoder (lesson 4): GPT-2's architecture."""

from __future__ import annotations

from transformers import PreTrainedConfig

from collections.abc import Iterable
from typing import Any

# The hand-written KV caches of lesson 6 that `generate()` can use by default.
KV_CACHE_TYPES = ("growing", "static")
# GELU variants by transformers' ACT2FN names (the modeling file maps each to its function).
GELU_ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh")


# A config is the contract between a saved checkpoint and the code that rebuilds it, so a wrong value
# fails when the config is built, naming the field, the value and what is allowed, rather than as a
# shape mismatch three modules deep. (transformers' own configs use huggingface_hub's @strict; a
# saved zoo folder imports only the standard library, torch and transformers.)
def require_positive_int(config: Any, field: str) -> None:
    """Raise if ``config.<field>`` is not an integer greater than zero."""
    value = getattr(config, field)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{type(config).__name__}.{field} must be a positive integer, got {value!r}.")


def require_choice(config: Any, field: str, allowed: Iterable[Any]) -> None:
    """Raise if ``config.<field>`` is not one of ``allowed``."""
    value = getattr(config, field)
    allowed = tuple(allowed)
    if value not in allowed:
        raise ValueError(f"{type(config).__name__}.{field} must be one of {list(allowed)}, got {value!r}.")


def require_probability(config: Any, field: str) -> None:
    """Raise if ``config.<field>`` is not a number in [0, 1) (dropout rates and the like)."""
    value = getattr(config, field)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{type(config).__name__}.{field} must be a number in [0, 1), got {value!r}.")


def require_divisible(config: Any, field: str, divisor_field: str, why: str = "") -> None:
    """Raise if ``config.<field>`` is not a multiple of ``config.<divisor_field>``, saying ``why`` it must be."""
    value, divisor = getattr(config, field), getattr(config, divisor_field)
    if value % divisor != 0:
        raise ValueError(f"{type(config).__name__}.{field}={value} must be divisible by {divisor_field}={divisor}{why}.")


class GPTConfig(PreTrainedConfig):
    r"""
    A GPT-2-style decoder: learned positions, pre-LayerNorm, multi-head attention, GELU MLP, tied embeddings.

    Args:
        vocab_size (`int`, defaults to 2048): Number of tokens.
        max_position_embeddings (`int`, defaults to 256): The context length (rows of the position table).
        hidden_size (`int`, defaults to 384): Width of the residual stream.
        num_hidden_layers (`int`, defaults to 6): Number of decoder layers.
        num_attention_heads (`int`, defaults to 6): Attention heads per layer.
        intermediate_size (`int`, *optional*): MLP width; defaults to `4 * hidden_size`, as in GPT-2.
        hidden_act (`str`, defaults to `"gelu_new"`): `"gelu"` (exact) or `"gelu_new"` (GPT-2's tanh approximation).
        bias (`bool`, defaults to `True`):
            Biases in every Linear and LayerNorm, as GPT-2. nanoGPT's `bias=False` is slightly faster and better.
        layer_norm_eps (`float`, defaults to 1e-5): LayerNorm epsilon.
        dropout (`float`, defaults to 0.0): Dropout on embeddings and on each residual branch.
        attention_dropout (`float`, defaults to 0.0): Dropout on the attention weights.
        initializer_range (`float`, defaults to 0.02): Std of the normal init (residual projections get
            `initializer_range / sqrt(2 * num_hidden_layers)`).
        tie_word_embeddings (`bool`, defaults to `True`): Share the token embedding and the LM head.
        kv_cache (`str`, defaults to `"growing"`): The hand-written KV cache `generate()` uses by default,
            `"growing"` or `"static"` (preallocated to `max_position_embeddings`).
        use_cache (`bool`, defaults to `True`): Whether `forward` returns the KV cache (outside training).
        bos_token_id, eos_token_id, pad_token_id (`int`, *optional*): Special token ids, from the tokenizer.
    """

    model_type = "zoo_gpt"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]

    vocab_size: int = 2048
    max_position_embeddings: int = 256
    hidden_size: int = 384
    num_hidden_layers: int = 6
    num_attention_heads: int = 6
    intermediate_size: int | None = None
    hidden_act: str = "gelu_new"
    bias: bool = True
    layer_norm_eps: float = 1e-5
    dropout: float = 0.0
    attention_dropout: float = 0.0
    initializer_range: float = 0.02
    tie_word_embeddings: bool = True
    kv_cache: str = "growing"
    use_cache: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None

    def __post_init__(self, **kwargs):
        if self.intermediate_size is None:
            self.intermediate_size = 4 * self.hidden_size
        super().__post_init__(**kwargs)
        self.validate_architecture()

    def validate_architecture(self):
        """Fail on values the model cannot be built with, naming the field (also runs on `from_pretrained`)."""
        for name in ("vocab_size", "max_position_embeddings", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
            require_positive_int(self, name)
        require_divisible(self, "hidden_size", "num_attention_heads", ": every head gets hidden_size / num_attention_heads features")
        require_choice(self, "hidden_act", GELU_ACTIVATIONS)
        require_choice(self, "kv_cache", KV_CACHE_TYPES)
        require_probability(self, "dropout")
        require_probability(self, "attention_dropout")


__all__ = ["GPTConfig"]
