"""MoE decoder <-> ``transformers.MixtralForCausalLM``.

Attention, norms and embeddings carry LLaMA's names in both models and map one to one. The
feed-forward differs in layout, not in function:

==========================================  ==================================================
zoo (one ``nn.Linear`` per expert matrix)    transformers 5 Mixtral (experts fused in 3-D tensors)
==========================================  ==================================================
``mlp.router.weight`` (E, C)                 ``mlp.gate.weight`` (E, C)
``mlp.experts.<e>.gate_proj.weight`` (I, C)  ``mlp.experts.gate_up_proj[e, :I]``  of (E, 2I, C)
``mlp.experts.<e>.up_proj.weight`` (I, C)    ``mlp.experts.gate_up_proj[e, I:]``
``mlp.experts.<e>.down_proj.weight`` (C, I)  ``mlp.experts.down_proj[e]``         of (E, C, I)
==========================================  ==================================================

The balancing loss is Mixtral's in both, except for a zoo model with ``router_aux_loss_per_layer``
(Switch's per-layer form), which Mixtral has no field for: its conversion computes the same
logits, and Mixtral's own (all layers counted together) balancing loss if trained further.
"""

from __future__ import annotations

import torch
from transformers import MixtralConfig, MixtralForCausalLM

from ..modeling_moe import MoEDecoderForCausalLM
from .stock_configs import moe_config_from_mixtral

# Config fields spelled the same in both models.
SHARED_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "head_dim", "max_position_embeddings", "rms_norm_eps", "initializer_range", "tie_word_embeddings",
    "num_local_experts", "num_experts_per_tok", "output_router_logits", "router_aux_loss_coef",
    "bos_token_id", "eos_token_id", "pad_token_id",
)


def moe_to_mixtral_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The zoo's weights with Mixtral's names: the experts share Mixtral's fused layout, only the router is renamed."""
    return {key.replace(".mlp.router.weight", ".mlp.gate.weight"): tensor for key, tensor in state.items()}


def mixtral_to_moe_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Mixtral's weights with the zoo's names (the inverse rename of :func:`moe_to_mixtral_state_dict`)."""
    return {key.replace(".mlp.gate.weight", ".mlp.router.weight"): tensor for key, tensor in state.items()}


def _load(target: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load ``state`` into ``target``; only the tied LM head may be missing, and nothing may be left over."""
    missing, unexpected = target.load_state_dict({k: v.contiguous() for k, v in state.items()}, strict=False)
    if unexpected or set(missing) - {"lm_head.weight"} or (missing and not target.config.tie_word_embeddings):
        raise RuntimeError(f"state dicts do not map one to one: missing={missing}, unexpected={unexpected}")
    if target.config.tie_word_embeddings:
        target.tie_weights()


@torch.no_grad()
def moe_to_mixtral(model: MoEDecoderForCausalLM) -> MixtralForCausalLM:
    """A ``MixtralForCausalLM`` computing the same function as ``model`` (logits, router logits, aux loss)."""
    c = model.config
    if c.attention_bias or c.attention_output_bias:
        raise ValueError(
            f"MixtralForCausalLM has no attention biases; this model has attention_bias={c.attention_bias}, "
            f"attention_output_bias={c.attention_output_bias}."
        )
    config = MixtralConfig(
        **{name: getattr(c, name) for name in SHARED_FIELDS},
        rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta, **(c.rope_frequency_scaling or {})},
        hidden_act="silu",
        attention_dropout=c.attention_dropout,
        sliding_window=None,
        router_jitter_noise=0.0,
    )
    target = MixtralForCausalLM(config).to(model.dtype).eval()
    target.config._attn_implementation = c._attn_implementation
    _load(target, moe_to_mixtral_state_dict(model.state_dict()))
    return target


@torch.no_grad()
def mixtral_to_moe(model: MixtralForCausalLM) -> MoEDecoderForCausalLM:
    """A zoo ``MoEDecoderForCausalLM`` computing the same function as a ``MixtralForCausalLM``.

    The config is translated by :func:`~.stock_configs.moe_config_from_mixtral`, which refuses, by
    name, every field value the MoE decoder does not compute exactly.
    """
    config = moe_config_from_mixtral(model.config)
    target = MoEDecoderForCausalLM(config).to(model.dtype).eval()
    target.config._attn_implementation = model.config._attn_implementation
    _load(target, mixtral_to_moe_state_dict(model.state_dict()))
    return target


__all__ = ["mixtral_to_moe", "mixtral_to_moe_state_dict", "moe_to_mixtral", "moe_to_mixtral_state_dict"]
