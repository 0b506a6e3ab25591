"""Configuration of the configurable decoder (lesson 12): every architectural choice of lessons 4-10 is a field."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from transformers import PreTrainedConfig

# Copied from hf_models.configuration_gpt.KV_CACHE_TYPES
KV_CACHE_TYPES = ("growing", "static")
# Copied from hf_models.configuration_gpt.GELU_ACTIVATIONS
GELU_ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh")
NORM_TYPES = ("layernorm", "rmsnorm")
# "none" is NoPE (Haviv et al. 2022; Kazemnejad et al. 2023): a causal decoder can infer positions
# without being told, since token t attends to exactly t + 1 keys.
POSITION_TYPES = ("learned", "rope", "none")
FEED_FORWARD_TYPES = ("gelu", "swiglu", "moe")

# Each preset is the field values that make this config build the dedicated model of a lesson,
# module for module (see `ConfigurableDecoderConfig.preset` and hf_models.conversion.configurable).
PRESETS: dict[str, dict[str, Any]] = {
    # Lesson 4, GPT-2: LayerNorm, learned positions, multi-head attention with one fused q/k/v matmul,
    # GELU MLP, biases everywhere.
    "gpt": dict(
        norm="layernorm", norm_eps=1e-5, qk_norm=False, positions="learned", feed_forward="gelu", fused_qkv=True, bias=True,
        scale_residual_init=True,
    ),
    # Lesson 5, LLaMA: RMSNorm, rotary positions, grouped-query attention, SwiGLU, no biases.
    "modern": dict(
        norm="rmsnorm", norm_eps=1e-6, qk_norm=False, positions="rope", feed_forward="swiglu", fused_qkv=False, bias=False,
        scale_residual_init=False,
    ),
    # Lesson 10, Mixtral: the modern decoder with a routed mixture of SwiGLU experts.
    "moe": dict(
        norm="rmsnorm", norm_eps=1e-6, qk_norm=False, positions="rope", feed_forward="moe", fused_qkv=False, bias=False,
        scale_residual_init=False,
    ),
}


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


# Copied from hf_models.configuration_moe.require_moe_routing
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


def default_intermediate_size(hidden_size: int, feed_forward: str) -> int:
    """GPT-2's 4x for a GELU MLP; LLaMA's 8/3x (rounded up to a multiple of 32) for SwiGLU and its experts."""
    return 4 * hidden_size if feed_forward == "gelu" else swiglu_intermediate_size(hidden_size)


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


class ConfigurableDecoderConfig(PreTrainedConfig):
    r"""
    The decoder with every block of lessons 4-10 as a switch, for controlled experiments (lesson 12).

    The defaults are GPT-2's (lesson 4); `ConfigurableDecoderConfig.preset("modern")` and `preset("moe")`
    give lessons 5 and 10. Each preset builds the same modules, under the same names, as the dedicated
    model, so weights move between them unchanged (`hf_models.conversion.configurable`).

    Args:
        vocab_size (`int`, defaults to 2048): Number of tokens.
        max_position_embeddings (`int`, defaults to 256): The context length.
        hidden_size (`int`, defaults to 384): Width of the residual stream.
        num_hidden_layers (`int`, defaults to 6): Number of decoder layers.
        num_attention_heads (`int`, defaults to 6): Query heads per layer.
        num_key_value_heads (`int`, *optional*): Key/value heads: equal to `num_attention_heads` for multi-head
            attention (the default), 1 for multi-query, a divisor in between for grouped-query attention.
        head_dim (`int`, *optional*): Per-head width; defaults to `hidden_size // num_attention_heads`.
        intermediate_size (`int`, *optional*): Feed-forward width (each expert's, for `"moe"`); defaults to
            4x for `"gelu"` and 8/3x rounded up to a multiple of 32 for `"swiglu"` and `"moe"`.
        norm (`str`, defaults to `"layernorm"`): `"layernorm"` or `"rmsnorm"`, always pre-norm.
        norm_eps (`float`, defaults to 1e-5): The norms' epsilon.
        qk_norm (`bool`, defaults to `False`): Normalise each query and key head (with `norm`'s type) before
            attention, as OLMo 2 and Qwen3.
        positions (`str`, defaults to `"learned"`): `"learned"` (a table added to the embeddings), `"rope"`
            (rotary, applied to q and k) or `"none"` (NoPE: causal attention alone tells order).
        rope_theta (`float`, defaults to 10000.0): Rotary base, for `positions="rope"`.
        feed_forward (`str`, defaults to `"gelu"`): `"gelu"` (GPT-2's MLP), `"swiglu"` or `"moe"` (a routed
            mixture of SwiGLU experts).
        hidden_act (`str`, defaults to `"gelu_new"`): For `"gelu"`: `"gelu"` (exact) or `"gelu_new"` (tanh).
        num_local_experts (`int`, defaults to 8): Experts per layer, for `"moe"`.
        num_experts_per_tok (`int`, defaults to 2): Experts per token (top-k), for `"moe"`.
        output_router_logits (`bool`, defaults to `False`): For `"moe"`: return router logits and the balancing
            `aux_loss`, and add it to `loss` (as Mixtral).
        router_aux_loss_coef (`float`, *optional*): Weight of the balancing loss: 0.01 for `"moe"` (as lesson 10's
            `MoEDecoderConfig`), 0 otherwise, where setting it is an error (trl's trainers read a non-zero
            coefficient as "this is an MoE" and ask for router logits a dense model has not got).
        router_aux_loss_per_layer (`bool`, defaults to `False`), router_z_loss_coef (`float`, defaults to 0.0): The
            other MoE losses, as in `MoEDecoderConfig`.
        fused_qkv (`bool`, defaults to `True`): One q/k/v projection (GPT-2's `c_attn`) or three (LLaMA's).
        bias (`bool`, defaults to `True`): Biases in every Linear and LayerNorm (GPT-2) or none (LLaMA).
        scale_residual_init (`bool`, defaults to `True`): GPT-2's init of the projections that write into the
            residual stream (`o_proj`, `down_proj`) at `initializer_range / sqrt(2 * num_hidden_layers)` (LLaMA: off).
        dropout (`float`, defaults to 0.0): Dropout on embeddings and each residual branch.
        attention_dropout (`float`, defaults to 0.0): Dropout on the attention weights.
        initializer_range (`float`, defaults to 0.02): Std of the normal init.
        tie_word_embeddings (`bool`, defaults to `True`): Share the token embedding and the LM head.
        kv_cache (`str`, defaults to `"growing"`): The hand-written KV cache `generate()` uses by default.
        use_cache (`bool`, defaults to `True`): Whether `forward` returns the KV cache (outside training).
        bos_token_id, eos_token_id, pad_token_id (`int`, *optional*): Special token ids, from the tokenizer.
    """

    model_type = "zoo_configurable"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]
    attribute_map = {"num_experts": "num_local_experts"}  # as Mixtral's config; trl's fused loss reads `num_experts`

    vocab_size: int = 2048
    max_position_embeddings: int = 256
    hidden_size: int = 384
    num_hidden_layers: int = 6
    num_attention_heads: int = 6
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    intermediate_size: int | None = None
    norm: str = "layernorm"
    norm_eps: float = 1e-5
    qk_norm: bool = False
    positions: str = "learned"
    rope_theta: float = 10000.0
    feed_forward: str = "gelu"
    hidden_act: str = "gelu_new"
    num_local_experts: int = 8
    num_experts_per_tok: int = 2
    output_router_logits: bool = False
    router_aux_loss_coef: float | None = None
    router_aux_loss_per_layer: bool = False
    router_z_loss_coef: float = 0.0
    fused_qkv: bool = True
    bias: bool = True
    scale_residual_init: bool = True
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
        heads = self.num_attention_heads
        if self.num_key_value_heads is None:
            self.num_key_value_heads = heads
        if self.head_dim is None and isinstance(self.hidden_size, int) and isinstance(heads, int) and heads > 0:
            require_divisible(self, "hidden_size", "num_attention_heads", HEAD_DIM_FROM_WIDTH)
            self.head_dim = self.hidden_size // heads
        if self.router_aux_loss_coef is None:
            self.router_aux_loss_coef = 0.01 if self.feed_forward == "moe" else 0.0
        if self.intermediate_size is None and isinstance(self.hidden_size, int):
            self.intermediate_size = default_intermediate_size(self.hidden_size, self.feed_forward)
        super().__post_init__(**kwargs)
        self.validate_architecture()

    @classmethod
    def preset(cls, name: str, **fields) -> ConfigurableDecoderConfig:
        """The config that builds lesson 4's GPT (``"gpt"``), lesson 5's modern decoder or lesson 10's MoE, plus ``fields``."""
        if name not in PRESETS:
            raise ValueError(f"ConfigurableDecoderConfig.preset name must be one of {sorted(PRESETS)}, got {name!r}.")
        return cls(**{**PRESETS[name], **fields})

    @property
    def attention_type(self) -> str:
        """``"multi-head"``, ``"grouped-query"`` or ``"multi-query"``, read off the key/value heads."""
        if self.num_key_value_heads == self.num_attention_heads:
            return "multi-head"
        return "multi-query" if self.num_key_value_heads == 1 else "grouped-query"

    def validate_architecture(self):
        """Fail on values the model cannot be built with, naming the field (also runs on `from_pretrained`)."""
        for name in (
            "vocab_size", "max_position_embeddings", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "head_dim",
        ):
            require_positive_int(self, name)
        require_divisible(self, "num_attention_heads", "num_key_value_heads")
        require_choice(self, "norm", NORM_TYPES)
        require_choice(self, "positions", POSITION_TYPES)
        require_choice(self, "feed_forward", FEED_FORWARD_TYPES)
        require_choice(self, "hidden_act", GELU_ACTIVATIONS)
        require_choice(self, "kv_cache", KV_CACHE_TYPES)
        for name in ("qk_norm", "fused_qkv", "bias", "scale_residual_init"):
            require_choice(self, name, (True, False))
        require_probability(self, "dropout")
        require_probability(self, "attention_dropout")
        if self.positions == "rope":
            require_even_head_dim(self, "for positions='rope'")
        require_moe_routing(self)
        for name in ("router_aux_loss_coef", "router_z_loss_coef"):
            value = getattr(self, name)
            if value and self.feed_forward != "moe":
                raise ValueError(
                    f"ConfigurableDecoderConfig.{name}={value!r} applies only to feed_forward='moe' (there is no router to "
                    f"balance); with feed_forward={self.feed_forward!r} it must be 0."
                )


__all__ = ["FEED_FORWARD_TYPES", "NORM_TYPES", "PRESETS", "ConfigurableDecoderConfig"]
