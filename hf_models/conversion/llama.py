"""Modern decoder <-> ``transformers.LlamaForCausalLM`` (and ``Qwen2ForCausalLM`` into the zoo).

The zoo's modern decoder uses LLaMA's module names and the same rotate-half rotary layout, so
the state dicts map one to one; only the configs differ in spelling. Qwen2 is the same decoder with
biases on q, k and v, which the modern decoder has as ``attention_bias``; its weights carry the
same names too. (A checkpoint in Meta's original interleaved layout would first need
``hf_models.conversion.rotary_layout.permute_for_rotate_half`` on its q and k weights, exactly as
transformers' own conversion script does.)
"""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel

from ..configuration_modern import ModernDecoderConfig
from ..modeling_modern import ModernDecoderForCausalLM
from .stock_configs import modern_config_from_stock


def _llama_config(c: ModernDecoderConfig) -> LlamaConfig:
    """The ``LlamaConfig`` of a modern config, or a ValueError for what LLaMA's config cannot say."""
    if c.attention_bias != c.attention_output_bias:
        raise ValueError(
            f"LlamaForCausalLM's attention_bias covers q, k, v and o together; this model has attention_bias="
            f"{c.attention_bias} and attention_output_bias={c.attention_output_bias} (Qwen2's layout), which it cannot express."
        )
    rope = {"rope_type": "default", "rope_theta": c.rope_theta, **(c.rope_frequency_scaling or {})}
    return LlamaConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads,
        head_dim=c.head_dim,
        max_position_embeddings=c.max_position_embeddings,
        rms_norm_eps=c.rms_norm_eps,
        rope_parameters=rope,
        hidden_act="silu",
        attention_bias=c.attention_bias,
        mlp_bias=c.mlp_bias,
        attention_dropout=c.attention_dropout,
        initializer_range=c.initializer_range,
        tie_word_embeddings=c.tie_word_embeddings,
        bos_token_id=c.bos_token_id,
        eos_token_id=c.eos_token_id,
        pad_token_id=c.pad_token_id,
    )


def _load_one_to_one(target: PreTrainedModel, state: dict[str, torch.Tensor]) -> None:
    missing, unexpected = target.load_state_dict(state, strict=False)
    # Only the tied head may be absent, and nothing may be left over.
    if unexpected or set(missing) - {"lm_head.weight"} or (missing and not target.config.tie_word_embeddings):
        raise RuntimeError(f"state dicts do not map one to one: missing={missing}, unexpected={unexpected}")
    if target.config.tie_word_embeddings:
        target.tie_weights()


@torch.no_grad()
def modern_to_llama(model: ModernDecoderForCausalLM) -> LlamaForCausalLM:
    """A ``LlamaForCausalLM`` computing the same function as ``model``."""
    target = LlamaForCausalLM(_llama_config(model.config)).to(model.dtype).eval()
    target.config._attn_implementation = model.config._attn_implementation
    _load_one_to_one(target, model.state_dict())
    return target


@torch.no_grad()
def llama_to_modern(model: PreTrainedModel) -> ModernDecoderForCausalLM:
    """A zoo ``ModernDecoderForCausalLM`` computing the same function as a ``LlamaForCausalLM`` or ``Qwen2ForCausalLM``.

    The config is translated by :func:`~.stock_configs.modern_config_from_stock`, which refuses, by
    name, every field value the modern decoder does not compute exactly.
    """
    config = modern_config_from_stock(model.config)
    target = ModernDecoderForCausalLM(config).to(model.dtype).eval()
    target.config._attn_implementation = model.config._attn_implementation
    _load_one_to_one(target, model.state_dict())
    return target
