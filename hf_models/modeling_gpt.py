"""Lesson 4: the GPT decoder (Radford et al. 2019), the architecture of GPT-2 and nanoGPT, whole in one file.

Attention is what the recurrent network of lesson 3 lacked: every position looks at every earlier
position directly, through learned queries and keys, so information from 200 tokens ago is one
step away instead of 200. All positions are computed at once in training (one causal mask instead
of a sequential loop), which is what made transformers the architecture that scales.

The file reads bottom-up, as the model is built::

    ids (B, T) -> token embedding + learned position table -> N x GPTDecoderLayer -> LayerNorm -> lm_head
    GPTDecoderLayer:  x = x + attn(LayerNorm(x));  x = x + mlp(LayerNorm(x))      (pre-norm)

:class:`LayerNorm` and :class:`GPTMLP` are the per-token blocks, :func:`build_causal_mask` and the
two attention functions are the math of attention, :class:`GPTAttention` the heads around it,
:class:`GPTModel` the backbone and :class:`GPTForCausalLM` the backbone plus an LM head tied to the
token embedding. It loads GPT-2 weights and exports to ``transformers.GPT2LMHeadModel``
(``hf_models.conversion.gpt2``) with identical logits.

Lesson 5 (``modeling_modern.py``) keeps this skeleton and swaps the blocks; what it shares with this
file is copied there under ``# Copied from`` markers, which ``utils/check_copies.py`` keeps identical.

How it scales: GPT-2 XL is this file at 48 layers, width 1600 and a 1024-token context (1.5B
parameters); GPT-3 is the same again at 96 layers and width 12288. What changes at that size is not
the code of the blocks but how they are laid out on hardware: the attention runs in FlashAttention
kernels, the matmuls are split over GPUs (tensor parallelism), and the layers over nodes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin
from transformers import initialization as init
from transformers.cache_utils import Cache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .causal_lm import CACHE_FIELD, ZooPreTrainedModel, keep_last_positions, mask_has_padding, take_loss_kwargs
from .configuration_gpt import GPTConfig
from .kv_cache import GrowingKVCache, StaticKVCache


class LayerNorm(nn.Module):
    """Layer normalization over the last dimension (Ba, Kiros & Hinton 2016), GPT-2's norm.

    A residual stream is a running sum: every block adds its output to it, so the scale of the
    activations drifts with depth. A norm rescales each token's vector before a block reads it::

        y = (x - mean(x)) / sqrt(var(x) + eps) * weight + bias        (biased variance, as torch)

    The statistics are taken in float32: the mean of squares of a bf16 vector over thousands of
    features loses precision. ``_normalize`` is the readable reference; ``fused=True`` (the default)
    computes the same function with ``F.layer_norm``, one fused kernel instead of five or six, a
    measurable share of a step at nanoGPT's size. The tests hold both to ``torch.nn.LayerNorm``.

    Args:
        hidden_size: size of the normalized (last) dimension.
        eps: added to the variance before the square root; GPT-2 uses 1e-5.
        bias: learn an additive ``bias`` (GPT-2: yes).
        fused: ``F.layer_norm`` instead of the hand-written math.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-5, bias: bool = True, fused: bool = True) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.eps = eps
        self.fused = fused
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.bias = nn.Parameter(torch.zeros(hidden_size)) if bias else None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.fused:
            return F.layer_norm(hidden_states, (self.hidden_size,), self.weight, self.bias, self.eps)
        return self._normalize(hidden_states)

    def _normalize(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Reference math: statistics in float32, affine transform in the input dtype."""
        input_dtype = hidden_states.dtype
        x = hidden_states.to(torch.float32)
        mean = x.mean(-1, keepdim=True)  # (..., 1)
        centred = x - mean
        variance = centred.pow(2).mean(-1, keepdim=True)  # biased variance, (..., 1)
        x = centred * torch.rsqrt(variance + self.eps)
        x = self.weight * x.to(input_dtype)
        if self.bias is not None:
            x = x + self.bias
        return x

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.eps}, bias={self.bias is not None}, fused={self.fused}"


# Names as in transformers' ``ACT2FN``. GPT-2 was trained with the tanh approximation ("gelu_new");
# it differs from the exact erf GELU by up to ~1e-3, enough to break a 1e-5 equality with GPT-2.
GELU_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "gelu_new": partial(F.gelu, approximate="tanh"),
    "gelu_pytorch_tanh": partial(F.gelu, approximate="tanh"),
}


class GPTMLP(nn.Module):
    """``down_proj(gelu(up_proj(x)))``: GPT-2's feed-forward block, applied to each token on its own.

    After attention has mixed information across tokens, the MLP processes each token alone:
    widen to ``intermediate_size`` (4x), apply GELU, project back. Two thirds of a dense
    transformer's parameters and FLOPs sit here. Names follow LLaMA's (``up_proj``/``down_proj``);
    the GPT-2 converter maps ``c_fc``/``c_proj`` onto them.

    Args:
        hidden_size: model width ``C``.
        intermediate_size: inner width, ``4 * C`` in GPT-2.
        bias: biases on both projections (GPT-2: yes).
        activation: a key of :data:`GELU_ACTIVATIONS`.
    """

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = True, activation: str = "gelu_new") -> None:
        super().__init__()
        self.activation = activation
        self.act_fn = GELU_ACTIVATIONS[activation]
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)
        self.down_proj.is_residual_projection = True  # see GPTPreTrainedModel._init_weights

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # (B, T, C) -> (B, T, I) -> (B, T, C)
        return self.down_proj(self.act_fn(self.up_proj(hidden_states)))

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}"


def bottom_right_causal_mask(query_length: int, key_length: int, device: torch.device) -> torch.Tensor:
    """(T, S) boolean causal mask for the last T of S positions: query i sees keys <= S - T + i."""
    return torch.ones(query_length, key_length, dtype=torch.bool, device=device).tril(key_length - query_length)


def eager_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The readable reference: ``softmax(q k^T * scaling + mask) v``. q: (B, H, T, D), k/v: (B, H, S, D).

    Returns the output (B, T, H, D) and the attention weights (B, H, T, S), in the contract of
    transformers' attention functions (``ALL_ATTENTION_FUNCTIONS``), so any of those can stand in.
    ``scaling = 1 / sqrt(D)`` keeps the logits at unit scale as heads grow (a dot product of ``D``
    unit-variance terms has variance ``D``), so the softmax does not saturate. ``attention_mask``:
    ``None`` (causal), boolean (True = attend) or additive float, broadcastable to (B, H, T, S).
    """
    query_length, key_length = query.shape[-2], key.shape[-2]
    scores = torch.matmul(query, key.transpose(-2, -1)) * scaling  # (B, H, T, D) @ (B, H, D, S) -> (B, H, T, S)
    if attention_mask is None and query_length > 1:
        attention_mask = bottom_right_causal_mask(query_length, key_length, query.device)
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            # The dtype's minimum rather than -inf: a fully-masked row becomes uniform, not NaN.
            scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + attention_mask
    weights = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    if dropout > 0.0:
        weights = F.dropout(weights, p=dropout, training=True)
    output = torch.matmul(weights, value)  # (B, H, T, S) @ (B, H, S, D) -> (B, H, T, D)
    return output.transpose(1, 2), weights  # (B, H, T, D) -> (B, T, H, D)


def sdpa_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """The same math through ``F.scaled_dot_product_attention``, which dispatches to fused FlashAttention-style
    kernels that never materialise the (T, S) scores, so there are no weights to return.
    Same contract as :func:`eager_attention`."""
    query_length, key_length = query.shape[-2], key.shape[-2]
    is_causal = False
    if attention_mask is None and query_length > 1:
        # SDPA's `is_causal` aligns the mask top-left, which is only right when T == S.
        if query_length == key_length:
            is_causal = True
        else:
            attention_mask = bottom_right_causal_mask(query_length, key_length, query.device)
    output = F.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, is_causal=is_causal, scale=scaling
    )
    return output.transpose(1, 2), None  # (B, H, T, D) -> (B, T, H, D)


# The lesson's own attention math, by config._attn_implementation.
ATTENTION_FUNCTIONS: dict[str, Callable[..., tuple]] = {"eager": eager_attention, "sdpa": sdpa_attention}


def attention_function(name: str | None) -> Callable[..., tuple]:
    """The attention math named by ``config._attn_implementation`` (``None``: SDPA), or a clear error.

    "eager" and "sdpa" are this file's; any other name comes from transformers' attention registry
    (``flex_attention``, or a kernel registered with ``AttentionInterface.register``), which takes
    the same arguments, so the model runs on whatever backend transformers knows.
    """
    name = name or "sdpa"
    if name in ATTENTION_FUNCTIONS:
        return ATTENTION_FUNCTIONS[name]
    if name in ALL_ATTENTION_FUNCTIONS:
        return ALL_ATTENTION_FUNCTIONS[name]
    raise ValueError(
        f"attn_implementation must be one of {sorted(ATTENTION_FUNCTIONS)} or a name registered with transformers' "
        f"AttentionInterface ({sorted(ALL_ATTENTION_FUNCTIONS.valid_keys())}), got {name!r}."
    )


def mask_for_backend(
    mask: torch.Tensor | None,
    name: str | None,
    batch_size: int,
    query_length: int,
    key_length: int,
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor | None:
    """:func:`build_causal_mask`'s mask in the form an attention backend takes.

    This file's functions read ``None`` as "plain causal". A transformers backend gets the mask
    spelled out, (B, 1, T, S): boolean (True = attend), and for ``flex_attention`` as the block mask
    its kernel skips whole blocks with (a ``mask_mod`` that reads the boolean mask).
    """
    if (name or "sdpa") in ATTENTION_FUNCTIONS:
        return mask
    if mask is None:
        mask = bottom_right_causal_mask(query_length, key_length, device)[None, None]  # (T, S) -> (1, 1, T, S)
    mask = mask.expand(batch_size, 1, query_length, key_length).contiguous()
    if name == "flex_attention":
        from torch.nn.attention.flex_attention import create_block_mask

        def may_attend(batch, head, query, key):
            return mask[batch, 0, query, key]

        return create_block_mask(may_attend, batch_size, None, query_length, key_length, device=device)
    return mask


def mask_lengths(past_key_values: Cache | None, query_length: int) -> tuple[int, int]:
    """``(past_length, key_length)`` for a forward of ``query_length`` new tokens, before the cache update.

    ``key_length`` is what the cache's ``update`` will return along the sequence axis: ``past + T``
    for lesson 6's caches (which return the filled prefix), ``max_cache_len`` for transformers'
    ``StaticCache`` (which returns its whole buffer).
    """
    if past_key_values is None:
        return 0, query_length
    past_length = past_key_values.get_seq_length()  # an int; a 0-d tensor for transformers' StaticCache
    key_length, _ = past_key_values.get_mask_sizes(query_length, 0)
    return past_length, int(key_length)


def build_causal_mask(
    attention_mask: torch.Tensor | None,
    query_length: int,
    key_length: int,
    past_length: int = 0,
    device: torch.device | None = None,
) -> torch.Tensor | None:
    """The mask every layer of one forward shares, or ``None`` when plain causal attention is right.

    Built once per forward. ``None`` means "causal, nothing else to hide", which lets SDPA take its
    fastest ``is_causal`` path. Otherwise a boolean (B or 1, 1, T, S), True = may attend, folding in:

    * the cache offset: query ``i`` sits at absolute position ``past_length + i`` and sees keys up to it;
    * static caches whose key buffer is longer than what is filled: those slots lie beyond every
      query's position, so causality already hides them;
    * left padding from the 2-D (B, L) mask of 1/0. A padding query would see no key at all (NaN in a
      naive softmax), so every token may always attend to itself.

    Args:
        attention_mask: (B, L) 1 = real token, 0 = padding, covering the cached and the new tokens
            (extra columns are ignored); a 4-D mask is returned unchanged; or ``None``.
        query_length: ``T``, the new tokens.
        key_length: ``S``, the keys attention will see (:func:`mask_lengths`).
        past_length: tokens already in the cache.
        device: where to build the mask when ``attention_mask`` is ``None``.
    """
    if attention_mask is not None:
        if attention_mask.dim() == 4:
            return attention_mask
        if not isinstance(past_length, torch.Tensor) and attention_mask.shape[-1] < past_length + query_length:
            raise ValueError(
                f"attention_mask covers {attention_mask.shape[-1]} positions, but the cache holds {past_length} "
                f"and {query_length} are new; a 2-D mask must cover past and new tokens."
            )
        if not mask_has_padding(attention_mask, past_length):
            attention_mask = None  # no padding: plain causal attention, the fast path
    # (A traced past length, from transformers' StaticCache under torch.export, always gets the explicit mask.)
    plain = attention_mask is None and not isinstance(past_length, torch.Tensor)
    if plain and key_length == past_length + query_length and (past_length == 0 or query_length == 1):
        return None
    if attention_mask is not None:
        device = attention_mask.device
    query_positions = torch.arange(query_length, device=device) + past_length  # (T,): past may be a traced tensor
    key_positions = torch.arange(key_length, device=device)  # (S,)
    causal = key_positions <= query_positions[:, None]  # (T, S)
    if attention_mask is None:
        return causal[None, None]  # (T, S) -> (1, 1, T, S)
    padding = attention_mask[:, :key_length].bool()  # (B, L) -> (B, min(L, S))
    if padding.shape[-1] < key_length:
        # Slots past the filled length of a static buffer: hidden by causality whatever we put here.
        padding = F.pad(padding, (0, key_length - padding.shape[-1]), value=False)
    mask = causal & padding[:, None, :]  # (T, S) & (B, 1, S) -> (B, T, S)
    mask |= key_positions == query_positions[:, None]  # every token sees itself: no empty rows
    return mask[:, None]  # (B, T, S) -> (B, 1, T, S)


def position_ids_for(attention_mask: torch.Tensor | None, past_length: int, query_length: int, device: torch.device) -> torch.Tensor:
    """Absolute positions of the new tokens: (1, T) without padding; (B, T) counted from each row's
    first real token with left padding, so a padded prompt gets the positions it would get alone."""
    if attention_mask is not None and attention_mask.dim() == 2 and mask_has_padding(attention_mask, past_length):
        return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -query_length:]  # (B, T)
    return (torch.arange(query_length, device=device) + past_length)[None]  # (1, T)


class GPTAttention(nn.Module):
    """Multi-head causal self-attention, GPT-2's: one fused q/k/v projection, ``H`` heads, an output projection.

    Each token emits a query, a key and a value; the output at position ``t`` is the average of the
    values of positions ``<= t``, weighted by how well ``q_t`` matches each key. ``H`` heads on
    ``D = C / H`` slices let different heads track different relations (syntax, coreference,
    copying) for the cost of one. q, k and v come from one ``qkv_proj`` matmul (GPT-2's ``c_attn``,
    rows in q, k, v order): at small widths a step is bound by per-op cost, and one larger matmul is
    measurably faster than three small ones.

    Args:
        config: the model's :class:`GPTConfig` (width, heads, bias, attention dropout).
        layer_idx: this layer's slot in the KV cache.
    """

    def __init__(self, config: GPTConfig, layer_idx: int) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.scaling = self.head_dim**-0.5
        self.layer_idx = layer_idx
        self.attention_dropout = config.attention_dropout
        self.qkv_proj = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=config.bias)
        self.o_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=config.bias)
        self.o_proj.is_residual_projection = True  # see GPTPreTrainedModel._init_weights
        self.is_causal = True  # read by transformers' attention backends
        self.num_key_value_groups = 1

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None,
        past_key_values: Cache | None,
        attn_implementation: str | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, T, C) -> (B, T, C), and the attention weights (B, H, T, S) where the backend computes them.
        ``attention_mask`` is :func:`build_causal_mask`'s; ``past_key_values`` any transformers
        ``Cache``, of which this layer writes slot ``layer_idx``."""
        batch_size, query_length, hidden_size = hidden_states.shape
        query, key, value = self.qkv_proj(hidden_states).split(hidden_size, dim=-1)  # 3 x (B, T, C)
        head_shape = (batch_size, query_length, self.num_heads, self.head_dim)
        query = query.view(head_shape).transpose(1, 2)  # (B, T, C) -> (B, T, H, D) -> (B, H, T, D)
        key = key.view(head_shape).transpose(1, 2)
        value = value.view(head_shape).transpose(1, 2)
        if past_key_values is not None:
            key, value = past_key_values.update(key, value, self.layer_idx)  # -> (B, H, S, D)
        dropout = self.attention_dropout if self.training else 0.0
        attend = attention_function(attn_implementation)
        output, weights = attend(self, query, key, value, attention_mask, dropout=dropout, scaling=self.scaling)
        output = output.reshape(batch_size, query_length, hidden_size)  # (B, T, H, D) -> (B, T, C)
        return self.o_proj(output), weights

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, head_dim={self.head_dim}, layer_idx={self.layer_idx}"


def dropout_or_identity(rate: float) -> nn.Module:
    """``nn.Dropout(rate)``, or nothing at all at rate 0: at width 128 even a no-op module costs time per step."""
    return nn.Dropout(rate) if rate > 0 else nn.Identity()


class GPTDecoderLayer(GradientCheckpointingLayer):
    """Pre-norm block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``.

    Pre-norm (GPT-2 onwards) keeps an identity path from the input to the output of the network,
    which is what lets deep stacks train without warm-up tricks. As a ``GradientCheckpointingLayer``
    its activations are dropped after the forward and recomputed in the backward when
    ``gradient_checkpointing_enable()`` is on: memory per layer falls to the one input tensor, for
    about a third more compute. The cache goes in as ``past_key_values``, which the checkpointing
    wrapper drops (a recompute must not write the cache a second time).
    """

    def __init__(self, config: GPTConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps, bias=config.bias)
        self.self_attn = GPTAttention(config, layer_idx)
        self.post_attention_layernorm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps, bias=config.bias)
        self.mlp = GPTMLP(config.hidden_size, config.intermediate_size, bias=config.bias, activation=config.hidden_act)
        self.residual_dropout = dropout_or_identity(config.dropout)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_implementation: str | None,
        past_key_values: Cache | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The new hidden states (B, T, C) and the attention weights (B, H, T, S), or ``None`` (SDPA)."""
        attended, weights = self.self_attn(self.input_layernorm(hidden_states), attention_mask, past_key_values, attn_implementation)
        hidden_states = hidden_states + self.residual_dropout(attended)
        return hidden_states + self.residual_dropout(self.mlp(self.post_attention_layernorm(hidden_states))), weights


class GPTPreTrainedModel(ZooPreTrainedModel):
    """The GPT's init and transformers flags, shared by the backbone and the causal LM."""

    config_class = GPTConfig
    # One decoding step traces into one graph with lesson 6's static cache (tests/test_generation_features.py).
    _can_compile_fullgraph = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _no_split_modules = ["GPTDecoderLayer"]
    has_attention_weights = True

    def context_limit(self) -> int:
        """The learned position table's length: the GPT cannot encode a position past it."""
        return self.config.max_position_embeddings

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear) and getattr(module, "is_residual_projection", False):
            # GPT-2's scaled init: each layer adds two branches to the residual stream, so their output
            # projections start at std / sqrt(2 * layers), keeping the stream's variance about constant
            # in depth. The mark is on the Linear itself because transformers initialises leaf modules
            # one by one (a container such as the attention block is never visited with weights of its own).
            std = self.config.initializer_range / math.sqrt(2 * self.config.num_hidden_layers)
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        else:
            super()._init_weights(module)

    def new_cache(self, static: bool | None = None, max_cache_len: int | None = None) -> Cache:
        """Lesson 6's cache: static or growing as ``static`` (else ``config.kv_cache``) says; see ``ZooPreTrainedModel.new_cache``."""
        if self.config.kv_cache == "static" if static is None else static:
            max_cache_len = max_cache_len or self.config.max_position_embeddings
            return StaticKVCache(max_cache_len=max_cache_len, num_layers=self.config.num_hidden_layers)
        return GrowingKVCache(num_layers=self.config.num_hidden_layers)


class GPTModel(GPTPreTrainedModel):
    """The GPT backbone: ids (B, T) -> hidden states (B, T, C) after the final LayerNorm (``AutoModel``)."""

    def __init__(self, config: GPTConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        # GPT-2 learns one vector per absolute position and adds it to the token embedding: simple,
        # but the model cannot see past the table's length (lesson 5's rotary positions can).
        self.embed_positions = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.dropout = dropout_or_identity(config.dropout)
        self.layers = nn.ModuleList(GPTDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps, bias=config.bias)
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
        output_attentions, output_hidden_states = self.output_flags(output_attentions, output_hidden_states)
        cache, past_length, seq_len = self.start_forward(input_ids, inputs_embeds, past_key_values, use_cache, output_attentions, kwargs)
        attn_implementation = self.config._attn_implementation or "sdpa"
        if output_attentions and attn_implementation == "sdpa":
            attn_implementation = "eager"  # SDPA never materialises the weights; the readable path does
        attention_function(attn_implementation)  # an unknown name fails here, before any work
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)  # (B, T) -> (B, T, C)
        batch_size, device = inputs_embeds.shape[0], inputs_embeds.device
        if position_ids is None:
            position_ids = position_ids_for(attention_mask, past_length, seq_len, device)  # (B or 1, T)
        _, key_length = mask_lengths(cache, seq_len)
        mask = build_causal_mask(attention_mask, seq_len, key_length, past_length, device)
        mask = mask_for_backend(mask, attn_implementation, batch_size, seq_len, key_length, inputs_embeds.dtype, device)
        hidden_states = self.dropout(inputs_embeds + self.embed_positions(position_ids))  # + (B or 1, T, C)
        all_hidden_states = [] if output_hidden_states else None
        all_attentions = [] if output_attentions else None
        for layer in self.layers:
            if all_hidden_states is not None:
                all_hidden_states.append(hidden_states)
            hidden_states, weights = layer(hidden_states, mask, attn_implementation, past_key_values=cache)
            if all_attentions is not None:
                all_attentions.append(weights)
        hidden_states = self.norm(hidden_states)
        if all_hidden_states is not None:
            all_hidden_states.append(hidden_states)
        return self.model_output(hidden_states, cache, all_hidden_states, return_dict, all_attentions)


class GPTForCausalLM(GPTPreTrainedModel, GenerationMixin):
    """The GPT backbone (``self.model``) and an LM head tied to its token embedding.

    Generation uses lesson 6's hand-written KV cache by default (``config.kv_cache``: "growing" or
    "static"); any transformers ``Cache`` passed as ``past_key_values`` works too.
    """

    base_model_class = GPTModel
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: GPTConfig):
        super().__init__(config)
        self.model = self.build_backbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        shift_labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast | tuple:
        loss_kwargs = take_loss_kwargs(kwargs, shift_labels)
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
            **kwargs,
        )
        logits = self.lm_head(keep_last_positions(outputs.last_hidden_state, logits_to_keep))  # (B, T, C) -> (B, T, V)
        loss = self.causal_lm_loss(logits, labels, loss_kwargs)
        output = CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            **{CACHE_FIELD: getattr(outputs, CACHE_FIELD)},
        )
        return output if self.wants_dict(return_dict) else output.to_tuple()


__all__ = ["GPTForCausalLM", "GPTModel", "GPTPreTrainedModel"]
