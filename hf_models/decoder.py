"""The decoder-only transformer that lessons 4, 5, 6 and 12 share, assembled from the zoo's blocks.

GPT-2 (2019) and LLaMA (2023) are the same skeleton: token embedding -> N x [pre-norm attention,
residual, pre-norm MLP, residual] -> final norm -> LM head. What changed in four years is which
block sits in each slot:

=================  ==========================  ===============================
slot               GPT-2 (lesson 4)            LLaMA-style (lesson 5)
=================  ==========================  ===============================
positions          learned table, added        rotary, applied to q and k
norm               LayerNorm (+ bias)          RMSNorm
attention          multi-head, biases,         grouped-query, no biases,
                   fused q/k/v (``c_attn``)    separate q/k/v projections
feed-forward       GELU MLP, 4x                SwiGLU, ~8/3x
=================  ==========================  ===============================

So there is one skeleton, :class:`Decoder`, driven by a :class:`DecoderSpec` that names the block
for each slot. Each model's config turns its fields into a spec (``config.decoder_spec()``); the
GPT and modern decoders are two presets, and lesson 12's configurable decoder exposes every
toggle as a config field.

Hot path. At width 128 (nanoGPT's CPU size) a training step costs ~20 ms and per-op overhead is
a large part of it, so the forward builds no mask when plain causal attention is right (SDPA's
``is_causal`` path), creates no cache in training, and skips dropout modules whose rate is 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from transformers import GenerationMixin
from transformers import initialization as init
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .attention import ATTENTION_FUNCTIONS, CausalSelfAttention, build_causal_mask, mask_lengths
from .causal_lm import ZooPreTrainedModel, keep_last_positions
from .feed_forward import GELUMLP, SwiGLU
from .kv_cache import GrowingKVCache, StaticKVCache
from .norms import LayerNorm, RMSNorm
from .rotary import RotaryEmbedding

NORM_TYPES = ("layernorm", "rmsnorm")
MLP_TYPES = ("gelu", "swiglu")
POSITION_TYPES = ("learned", "rope")
KV_CACHE_TYPES = ("growing", "static")


@dataclass(frozen=True)
class DecoderSpec:
    """Everything the skeleton needs to know, named by slot."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    max_positions: int
    norm: str = "layernorm"
    norm_eps: float = 1e-5
    norm_bias: bool = True
    mlp: str = "gelu"
    activation: str = "gelu_new"
    mlp_bias: bool = True
    attention_bias: bool = True
    fused_qkv: bool = False
    positions: str = "learned"
    rope_theta: float = 10000.0
    embedding_dropout: float = 0.0
    residual_dropout: float = 0.0
    attention_dropout: float = 0.0


def dropout_or_identity(rate: float) -> nn.Module:
    return nn.Dropout(rate) if rate > 0 else nn.Identity()


def build_norm(spec: DecoderSpec) -> nn.Module:
    if spec.norm == "layernorm":
        return LayerNorm(spec.hidden_size, eps=spec.norm_eps, bias=spec.norm_bias)
    return RMSNorm(spec.hidden_size, eps=spec.norm_eps)


def build_mlp(spec: DecoderSpec) -> nn.Module:
    if spec.mlp == "gelu":
        return GELUMLP(spec.hidden_size, spec.intermediate_size, bias=spec.mlp_bias, activation=spec.activation)
    return SwiGLU(spec.hidden_size, spec.intermediate_size, bias=spec.mlp_bias)


class DecoderLayer(nn.Module):
    """Pre-norm block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``.

    Pre-norm (GPT-2 onwards) keeps an identity path from the input to the output of the network,
    which is what lets deep stacks train without warm-up tricks.
    """

    def __init__(self, spec: DecoderSpec, layer_idx: int):
        super().__init__()
        self.input_layernorm = build_norm(spec)
        self.self_attn = CausalSelfAttention(
            spec.hidden_size,
            spec.num_heads,
            spec.num_kv_heads,
            head_dim=spec.head_dim,
            bias=spec.attention_bias,
            layer_idx=layer_idx,
            attention_dropout=spec.attention_dropout,
            fused_qkv=spec.fused_qkv,
        )
        self.post_attention_layernorm = build_norm(spec)
        self.mlp = build_mlp(spec)
        self.residual_dropout = dropout_or_identity(spec.residual_dropout)

    def forward(self, hidden_states, attention_mask, position_embeddings, past_key_values, attn_implementation):
        attended = self.self_attn(
            self.input_layernorm(hidden_states),
            attention_mask=attention_mask,
            position_embeddings=position_embeddings,
            past_key_values=past_key_values,
            attn_implementation=attn_implementation,
        )
        hidden_states = hidden_states + self.residual_dropout(attended)
        return hidden_states + self.residual_dropout(self.mlp(self.post_attention_layernorm(hidden_states)))


class Decoder(nn.Module):
    """Embeddings, the stack of layers and the final norm: ids (B, T) -> hidden states (B, T, C)."""

    def __init__(self, spec: DecoderSpec):
        super().__init__()
        self.spec = spec
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.embed_positions = nn.Embedding(spec.max_positions, spec.hidden_size) if spec.positions == "learned" else None
        self.rotary_emb = RotaryEmbedding(spec.head_dim, base=spec.rope_theta) if spec.positions == "rope" else None
        self.dropout = dropout_or_identity(spec.embedding_dropout)
        self.layers = nn.ModuleList(DecoderLayer(spec, i) for i in range(spec.num_layers))
        self.norm = build_norm(spec)

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.LongTensor | None,
        past_key_values: Cache | None,
        attn_implementation: str,
    ) -> torch.Tensor:
        seq_len = input_ids.shape[1]
        past_length, key_length = mask_lengths(past_key_values, seq_len)
        if attention_mask is not None and attention_mask.dim() == 2 and bool(attention_mask.all()):
            attention_mask = None  # no padding: plain causal attention, the fast path (SDPA's is_causal)
        # Any mask left is a padding mask (B, L) or the caller's own (B, 1, T, S); build_causal_mask takes both.
        has_padding = attention_mask is not None and attention_mask.dim() == 2
        if position_ids is None:
            if has_padding:
                # Left padding: each row counts positions from its first real token, so a padded
                # prompt gets the same positions as the same prompt alone.
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -seq_len:]  # (B, T)
            else:
                position_ids = torch.arange(past_length, past_length + seq_len, device=input_ids.device)[None]  # (1, T)
        mask = build_causal_mask(attention_mask, seq_len, key_length, past_length, input_ids.device)

        hidden_states = self.embed_tokens(input_ids)  # (B, T) -> (B, T, C)
        if self.embed_positions is not None:
            hidden_states = hidden_states + self.embed_positions(position_ids)  # + (B or 1, T, C)
        position_embeddings = self.rotary_emb(position_ids, hidden_states.dtype) if self.rotary_emb is not None else None
        hidden_states = self.dropout(hidden_states)
        for layer in self.layers:
            hidden_states = layer(hidden_states, mask, position_embeddings, past_key_values, attn_implementation)
        return self.norm(hidden_states)


class DecoderPreTrainedModel(ZooPreTrainedModel):
    """Base of every decoder-only model in the zoo. Subclasses set ``config_class``."""

    _supports_sdpa = True
    _no_split_modules = ["DecoderLayer"]
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, RotaryEmbedding):
            # A non-persistent buffer: not in the checkpoint, so from_pretrained must recompute it.
            init.copy_(module.inv_freq, module.compute_inv_freq(module.inv_freq.device))
        elif isinstance(module, DecoderLayer):
            # GPT-2's scaled init: each layer adds two residual branches, so their output projections
            # start at std / sqrt(2 * layers) and the residual stream's variance stays ~constant in depth.
            std = self.config.initializer_range / math.sqrt(2 * self.config.num_hidden_layers)
            init.normal_(module.self_attn.o_proj.weight, mean=0.0, std=std)
            init.normal_(module.mlp.down_proj.weight, mean=0.0, std=std)


class DecoderForCausalLM(DecoderPreTrainedModel, GenerationMixin):
    """A decoder with a language-model head; its blocks come from ``config.decoder_spec()``.

    Generation uses the zoo's hand-written KV cache by default (``config.kv_cache``: "growing" or
    "static"); any transformers ``Cache`` passed as ``past_key_values`` works too.
    """

    def __init__(self, config):
        super().__init__(config)
        self.model = Decoder(config.decoder_spec())
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.embed_tokens = value

    def new_cache(self) -> Cache:
        """The cache ``generate()`` gets when it passes none: the zoo's own, per ``config.kv_cache``."""
        if self.config.kv_cache == "static":
            return StaticKVCache(max_cache_len=self.config.max_position_embeddings, num_layers=self.config.num_hidden_layers)
        return GrowingKVCache(num_layers=self.config.num_hidden_layers)

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        use_cache, past_key_values = self.start_forward(input_ids, past_key_values, use_cache, self.new_cache, kwargs)
        attn_implementation = self.config._attn_implementation or "sdpa"
        if attn_implementation not in ATTENTION_FUNCTIONS:
            raise ValueError(
                f"attn_implementation must be one of {sorted(ATTENTION_FUNCTIONS)} for {type(self).__name__}, "
                f"got {attn_implementation!r}."
            )
        hidden_states = self.model(input_ids, attention_mask, position_ids, past_key_values, attn_implementation)
        logits = self.lm_head(keep_last_positions(hidden_states, logits_to_keep))  # (B, T, C) -> (B, T, V)
        return self.causal_lm_output(logits, labels, past_key_values, **kwargs)


__all__ = ["Decoder", "DecoderForCausalLM", "DecoderLayer", "DecoderPreTrainedModel", "DecoderSpec"]
