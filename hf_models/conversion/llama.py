"""Modern decoder <-> ``transformers.LlamaForCausalLM``.

The zoo's modern decoder uses LLaMA's module names and the same rotate-half rotary layout, so
the state dicts map one to one; only the configs differ in spelling. (A checkpoint in Meta's
original interleaved layout would first need ``hf_models.conversion.rotary_layout.permute_for_rotate_half`` on its
q and k weights, exactly as transformers' own conversion script does.)
"""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from ..configuration_modern import ModernDecoderConfig
from ..modeling_modern import ModernDecoderForCausalLM


@torch.no_grad()
def modern_to_llama(model: ModernDecoderForCausalLM) -> LlamaForCausalLM:
    """A ``LlamaForCausalLM`` computing the same function as ``model``."""
    c = model.config
    config = LlamaConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads,
        head_dim=c.head_dim,
        max_position_embeddings=c.max_position_embeddings,
        rms_norm_eps=c.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta},
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
        attention_dropout=c.attention_dropout,
        initializer_range=c.initializer_range,
        tie_word_embeddings=c.tie_word_embeddings,
        bos_token_id=c.bos_token_id,
        eos_token_id=c.eos_token_id,
        pad_token_id=c.pad_token_id,
    )
    target = LlamaForCausalLM(config).to(model.dtype).eval()
    target.config._attn_implementation = c._attn_implementation
    missing, unexpected = target.load_state_dict(model.state_dict(), strict=False)
    # Only the tied head may be absent, and nothing may be left over.
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise RuntimeError(f"state dicts do not map one to one: missing={missing}, unexpected={unexpected}")
    target.tie_weights()
    return target


@torch.no_grad()
def llama_to_modern(model: LlamaForCausalLM) -> ModernDecoderForCausalLM:
    """A zoo ``ModernDecoderForCausalLM`` computing the same function as a ``LlamaForCausalLM``."""
    c = model.config
    rope = c.rope_parameters or {"rope_type": "default", "rope_theta": 10000.0}
    problems = {
        "rope_type": rope.get("rope_type", "default") != "default",
        "hidden_act": c.hidden_act != "silu",
        "attention_bias": c.attention_bias,
        "mlp_bias": c.mlp_bias,
    }
    if any(problems.values()):
        raise ValueError(f"LLaMA variants the zoo modern decoder does not implement: {[k for k, v in problems.items() if v]}.")
    config = ModernDecoderConfig(
        vocab_size=c.vocab_size,
        max_position_embeddings=c.max_position_embeddings,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads,
        head_dim=c.head_dim,
        rms_norm_eps=c.rms_norm_eps,
        rope_theta=float(rope["rope_theta"]),
        attention_dropout=float(c.attention_dropout),
        initializer_range=c.initializer_range,
        tie_word_embeddings=c.tie_word_embeddings,
        bos_token_id=c.bos_token_id,
        eos_token_id=c.eos_token_id,
        pad_token_id=c.pad_token_id,
    )
    target = ModernDecoderForCausalLM(config).to(model.dtype).eval()
    target.config._attn_implementation = c._attn_implementation
    missing, unexpected = target.load_state_dict(model.state_dict(), strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise RuntimeError(f"state dicts do not map one to one: missing={missing}, unexpected={unexpected}")
    target.tie_weights()
    return target
