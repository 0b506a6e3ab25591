"""Configuration of the mixture-of-experts decoder (lesson 10): lesson 5's fields plus Mixtral's routing fields."""

from __future__ import annotations

from transformers import PreTrainedConfig

from collections.abc import Iterable
from typing import Any

# Copied from hf_models.configuration_gpt.KV_CACHE_TYPES
KV_CACHE_TYPES = ("growing", "static")


# Copied from hf_models.configuration_modern.swiglu_intermediate_size
def swiglu_intermediate_size(hidden_size: int) -> int:
    """LLaMA's SwiGLU width: ``8/3 * hidden_size`` rounded up to a multiple of 32.

    SwiGLU has three matrices to the GELU MLP's two, so 8/3 x width keeps the parameters of a 4x MLP.
    """
    return 32 * -(-8 * hidden_size // (3 * 32))


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


# Copied from hf_models.configuration_gpt.require_divisible
def require_divisible(config: Any, field: str, divisor_field: str, why: str = "") -> None:
    """Raise if ``config.<field>`` is not a multiple of ``config.<divisor_field>``, saying ``why`` it must be."""
    value, divisor = getattr(config, field), getattr(config, divisor_field)
    if value % divisor != 0:
        raise ValueError(f"{type(config).__name__}.{field}={value} must be divisible by {divisor_field}={divisor}{why}.")


def require_moe_routing(config: Any) -> None:
    """The mixture-of-experts fields (Mixtral's names): ``1 <= num_experts_per_tok <= num_local_experts``,
    loss coefficients ``>= 0`` and boolean switches."""
    name = type(config).__name__
    require_positive_int(config, "num_local_experts")
    require_positive_int(config, "num_experts_per_tok")
    if config.num_experts_per_tok > config.num_local_experts:
        raise ValueError(
            f"{name}.num_experts_per_tok={config.num_experts_per_tok} must be at most "
            f"num_local_experts={config.num_local_experts}: a token cannot be routed to more experts than there are."
        )
    for field in ("router_aux_loss_coef", "router_z_loss_coef"):
        value = getattr(config, field)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ValueError(f"{name}.{field} must be a number >= 0, got {value!r}.")
    for field in ("output_router_logits", "router_aux_loss_per_layer"):
        if not isinstance(getattr(config, field), bool):
            raise ValueError(f"{name}.{field} must be True or False, got {getattr(config, field)!r}.")


# Copied from hf_models.configuration_modern.HEAD_DIM_FROM_WIDTH
HEAD_DIM_FROM_WIDTH = " (head_dim, when not given, is hidden_size / num_attention_heads); pass head_dim to set it apart"


# Copied from hf_models.configuration_modern.require_even_head_dim
def require_even_head_dim(config: Any, why: str = "for rotary embeddings") -> None:
    """Raise if ``config.head_dim`` is odd (RoPE rotates features in pairs), naming the fields that set it."""
    if config.head_dim % 2:
        if config.head_dim * config.num_attention_heads == config.hidden_size:
            source = (f" = hidden_size {config.hidden_size} / num_attention_heads {config.num_attention_heads}: choose a "
                      f"hidden_size and num_attention_heads whose quotient is even, or pass an even head_dim")
        else:
            source = " (given as head_dim): pass an even head_dim"
        raise ValueError(f"{type(config).__name__}.head_dim must be even {why}, got {config.head_dim}{source}.")


# Copied from hf_models.configuration_modern.LLAMA3_ROPE_KEYS
LLAMA3_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


# Copied from hf_models.configuration_modern.require_rope_frequency_scaling
def require_rope_frequency_scaling(config: Any) -> None:
    """Raise unless ``config.rope_frequency_scaling`` is ``None`` or Llama 3's scaling with every key it needs."""
    scaling, name = config.rope_frequency_scaling, type(config).__name__
    if scaling is None:
        return
    if not isinstance(scaling, dict) or scaling.get("rope_type") != "llama3":
        raise ValueError(
            f"{name}.rope_frequency_scaling must be None (plain RoPE) or a dict with rope_type 'llama3' "
            f"and the keys {list(LLAMA3_ROPE_KEYS)}, got {scaling!r}."
        )
    for key in LLAMA3_ROPE_KEYS:
        value = scaling.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ValueError(f"{name}.rope_frequency_scaling[{key!r}] must be a positive number, got {value!r}.")
    if not scaling["high_freq_factor"] > scaling["low_freq_factor"]:
        raise ValueError(
            f"{name}.rope_frequency_scaling needs high_freq_factor > low_freq_factor (the band between them is blended), "
            f"got {scaling['high_freq_factor']!r} and {scaling['low_freq_factor']!r}."
        )
    if set(scaling) - {"rope_type", *LLAMA3_ROPE_KEYS}:
        raise ValueError(
            f"{name}.rope_frequency_scaling has keys Llama 3's scaling does not read: {sorted(set(scaling) - {'rope_type', *LLAMA3_ROPE_KEYS})}."
        )


class MoEDecoderConfig(PreTrainedConfig):
    r"""
    Lesson 5's modern decoder with a sparse mixture of SwiGLU experts in place of each layer's feed-forward.
    The MoE fields carry transformers' Mixtral names.

    Args:
        vocab_size (`int`, defaults to 2048): Number of tokens.
        max_position_embeddings (`int`, defaults to 256): The context length it is trained for.
        hidden_size (`int`, defaults to 384): Width of the residual stream.
        intermediate_size (`int`, *optional*): Each expert's SwiGLU width; defaults to `8/3 * hidden_size` rounded up
            to a multiple of 32. A token's active feed-forward is `num_experts_per_tok` experts wide.
        num_hidden_layers (`int`, defaults to 6): Number of decoder layers.
        num_attention_heads (`int`, defaults to 6): Query heads per layer.
        num_key_value_heads (`int`, *optional*): Key/value heads: equal to the query heads for multi-head,
            1 for multi-query, in between for grouped-query attention. Defaults to `num_attention_heads // 2`
            when that divides evenly, else `num_attention_heads`.
        head_dim (`int`, *optional*): Per-head size; defaults to `hidden_size // num_attention_heads`.
        rms_norm_eps (`float`, defaults to 1e-6): RMSNorm epsilon.
        rope_theta (`float`, defaults to 10000.0): Base of the rotary frequencies.
        rope_frequency_scaling (`dict`, *optional*): `None` for plain RoPE, or Llama 3's frequency scaling
            (`{"rope_type": "llama3", ...}`, as lesson 5's config; Mixtral's `rope_parameters` may carry it).
        attention_bias (`bool`, defaults to `False`): Biases on the q, k and v projections (Mixtral: no).
        attention_output_bias (`bool`, defaults to `False`): A bias on `o_proj` (Mixtral: no).
        dropout (`float`, defaults to 0.0): Dropout on embeddings and on each residual branch.
        attention_dropout (`float`, defaults to 0.0): Dropout on the attention weights.
        initializer_range (`float`, defaults to 0.02): Std of the normal init.
        tie_word_embeddings (`bool`, defaults to `True`): Share the token embedding and the LM head.
        kv_cache (`str`, defaults to `"growing"`): The hand-written KV cache `generate()` uses by default.
        use_cache (`bool`, defaults to `True`): Whether `forward` returns the KV cache (outside training).
        bos_token_id, eos_token_id, pad_token_id (`int`, *optional*): Special token ids, from the tokenizer.
        num_local_experts (`int`, defaults to 8): Experts per layer, `E`.
        num_experts_per_tok (`int`, defaults to 2): Experts each token is routed to, `k` (1 <= k <= E).
        output_router_logits (`bool`, defaults to `False`): Return every layer's router logits and the
            balancing `aux_loss`, and add `router_aux_loss_coef * aux_loss` to `loss` when labels are given
            (as Mixtral: training with the balancing loss needs this on).
        router_aux_loss_coef (`float`, defaults to 0.01): Weight of the Switch balancing loss (Switch
            Transformer's alpha = 0.01; transformers' Mixtral config defaults to 0.001). 0 turns it off.
        router_aux_loss_per_layer (`bool`, defaults to `False`): Balance each layer's experts separately (Switch
            Transformer) instead of counting every layer's tokens together (transformers' Mixtral, the default, which
            equal conversion needs); see `modeling_moe.load_balancing_loss`.
        router_z_loss_coef (`float`, defaults to 0.0): Weight of ST-MoE's router z-loss (the paper uses
            0.001), added to `loss` when labels are given and `output_router_logits` is on.
    """

    model_type = "zoo_moe"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]
    attribute_map = {"num_experts": "num_local_experts"}  # as Mixtral's config; trl's fused loss reads `num_experts`

    vocab_size: int = 2048
    max_position_embeddings: int = 256
    hidden_size: int = 384
    intermediate_size: int | None = None
    num_hidden_layers: int = 6
    num_attention_heads: int = 6
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_frequency_scaling: dict | None = None
    attention_bias: bool = False
    attention_output_bias: bool = False
    dropout: float = 0.0
    attention_dropout: float = 0.0
    initializer_range: float = 0.02
    tie_word_embeddings: bool = True
    kv_cache: str = "growing"
    use_cache: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    num_local_experts: int = 8
    num_experts_per_tok: int = 2
    output_router_logits: bool = False
    router_aux_loss_coef: float = 0.01
    router_aux_loss_per_layer: bool = False
    router_z_loss_coef: float = 0.0

    # Copied from hf_models.configuration_modern.ModernDecoderConfig.__post_init__
    def __post_init__(self, **kwargs):
        if self.intermediate_size is None and isinstance(self.hidden_size, int):
            self.intermediate_size = swiglu_intermediate_size(self.hidden_size)
        if self.num_key_value_heads is None and isinstance(self.num_attention_heads, int):
            heads = self.num_attention_heads
            self.num_key_value_heads = heads // 2 if heads % 2 == 0 else heads
        if self.head_dim is None and isinstance(self.hidden_size, int) and isinstance(self.num_attention_heads, int) and self.num_attention_heads > 0:
            # A floored quotient would leave hidden_size != heads x head_dim: the Llama export could not take it.
            require_divisible(self, "hidden_size", "num_attention_heads", HEAD_DIM_FROM_WIDTH)
            self.head_dim = self.hidden_size // self.num_attention_heads
        super().__post_init__(**kwargs)
        self.validate_architecture()

    def validate_architecture(self):
        """Fail on values the model cannot be built with, naming the field (also runs on `from_pretrained`)."""
        require_moe_routing(self)
        for name in (
            "vocab_size", "max_position_embeddings", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "head_dim",
        ):
            require_positive_int(self, name)
        require_divisible(self, "num_attention_heads", "num_key_value_heads")
        require_even_head_dim(self)
        require_choice(self, "kv_cache", KV_CACHE_TYPES)
        require_probability(self, "dropout")
        require_probability(self, "attention_dropout")
        require_rope_frequency_scaling(self)
        for name in ("attention_bias", "attention_output_bias"):
            require_choice(self, name, (False, True))


__all__ = ["MoEDecoderConfig"]
