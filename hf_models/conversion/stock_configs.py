"""Which stock transformers configs the zoo computes exactly, field by field, and the zoo config for each.

A stock checkpoint (GPT-2, Llama, Qwen2, Mixtral) loads into the zoo's own decoder only where the
zoo computes *the same function* as transformers' own class on the same weights. Each family's
config class was walked field by field; every field has one of three fates, written down in
:data:`FIELD_HANDLING` (a test fails when transformers adds a field that is not there):

* **mapped**: carried into the zoo config (sizes, eps, biases, rotary base, Llama 3's scaling, ...);
* **checked**: the zoo implements one value (GPT-2's plain attention scaling, SiLU, no sliding
  window, ...); any other value is refused, naming the field, the value and what is implemented;
* **ignored**: the field does not change what the transformers causal LM computes (a runtime
  default such as ``use_cache``, the heads of ``GPT2DoubleHeadsModel``, Llama's ``pretraining_tp``,
  which transformers 5 no longer reads).

Nothing is silently approximated: a config either maps exactly or the error lists every field
that would have to change. The weight copies live beside each converter (``gpt2.py``, ``llama.py``,
``mixtral.py``); ``stock.py`` loads a folder or Hub id through them.
"""

from __future__ import annotations

from typing import Any

from ..configuration_gpt import GELU_ACTIVATIONS, GPTConfig
from ..configuration_modern import LLAMA3_ROPE_KEYS, ModernDecoderConfig
from ..configuration_moe import MoEDecoderConfig

STOCK_MODEL_TYPES = ("gpt2", "llama", "qwen2", "mixtral")

_SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
          "max_position_embeddings", "rms_norm_eps", "initializer_range", "tie_word_embeddings", "bos_token_id", "eos_token_id",
          "pad_token_id")
_RUNTIME = "a runtime default (whether forward returns the KV cache), not the function computed"

# family -> {config field -> what the loader does with it}. Every field of the transformers config class is here.
FIELD_HANDLING: dict[str, dict[str, str]] = {
    "gpt2": {
        **{name: "mapped" for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "layer_norm_epsilon",
                                       "initializer_range", "bos_token_id", "eos_token_id", "pad_token_id", "tie_word_embeddings")},
        "n_inner": "mapped (None: 4 x n_embd)",
        "activation_function": f"checked: one of {list(GELU_ACTIVATIONS)}",
        "resid_pdrop": "mapped to dropout (residual branches)",
        "embd_pdrop": "checked: must equal resid_pdrop (the zoo GPT has one dropout rate for embeddings and residuals)",
        "attn_pdrop": "mapped to attention_dropout",
        "scale_attn_weights": "checked: True (scores divided by sqrt(head_dim))",
        "scale_attn_by_inverse_layer_idx": "checked: False",
        "reorder_and_upcast_attn": "checked: False",
        "add_cross_attention": "checked: False (a decoder-only model has no encoder to attend to)",
        "use_cache": f"ignored: {_RUNTIME}",
        **{name: "ignored: read only by GPT2DoubleHeadsModel's classification head" for name in (
            "summary_type", "summary_use_proj", "summary_activation", "summary_proj_to_labels", "summary_first_dropout")},
    },
    "llama": {
        **{name: "mapped" for name in _SIZES},
        "head_dim": "mapped (None: hidden_size / num_attention_heads)",
        "hidden_act": "checked: silu",
        "rope_parameters": "mapped: rope_theta; rope_type 'default' or 'llama3' (others refused)",
        "attention_bias": "mapped to attention_bias and attention_output_bias (LLaMA's covers q, k, v and o)",
        "mlp_bias": "mapped",
        "attention_dropout": "mapped",
        "pretraining_tp": "ignored: transformers 5's LlamaForCausalLM does not read it (the slices of Meta's tensor-parallel "
                          "pretraining add up to the same matmul)",
        "use_cache": f"ignored: {_RUNTIME}",
    },
    "qwen2": {
        **{name: "mapped" for name in _SIZES},
        "hidden_act": "checked: silu",
        "rope_parameters": "mapped: rope_theta; rope_type 'default' or 'llama3' (others refused)",
        "attention_dropout": "mapped",
        "layer_types": "checked: every layer 'full_attention'",
        "use_sliding_window": "checked through layer_types: a sliding layer is refused",
        "sliding_window": "checked through layer_types (read only by sliding layers)",
        "max_window_layers": "checked through layer_types (read only to build it)",
        "use_cache": f"ignored: {_RUNTIME}",
    },
    "mixtral": {
        **{name: "mapped" for name in _SIZES},
        "head_dim": "mapped (None: hidden_size / num_attention_heads)",
        "hidden_act": "checked: silu",
        "rope_parameters": "mapped: rope_theta; rope_type 'default' or 'llama3' (others refused)",
        "attention_dropout": "mapped",
        "num_local_experts": "mapped",
        "num_experts_per_tok": "mapped",
        "output_router_logits": "mapped",
        "router_aux_loss_coef": "mapped",
        "sliding_window": "checked: None",
        "router_jitter_noise": "checked: 0 (training multiplies router inputs by noise; the zoo router has none)",
        "use_cache": f"ignored: {_RUNTIME}",
    },
}


def refuse(model_type: str, problems: list[str]) -> None:
    """Raise one ValueError listing every field that keeps a ``model_type`` config from loading exactly."""
    if problems:
        raise ValueError(
            f"This {model_type} checkpoint's config has what the zoo's decoder does not compute exactly, so it is refused "
            f"rather than approximated: " + "; ".join(problems) + "."
        )


def _check(problems: list[str], field: str, value: Any, allowed: Any, what: str) -> None:
    if value != allowed:
        problems.append(f"{field}={value!r} ({what}; the zoo implements {field}={allowed!r})")


def rope_fields(config: Any, problems: list[str]) -> dict:
    """``rope_theta`` and ``rope_frequency_scaling`` from transformers' standardized ``config.rope_parameters``."""
    rope = dict(config.rope_parameters or {})
    rope_type = rope.get("rope_type")
    if rope_type not in ("default", "llama3"):
        problems.append(f"rope_parameters.rope_type={rope_type!r} (implemented: 'default' and 'llama3'; "
                        f"rope_parameters={rope!r})")
        return {}
    factor = rope.get("partial_rotary_factor", 1.0)
    if factor != 1.0:
        problems.append(f"rope_parameters.partial_rotary_factor={factor!r} (rotary on part of each head; the zoo rotates all of it, 1.0)")
    fields = {"rope_theta": float(rope["rope_theta"])}
    if rope_type == "llama3":
        fields["rope_frequency_scaling"] = {"rope_type": "llama3", **{key: rope[key] for key in LLAMA3_ROPE_KEYS}}
    return fields


def _sizes(config: Any) -> dict:
    fields = {name: getattr(config, name) for name in _SIZES}
    # Qwen2's config class has no head_dim field, but its model reads one from config.json when there is one.
    fields["head_dim"] = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    fields["attention_dropout"] = float(config.attention_dropout or 0.0)
    return fields


def gpt_config_from_gpt2(config: Any) -> GPTConfig:
    """The zoo ``GPTConfig`` of a ``GPT2Config``, or a ValueError naming every field it cannot take."""
    problems: list[str] = []
    if config.activation_function not in GELU_ACTIVATIONS:
        problems.append(f"activation_function={config.activation_function!r} (the zoo GPT implements {list(GELU_ACTIVATIONS)})")
    _check(problems, "embd_pdrop", config.embd_pdrop, config.resid_pdrop, "one dropout rate serves embeddings and residuals")
    _check(problems, "scale_attn_weights", config.scale_attn_weights, True, "attention scores divided by sqrt(head_dim)")
    _check(problems, "scale_attn_by_inverse_layer_idx", config.scale_attn_by_inverse_layer_idx, False, "scores also divided by layer index + 1")
    _check(problems, "reorder_and_upcast_attn", config.reorder_and_upcast_attn, False, "keys scaled before the product, scores upcast to float32 in eager attention")
    _check(problems, "add_cross_attention", config.add_cross_attention, False, "cross-attention blocks for an encoder")
    refuse("gpt2", problems)
    return GPTConfig(
        vocab_size=config.vocab_size, max_position_embeddings=config.n_positions, hidden_size=config.n_embd,
        num_hidden_layers=config.n_layer, num_attention_heads=config.n_head, intermediate_size=config.n_inner or 4 * config.n_embd,
        hidden_act=config.activation_function, bias=True, layer_norm_eps=config.layer_norm_epsilon, dropout=float(config.resid_pdrop),
        attention_dropout=float(config.attn_pdrop), initializer_range=config.initializer_range,
        tie_word_embeddings=config.tie_word_embeddings, bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
    )


def modern_config_from_stock(config: Any) -> ModernDecoderConfig:
    """The zoo ``ModernDecoderConfig`` of a ``LlamaConfig`` or ``Qwen2Config``, or a ValueError naming every field it cannot take."""
    model_type, problems = config.model_type, []
    _check(problems, "hidden_act", config.hidden_act, "silu", "the SwiGLU gate's activation")
    rope = rope_fields(config, problems)
    if model_type == "qwen2":
        # Qwen2 always has q/k/v biases and no o_proj or MLP bias (hard-coded in Qwen2Attention / Qwen2MLP).
        biases = dict(attention_bias=True, attention_output_bias=False, mlp_bias=False)
        sliding = [i for i, kind in enumerate(config.layer_types) if kind != "full_attention"]
        if sliding:
            problems.append(
                f"layer_types has {[config.layer_types[i] for i in sliding][:1]} at layers {sliding} (use_sliding_window="
                f"{config.use_sliding_window!r}, sliding_window={config.sliding_window!r}, max_window_layers="
                f"{config.max_window_layers!r}; the zoo implements full causal attention in every layer, "
                f"use_sliding_window=False)"
            )
    elif model_type == "llama":
        biases = dict(attention_bias=config.attention_bias, attention_output_bias=config.attention_bias, mlp_bias=config.mlp_bias)
    else:
        raise ValueError(f"modern_config_from_stock takes a llama or qwen2 config, got model_type {model_type!r}.")
    refuse(model_type, problems)
    return ModernDecoderConfig(**_sizes(config), **rope, **biases)


def moe_config_from_mixtral(config: Any) -> MoEDecoderConfig:
    """The zoo ``MoEDecoderConfig`` of a ``MixtralConfig``, or a ValueError naming every field it cannot take."""
    problems: list[str] = []
    _check(problems, "hidden_act", config.hidden_act, "silu", "the experts' SwiGLU gate activation")
    _check(problems, "sliding_window", config.sliding_window, None, "attention limited to the last tokens")
    _check(problems, "router_jitter_noise", config.router_jitter_noise, 0.0, "multiplicative noise on the router's input in training")
    rope = rope_fields(config, problems)
    refuse("mixtral", problems)
    experts = {name: getattr(config, name) for name in ("num_local_experts", "num_experts_per_tok", "output_router_logits", "router_aux_loss_coef")}
    return MoEDecoderConfig(**_sizes(config), **rope, **experts)


__all__ = ["FIELD_HANDLING", "STOCK_MODEL_TYPES", "gpt_config_from_gpt2", "modern_config_from_stock", "moe_config_from_mixtral", "rope_fields"]
