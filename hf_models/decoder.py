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

So there is one skeleton, :class:`DecoderModel`, driven by a :class:`DecoderSpec` that names the
block for each slot. Each model's config turns its fields into a spec (``config.decoder_spec()``);
the GPT, modern and MoE decoders are presets, and lesson 12's configurable decoder
(``modeling_configurable.py``) exposes every toggle as a config field, QK-norm (``DecoderSpec.qk_norm``)
and no positions at all (``positions="none"``) included.

Extension points. Each slot is filled by a builder looked up by name in a table
(:data:`NORM_BUILDERS`, :data:`FEED_FORWARD_BUILDERS`), and an unknown name is an error, never a
silent fallback. A new block joins by adding a builder: lesson 10's mixture-of-experts
feed-forward is one more entry in :data:`FEED_FORWARD_BUILDERS` (:func:`register_feed_forward`),
and a model that reports more than logits (an MoE's ``aux_loss``) overrides
:meth:`~hf_models.causal_lm.ZooForCausalLM.causal_lm_output`. Blocks that write into the residual
stream name their output projections in ``_residual_projections``, which is how the scaled init
finds them whatever the block is.

Hot path. At width 128 (nanoGPT's CPU size) a training step costs ~20 ms and per-op overhead is
a large part of it, so the forward builds no mask when plain causal attention is right (SDPA's
``is_causal`` path), creates no cache in training, and skips dropout modules whose rate is 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import nn
from transformers import initialization as init
from transformers.cache_utils import Cache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast

from .attention import ATTENTION_FUNCTIONS, CausalSelfAttention, build_causal_mask, mask_lengths
from .causal_lm import ZooForCausalLM, ZooModel, ZooPreTrainedModel, has_padding
from .feed_forward import GELUMLP, SwiGLU
from .kv_cache import GrowingKVCache, StaticKVCache
from .norms import LayerNorm, RMSNorm
from .rotary import RotaryEmbedding

# "none" is NoPE (Haviv et al. 2022; Kazemnejad et al. 2023): a causal decoder can infer positions
# without being told, since token t attends to exactly t + 1 keys.
POSITION_TYPES = ("learned", "rope", "none")
KV_CACHE_TYPES = ("growing", "static")


@dataclass(frozen=True)
class DecoderSpec:
    """Everything the skeleton needs to know, named by slot, with transformers' field names."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    max_position_embeddings: int
    norm: str = "layernorm"
    norm_eps: float = 1e-5
    norm_bias: bool = True
    qk_norm: bool = False
    mlp: str = "gelu"
    hidden_act: str = "gelu_new"
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


# slot name -> builder(spec) -> module. A new block joins by adding its builder.
NORM_BUILDERS: dict[str, Callable[[DecoderSpec], nn.Module]] = {
    "layernorm": lambda spec: LayerNorm(spec.hidden_size, eps=spec.norm_eps, bias=spec.norm_bias),
    "rmsnorm": lambda spec: RMSNorm(spec.hidden_size, eps=spec.norm_eps),
}
FEED_FORWARD_BUILDERS: dict[str, Callable[[DecoderSpec], nn.Module]] = {
    "gelu": lambda spec: GELUMLP(spec.hidden_size, spec.intermediate_size, bias=spec.mlp_bias, activation=spec.hidden_act),
    "swiglu": lambda spec: SwiGLU(spec.hidden_size, spec.intermediate_size, bias=spec.mlp_bias),
}


def register_feed_forward(name: str, builder: Callable[[DecoderSpec], nn.Module]) -> None:
    """Make ``DecoderSpec(mlp=name)`` build ``builder(spec)`` in every layer's feed-forward slot."""
    FEED_FORWARD_BUILDERS[name] = builder


def _build(table: dict[str, Callable[[DecoderSpec], nn.Module]], field: str, spec: DecoderSpec) -> nn.Module:
    name = getattr(spec, field)
    if name not in table:
        raise ValueError(f"DecoderSpec.{field} must be one of {sorted(table)}, got {name!r}.")
    return table[name](spec)


def build_norm(spec: DecoderSpec) -> nn.Module:
    return _build(NORM_BUILDERS, "norm", spec)


def build_mlp(spec: DecoderSpec) -> nn.Module:
    return _build(FEED_FORWARD_BUILDERS, "mlp", spec)


class DecoderLayer(GradientCheckpointingLayer):
    """Pre-norm block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``.

    Pre-norm (GPT-2 onwards) keeps an identity path from the input to the output of the network,
    which is what lets deep stacks train without warm-up tricks.

    As a ``GradientCheckpointingLayer``, the layer's activations are dropped after the forward and
    recomputed in the backward when ``gradient_checkpointing_enable()`` is on: memory per layer
    falls from every intermediate to the one input tensor, for about a third more compute.
    The cache goes in as the keyword ``cache``, which the checkpointing wrapper drops (a recompute
    must not write the cache a second time).
    """

    def __init__(self, spec: DecoderSpec, layer_idx: int):
        super().__init__()
        self.input_layernorm = build_norm(spec)
        self.self_attn = CausalSelfAttention(
            spec.hidden_size,
            spec.num_attention_heads,
            spec.num_key_value_heads,
            head_dim=spec.head_dim,
            bias=spec.attention_bias,
            layer_idx=layer_idx,
            attention_dropout=spec.attention_dropout,
            fused_qkv=spec.fused_qkv,
            # The model's norm type, over one head's features.
            qk_norm=(lambda size: build_norm(replace(spec, hidden_size=size))) if spec.qk_norm else None,
        )
        self.post_attention_layernorm = build_norm(spec)
        self.mlp = build_mlp(spec)
        self.residual_dropout = dropout_or_identity(spec.residual_dropout)

    def forward(self, hidden_states, attention_mask, position_embeddings, attn_implementation, cache=None):
        attended = self.self_attn(
            self.input_layernorm(hidden_states),
            attention_mask=attention_mask,
            position_embeddings=position_embeddings,
            past_key_values=cache,
            attn_implementation=attn_implementation,
        )
        hidden_states = hidden_states + self.residual_dropout(attended)
        return hidden_states + self.residual_dropout(self.mlp(self.post_attention_layernorm(hidden_states)))


class DecoderPreTrainedModel(ZooPreTrainedModel):
    """Weights init and HF flags shared by the decoder backbones and their causal LMs."""

    _supports_sdpa = True
    _no_split_modules = ["DecoderLayer"]

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, RotaryEmbedding):
            # A non-persistent buffer: not in the checkpoint, so from_pretrained must recompute it.
            init.copy_(module.inv_freq, module.compute_inv_freq(module.inv_freq.device))
        elif isinstance(module, DecoderLayer):
            # GPT-2's scaled init: each layer adds two residual branches, so their output projections
            # should start at std / sqrt(2 * layers) and keep the residual stream's variance ~constant
            # in depth. Known gap: transformers' `init` helpers skip a weight already initialised, and
            # each Linear is initialised (std = initializer_range) before its layer is visited, so this
            # re-init has had no effect in every run so far, the README's numbers included. Making it
            # take effect changes every seeded result of lessons 4-5, so it waits for their re-run.
            std = self.config.initializer_range / math.sqrt(2 * self.config.num_hidden_layers)
            for block in module.modules():
                for name in getattr(block, "_residual_projections", ()):
                    init.normal_(getattr(block, name).weight, mean=0.0, std=std)

    def new_cache(self) -> Cache:
        """The cache ``generate()`` gets when it passes none: the zoo's own, per ``config.kv_cache``."""
        if self.config.kv_cache == "static":
            return StaticKVCache(max_cache_len=self.config.max_position_embeddings, num_layers=self.config.num_hidden_layers)
        return GrowingKVCache(num_layers=self.config.num_hidden_layers)


class DecoderModel(DecoderPreTrainedModel, ZooModel):
    """The backbone: embeddings, the stack of layers and the final norm; ids (B, T) -> hidden states (B, T, C).

    Subclasses set ``config_class``; the blocks come from ``config.decoder_spec()``.
    """

    def __init__(self, config):
        super().__init__(config)
        spec = config.decoder_spec()
        if spec.positions not in POSITION_TYPES:
            raise ValueError(f"DecoderSpec.positions must be one of {list(POSITION_TYPES)}, got {spec.positions!r}.")
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.embed_positions = (
            nn.Embedding(spec.max_position_embeddings, spec.hidden_size) if spec.positions == "learned" else None
        )
        self.rotary_emb = RotaryEmbedding(spec.head_dim, base=spec.rope_theta) if spec.positions == "rope" else None
        self.dropout = dropout_or_identity(spec.embedding_dropout)
        self.layers = nn.ModuleList(DecoderLayer(spec, i) for i in range(spec.num_hidden_layers))
        self.norm = build_norm(spec)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast | tuple:
        cache, past_length, seq_len = self.start_forward(input_ids, inputs_embeds, past_key_values, use_cache, output_attentions, kwargs)
        attn_implementation = self.config._attn_implementation or "sdpa"
        if attn_implementation not in ATTENTION_FUNCTIONS:
            raise ValueError(
                f"attn_implementation must be one of {sorted(ATTENTION_FUNCTIONS)} for {type(self).__name__}, "
                f"got {attn_implementation!r}."
            )
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)  # (B, T) -> (B, T, C)
        device = inputs_embeds.device
        _, key_length = mask_lengths(cache, seq_len)
        if attention_mask is not None and attention_mask.dim() == 2 and not has_padding(attention_mask, cache, past_length):
            attention_mask = None  # no padding: plain causal attention, the fast path (SDPA's is_causal)
        # Any mask left is a padding mask (B, L) or the caller's own (B, 1, T, S); build_causal_mask takes both.
        padded = attention_mask is not None and attention_mask.dim() == 2
        if position_ids is None:
            if padded:
                # Left padding: each row counts positions from its first real token, so a padded
                # prompt gets the same positions as the same prompt alone.
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -seq_len:]  # (B, T)
            else:
                position_ids = torch.arange(past_length, past_length + seq_len, device=device)[None]  # (1, T)
        mask = build_causal_mask(attention_mask, seq_len, key_length, past_length, device, has_padding=padded)

        hidden_states = inputs_embeds
        if self.embed_positions is not None:
            hidden_states = hidden_states + self.embed_positions(position_ids)  # + (B or 1, T, C)
        position_embeddings = self.rotary_emb(position_ids, hidden_states.dtype) if self.rotary_emb is not None else None
        hidden_states = self.dropout(hidden_states)
        all_hidden_states = [] if output_hidden_states else None
        for layer in self.layers:
            if all_hidden_states is not None:
                all_hidden_states.append(hidden_states)
            hidden_states = layer(hidden_states, mask, position_embeddings, attn_implementation, cache=cache)
        hidden_states = self.norm(hidden_states)
        if all_hidden_states is not None:
            all_hidden_states.append(hidden_states)
        return self.model_output(hidden_states, cache, all_hidden_states, return_dict)


class DecoderForCausalLM(DecoderPreTrainedModel, ZooForCausalLM):
    """A decoder backbone (``self.model``) with a language-model head; subclasses set ``base_model_class``.

    Generation uses the zoo's hand-written KV cache by default (``config.kv_cache``: "growing" or
    "static"); any transformers ``Cache`` passed as ``past_key_values`` works too.
    """

    base_model_class: type[DecoderModel] = DecoderModel
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config):
        super().__init__(config)
        self.model = self.build_backbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()


__all__ = [
    "FEED_FORWARD_BUILDERS",
    "NORM_BUILDERS",
    "DecoderForCausalLM",
    "DecoderLayer",
    "DecoderModel",
    "DecoderPreTrainedModel",
    "DecoderSpec",
    "register_feed_forward",
]
