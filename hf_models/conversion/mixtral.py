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

transformers fuses the experts so that a grouped-GEMM kernel can take all of them in one call; the
zoo keeps them apart so peft and bitsandbytes see ordinary ``nn.Linear`` layers (``moe.py``).
"""

from __future__ import annotations

import re

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
_ZOO_EXPERT = re.compile(r"(.*\.mlp\.)experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight")


def moe_to_mixtral_state_dict(state: dict[str, torch.Tensor], num_experts: int) -> dict[str, torch.Tensor]:
    """The zoo's weights renamed and stacked into Mixtral's fused layout (see the module docstring)."""
    out, experts = {}, {}
    for key, tensor in state.items():
        match = _ZOO_EXPERT.fullmatch(key)
        if match:
            prefix, e, name = match.groups()
            experts.setdefault(prefix, {}).setdefault(name, [None] * num_experts)[int(e)] = tensor
        else:
            out[key.replace(".mlp.router.weight", ".mlp.gate.weight")] = tensor
    for prefix, mats in experts.items():
        gate_up = [torch.cat([g, u]) for g, u in zip(mats["gate_proj"], mats["up_proj"])]  # E x (2I, C)
        out[prefix + "experts.gate_up_proj"] = torch.stack(gate_up)  # (E, 2I, C)
        out[prefix + "experts.down_proj"] = torch.stack(mats["down_proj"])  # (E, C, I)
    return out


def mixtral_to_moe_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Mixtral's weights split back into one matrix per expert and projection, with the zoo's names."""
    out = {}
    for key, tensor in state.items():
        if key.endswith(".mlp.experts.gate_up_proj"):
            prefix = key[: -len("gate_up_proj")]
            for e, fused in enumerate(tensor):  # (2I, C) per expert
                gate, up = fused.chunk(2, dim=0)  # (I, C) each, gate first as in MixtralExperts.forward
                out[f"{prefix}{e}.gate_proj.weight"] = gate
                out[f"{prefix}{e}.up_proj.weight"] = up
        elif key.endswith(".mlp.experts.down_proj"):
            prefix = key[: -len("down_proj")]
            for e, down in enumerate(tensor):  # (C, I) per expert
                out[f"{prefix}{e}.down_proj.weight"] = down
        else:
            out[key.replace(".mlp.gate.weight", ".mlp.router.weight")] = tensor
    return out


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
    _load(target, moe_to_mixtral_state_dict(model.state_dict(), c.num_local_experts))
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
