"""GPT decoder <-> ``transformers.GPT2LMHeadModel``.

Two layout differences, both mechanical:

* GPT-2 stores its projections as ``Conv1D`` modules, whose weight is the transpose of an
  ``nn.Linear``'s: (in_features, out_features).
* GPT-2's fused ``c_attn`` (width 3C, rows q | k | v) is the zoo GPT's ``qkv_proj``, transposed.

A zoo GPT built with ``bias=False`` (nanoGPT's choice) converts with zero biases, which computes
the same function.
"""

from __future__ import annotations

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from ..configuration_gpt import GPTConfig
from ..modeling_gpt import GPTForCausalLM
from .stock_configs import gpt_config_from_gpt2


def _gpt2_config(config: GPTConfig) -> GPT2Config:
    return GPT2Config(
        vocab_size=config.vocab_size,
        n_positions=config.max_position_embeddings,
        n_embd=config.hidden_size,
        n_layer=config.num_hidden_layers,
        n_head=config.num_attention_heads,
        n_inner=config.intermediate_size,
        activation_function=config.hidden_act,
        resid_pdrop=config.dropout,
        embd_pdrop=config.dropout,
        attn_pdrop=config.attention_dropout,
        layer_norm_epsilon=config.layer_norm_eps,
        initializer_range=config.initializer_range,
        tie_word_embeddings=config.tie_word_embeddings,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
    )


@torch.no_grad()
def gpt_to_gpt2(model: GPTForCausalLM) -> GPT2LMHeadModel:
    """A ``GPT2LMHeadModel`` computing the same function as ``model``."""
    config = model.config
    target = GPT2LMHeadModel(_gpt2_config(config)).to(model.dtype).eval()
    target.config._attn_implementation = model.config._attn_implementation
    decoder, out = model.model, target.transformer

    def copy(dst: torch.Tensor, src: torch.Tensor | None) -> None:
        dst.copy_(src) if src is not None else dst.zero_()

    copy(out.wte.weight, decoder.embed_tokens.weight)
    copy(out.wpe.weight, decoder.embed_positions.weight)
    for ours, theirs in zip(decoder.layers, out.h):
        attn = ours.self_attn
        copy(theirs.ln_1.weight, ours.input_layernorm.weight)
        copy(theirs.ln_1.bias, ours.input_layernorm.bias)
        # Conv1D weights are (in, out): transpose. Both fuse q|k|v along the output axis.
        copy(theirs.attn.c_attn.weight, attn.qkv_proj.weight.T)
        copy(theirs.attn.c_attn.bias, attn.qkv_proj.bias)
        copy(theirs.attn.c_proj.weight, attn.o_proj.weight.T)
        copy(theirs.attn.c_proj.bias, attn.o_proj.bias)
        copy(theirs.ln_2.weight, ours.post_attention_layernorm.weight)
        copy(theirs.ln_2.bias, ours.post_attention_layernorm.bias)
        copy(theirs.mlp.c_fc.weight, ours.mlp.up_proj.weight.T)
        copy(theirs.mlp.c_fc.bias, ours.mlp.up_proj.bias)
        copy(theirs.mlp.c_proj.weight, ours.mlp.down_proj.weight.T)
        copy(theirs.mlp.c_proj.bias, ours.mlp.down_proj.bias)
    copy(out.ln_f.weight, decoder.norm.weight)
    copy(out.ln_f.bias, decoder.norm.bias)
    if config.tie_word_embeddings:
        target.tie_weights()
    else:
        copy(target.lm_head.weight, model.lm_head.weight)
    return target


@torch.no_grad()
def gpt2_to_gpt(model: GPT2LMHeadModel) -> GPTForCausalLM:
    """A zoo ``GPTForCausalLM`` computing the same function as a ``GPT2LMHeadModel`` (tied or untied head).

    The config is translated by :func:`~.stock_configs.gpt_config_from_gpt2`, which refuses, by
    name, every GPT-2 variant the zoo GPT does not compute exactly.
    """
    config = gpt_config_from_gpt2(model.config)
    target = GPTForCausalLM(config).to(model.dtype).eval()
    target.config._attn_implementation = model.config._attn_implementation
    decoder, src = target.model, model.transformer
    decoder.embed_tokens.weight.copy_(src.wte.weight)
    decoder.embed_positions.weight.copy_(src.wpe.weight)
    for ours, theirs in zip(decoder.layers, src.h):
        attn = ours.self_attn
        ours.input_layernorm.weight.copy_(theirs.ln_1.weight)
        ours.input_layernorm.bias.copy_(theirs.ln_1.bias)
        attn.qkv_proj.weight.copy_(theirs.attn.c_attn.weight.T)  # Conv1D (C, 3C) -> Linear (3C, C)
        attn.qkv_proj.bias.copy_(theirs.attn.c_attn.bias)
        attn.o_proj.weight.copy_(theirs.attn.c_proj.weight.T)
        attn.o_proj.bias.copy_(theirs.attn.c_proj.bias)
        ours.post_attention_layernorm.weight.copy_(theirs.ln_2.weight)
        ours.post_attention_layernorm.bias.copy_(theirs.ln_2.bias)
        ours.mlp.up_proj.weight.copy_(theirs.mlp.c_fc.weight.T)
        ours.mlp.up_proj.bias.copy_(theirs.mlp.c_fc.bias)
        ours.mlp.down_proj.weight.copy_(theirs.mlp.c_proj.weight.T)
        ours.mlp.down_proj.bias.copy_(theirs.mlp.c_proj.bias)
    decoder.norm.weight.copy_(src.ln_f.weight)
    decoder.norm.bias.copy_(src.ln_f.bias)
    if config.tie_word_embeddings:
        target.tie_weights()
    else:
        target.lm_head.weight.copy_(model.lm_head.weight)
    return target
