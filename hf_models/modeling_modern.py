"""Lessons 5 and 6: the modern (LLaMA-style) decoder and its KV cache, whole in one file.

The skeleton is lesson 4's GPT (pre-norm blocks around attention and an MLP, an LM head tied to the
embedding); four years of practice changed the block in each slot (Touvron et al. 2023):

=================  ==========================  ===============================
slot               GPT-2 (lesson 4)            LLaMA-style (this file)
=================  ==========================  ===============================
positions          learned table, added        rotary, applied to q and k
norm               LayerNorm (+ bias)          :class:`RMSNorm`
attention          multi-head, biases,         grouped-query, no biases,
                   fused q/k/v                 separate q/k/v projections
feed-forward       GELU MLP, 4x                :class:`SwiGLU`, ~8/3x
=================  ==========================  ===============================

* RMSNorm (Zhang & Sennrich 2019): LayerNorm without the mean subtraction and the bias; as good, cheaper.
* SwiGLU (Shazeer 2020): a gated MLP, better per parameter than GELU.
* Rotary position embeddings (Su et al. 2021): positions enter as rotations of q and k, so attention
  scores depend on relative distance, and there is no position table to outgrow.
* Grouped-query attention (Ainslie et al. 2023): several query heads share one key/value head, which
  shrinks the KV cache (lesson 6, ``kv_cache.py``) by that factor at almost no quality cost.

The module names are LLaMA's and the rotary layout is transformers' rotate-half, so the model loads
LLaMA weights and exports to ``transformers.LlamaForCausalLM`` (``hf_models.conversion.llama``) with
identical logits. Blocks that are the same as lesson 4's are copied from ``modeling_gpt.py`` under
``# Copied from`` markers (``utils/check_copies.py`` keeps them identical).

How it scales: LLaMA-2-7B is this file at 32 layers, width 4096 and 32 heads; Llama-3-8B adds
GQA with 8 key/value heads (a 4x smaller KV cache) and a 128K vocabulary; long-context variants
only change the rotary frequencies (``rope_theta``, Llama 3's frequency bands: :func:`llama3_scaled_inv_freq`).
Qwen2 is this file with biases on q, k and v (``attention_bias``); stock Llama and Qwen2 checkpoints
load into it through ``hf_models.conversion.stock``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

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
from .configuration_modern import ModernDecoderConfig
from .kv_cache import GrowingKVCache, StaticKVCache


class RMSNorm(nn.Module):
    """Root-mean-square normalization (Zhang & Sennrich 2019), as ``LlamaRMSNorm``: ``x / rms(x) * weight``.

    LayerNorm centres and rescales; the paper's finding is that the rescaling is what stabilises
    training, so RMSNorm drops the mean and the bias (one reduction and one vector fewer). The
    statistics are float32 (a bf16 mean of squares over thousands of features loses precision),
    and the cast back happens *before* the multiplication by ``weight``, as in ``LlamaRMSNorm``:
    that is what makes a converted LLaMA match transformers bit for bit in half precision too.

    Args:
        hidden_size: size of the normalized (last) dimension.
        eps: added to the mean square before the square root; LLaMA uses 1e-6 (LLaMA-1) or 1e-5.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        x = hidden_states.to(torch.float32)
        mean_square = x.pow(2).mean(-1, keepdim=True)  # (..., 1)
        x = x * torch.rsqrt(mean_square + self.eps)
        return self.weight * x.to(input_dtype)

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.eps}"


class SwiGLU(nn.Module):
    """``down_proj(silu(gate_proj(x)) * up_proj(x))``, LLaMA's feed-forward block (Shazeer 2020).

    A gated linear unit: one projection, through SiLU, decides feature by feature how much of the
    other gets through. At equal parameters it reaches lower loss than a plain MLP, so LLaMA,
    Mistral, Qwen and Gemma all use a GLU variant; with three matrices instead of two, the width
    shrinks to about ``8/3 * hidden_size`` to keep a 4x MLP's parameter count.

    Args:
        hidden_size: model width ``C``.
        intermediate_size: inner width (LLaMA-7B: 11008 for C = 4096).
        bias: biases on the three projections (LLaMA: no).
    """

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # (B, T, C) -> two (B, T, I) branches, gated elementwise -> (B, T, C)
        return self.down_proj(F.silu(self.gate_proj(hidden_states)) * self.up_proj(hidden_states))


def llama3_scaled_inv_freq(
    inv_freq: torch.Tensor,
    factor: float,
    low_freq_factor: float,
    high_freq_factor: float,
    original_max_position_embeddings: int,
) -> torch.Tensor:
    """Llama 3's rotary frequencies for a longer context: slow pairs slowed down, fast pairs left alone.

    Pair ``i`` turns by ``theta_i`` per position, so it completes one turn every ``2 pi / theta_i``
    positions (its wavelength). Llama 3 was pretrained at 8K tokens, then extended to 128K. Stretching
    every rotation by ``factor`` (position interpolation) would keep all angles inside the range seen in
    pretraining, but it also blurs the fast pairs that tell neighbouring tokens apart. Llama 3 splits
    the pairs by wavelength, measured against the pretraining context ``L``:

    * wavelength shorter than ``L / high_freq_factor``: many full turns within ``L`` already, so a
      longer context shows them no new angle: left as they are (local order stays sharp);
    * wavelength longer than ``L / low_freq_factor``: never completed a turn in pretraining, so longer
      contexts would show angles never seen: divided by ``factor`` (interpolated);
    * in between: a linear blend of the two, weighted by where ``L / wavelength`` falls between
      ``low_freq_factor`` and ``high_freq_factor``, so no pair jumps.

    The blend weight clamped to [0, 1] covers all three bands in one expression. Llama-3.1/3.2 ship
    ``factor=8`` (3.2's small models 32), ``low_freq_factor=1``, ``high_freq_factor=4``, ``L=8192``.

    Args:
        inv_freq: plain RoPE frequencies ``theta_i``, shape (D/2,).
        factor, low_freq_factor, high_freq_factor, original_max_position_embeddings: as in
            transformers' ``rope_parameters`` for ``rope_type="llama3"``.
    """
    wavelength = 2 * math.pi / inv_freq  # (D/2,): positions per full turn
    # 1 (keep) for the fast pairs, 0 (interpolate) for the slow ones, linear in between.
    keep = (original_max_position_embeddings / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor)
    keep = keep.clamp(0.0, 1.0)
    return (1 - keep) * inv_freq / factor + keep * inv_freq


class RotaryEmbedding(nn.Module):
    """The rotate-half ``cos``/``sin`` tables of rotary position embeddings (RoPE, Su et al. 2021), as ``LlamaRotaryEmbedding``.

    Attention alone is blind to order. RoPE rotates each query and key by its position: a head's
    ``D`` features form ``D/2`` pairs, and pair ``i`` at position ``m`` turns by ``m * theta_i``, with
    ``theta_i = base ** (-2i / D)``. Since ``<R(m) q, R(n) k> = <q, R(n - m) k>``, the score between two
    tokens depends on their distance only, with no parameters and no table to outgrow.

    Which features pair up is a convention: transformers pairs ``(x_i, x_{i + D/2})`` ("rotate
    half"), Meta's original LLaMA code pairs neighbours (``hf_models.conversion.rotary_layout`` holds
    that reference and the row permutation between the two). Mixing them up does not crash: the
    model runs and even writes grammar, with far worse perplexity, which is why the tests compare
    logits. One table per forward serves every layer.

    Args:
        head_dim: per-head feature size ``D`` (even).
        base: ``theta``, the frequency ladder's base (``rope_theta`` in transformers configs).
        frequency_scaling: ``None``, or Llama 3's ``{"rope_type": "llama3", ...}`` (:func:`llama3_scaled_inv_freq`).
    """

    def __init__(self, head_dim: int, base: float = 10000.0, frequency_scaling: dict | None = None) -> None:
        super().__init__()
        if head_dim % 2 != 0:
            raise ValueError(f"RotaryEmbedding head_dim must be even, got {head_dim}.")
        self.head_dim = head_dim
        self.base = base
        self.frequency_scaling = frequency_scaling
        # Not saved (recomputed from the config): the model's _init_weights refills it after a meta-device build.
        self.register_buffer("inv_freq", self.compute_inv_freq(), persistent=False)

    def compute_inv_freq(self, device: torch.device | None = None) -> torch.Tensor:
        """``theta_i = base ** (-2i / D)`` for ``i = 0 .. D/2 - 1``, float32, shape (D/2,)."""
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=device) / self.head_dim
        inv_freq = 1.0 / (self.base**exponents)
        scaling = self.frequency_scaling
        if scaling is not None:
            inv_freq = llama3_scaled_inv_freq(inv_freq, scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"],
                                              scaling["original_max_position_embeddings"])
        return inv_freq

    @torch.no_grad()
    def forward(self, position_ids: torch.LongTensor, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin)``, each (B, T, D), for integer ``position_ids`` of shape (B, T)."""
        # Angles in float32: position * theta loses whole radians in bf16 beyond a few hundred tokens.
        freqs = position_ids[..., None].float() * self.inv_freq  # (B, T, 1) * (D/2,) -> (B, T, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, D): rotate-half layout
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def extra_repr(self) -> str:
        scaling = f", scaling={self.frequency_scaling['rope_type']}" if self.frequency_scaling else ""
        return f"head_dim={self.head_dim}, base={self.base}{scaling}"


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``(x1, x2) -> (-x2, x1)`` on the two halves of the last dimension: a 90-degree turn of each pair."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate queries (B, H, T, D) and keys (B, H_kv, T, D) by ``cos``/``sin`` of shape (B, T, D)."""
    cos = cos.unsqueeze(1)  # (B, T, D) -> (B, 1, T, D), broadcast over heads
    sin = sin.unsqueeze(1)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def repeat_kv(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    """Repeat each K/V head ``n_rep`` times: (B, H_kv, S, D) -> (B, H_kv * n_rep, S, D), so GQA's math is plain MHA."""
    if n_rep == 1:
        return hidden_states
    batch, num_kv_heads, seq_len, head_dim = hidden_states.shape
    hidden_states = hidden_states[:, :, None].expand(batch, num_kv_heads, n_rep, seq_len, head_dim)
    return hidden_states.reshape(batch, num_kv_heads * n_rep, seq_len, head_dim)


# Copied from hf_models.modeling_gpt.bottom_right_causal_mask
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
    """Lesson 4's reference attention with grouped K/V heads. q: (B, H, T, D), k/v: (B, H_kv, S, D).

    Returns the output (B, T, H, D) and the weights (B, H, T, S), as lesson 4's. Multi-head
    (``H_kv = H``), grouped-query (``H_kv`` groups) and multi-query (``H_kv = 1``) are one code
    path: each K/V head is repeated for the ``H / H_kv`` query heads that share it.
    """
    query_length, key_length = query.shape[-2], key.shape[-2]
    n_rep = query.shape[1] // key.shape[1]
    key = repeat_kv(key, n_rep)  # (B, H_kv, S, D) -> (B, H, S, D)
    value = repeat_kv(value, n_rep)
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
    """Fused attention via ``F.scaled_dot_product_attention``; SDPA shares each K/V head inside the kernel
    (``enable_gqa``) without materialising the copies. Same contract as :func:`eager_attention`."""
    query_length, key_length = query.shape[-2], key.shape[-2]
    is_causal = False
    if attention_mask is None and query_length > 1:
        # SDPA's `is_causal` aligns the mask top-left, which is only right when T == S.
        if query_length == key_length:
            is_causal = True
        else:
            attention_mask = bottom_right_causal_mask(query_length, key_length, query.device)
    output = F.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, is_causal=is_causal, scale=scaling,
        enable_gqa=query.shape[1] != key.shape[1],
    )
    return output.transpose(1, 2), None  # (B, H, T, D) -> (B, T, H, D)


# Copied from hf_models.modeling_gpt.ATTENTION_FUNCTIONS
ATTENTION_FUNCTIONS: dict[str, Callable[..., tuple]] = {"eager": eager_attention, "sdpa": sdpa_attention}


# Copied from hf_models.modeling_gpt.attention_function
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


# Copied from hf_models.modeling_gpt.mask_for_backend
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


# Copied from hf_models.modeling_gpt.mask_lengths
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


# Copied from hf_models.modeling_gpt.build_causal_mask
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


# Copied from hf_models.modeling_gpt.position_ids_for
def position_ids_for(attention_mask: torch.Tensor | None, past_length: int, query_length: int, device: torch.device) -> torch.Tensor:
    """Absolute positions of the new tokens: (1, T) without padding; (B, T) counted from each row's
    first real token with left padding, so a padded prompt gets the positions it would get alone."""
    if attention_mask is not None and attention_mask.dim() == 2 and mask_has_padding(attention_mask, past_length):
        return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -query_length:]  # (B, T)
    return (torch.arange(query_length, device=device) + past_length)[None]  # (1, T)


class ModernAttention(nn.Module):
    """Grouped-query causal self-attention with rotary positions: LLaMA's ``q_proj``/``k_proj``/``v_proj``/``o_proj``.

    K and V are projected to ``H_kv`` heads only; each is shared by ``H / H_kv`` query heads. During
    generation every new token reads the whole KV cache from memory, so the cache's size (``2 *
    layers * H_kv * D`` numbers per token) is decoding's bottleneck, and GQA divides it by ``H / H_kv``.
    Positions enter here, as a rotation of q and k (not of v) before the cache stores k.

    Args:
        config: the model's :class:`ModernDecoderConfig`.
        layer_idx: this layer's slot in the KV cache.
    """

    def __init__(self, config: ModernDecoderConfig, layer_idx: int) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scaling = self.head_dim**-0.5
        self.layer_idx = layer_idx
        self.attention_dropout = config.attention_dropout
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=config.attention_bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_key_value_heads * self.head_dim, bias=config.attention_bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_key_value_heads * self.head_dim, bias=config.attention_bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=config.attention_output_bias)
        self.is_causal = True  # read by transformers' attention backends
        self.num_key_value_groups = self.num_heads // self.num_key_value_heads

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        past_key_values: Cache | None,
        attn_implementation: str | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, T, C) -> (B, T, C), and the attention weights (B, H, T, S) where the backend computes them.
        ``position_embeddings`` is ``(cos, sin)`` from :class:`RotaryEmbedding`."""
        batch_size, query_length, _ = hidden_states.shape
        head_shape = (batch_size, query_length, -1, self.head_dim)
        query = self.q_proj(hidden_states).view(head_shape).transpose(1, 2)  # (B, T, H*D) -> (B, T, H, D) -> (B, H, T, D)
        key = self.k_proj(hidden_states).view(head_shape).transpose(1, 2)  # (B, T, H_kv*D) -> (B, H_kv, T, D)
        value = self.v_proj(hidden_states).view(head_shape).transpose(1, 2)
        cos, sin = position_embeddings
        query, key = apply_rotary(query, key, cos, sin)
        if past_key_values is not None:
            key, value = past_key_values.update(key, value, self.layer_idx)  # -> (B, H_kv, S, D)
        dropout = self.attention_dropout if self.training else 0.0
        attend = attention_function(attn_implementation)
        output, weights = attend(self, query, key, value, attention_mask, dropout=dropout, scaling=self.scaling)
        output = output.reshape(batch_size, query_length, -1)  # (B, T, H, D) -> (B, T, H*D)
        return self.o_proj(output), weights

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, kv_heads={self.num_key_value_heads}, head_dim={self.head_dim}, layer_idx={self.layer_idx}"


# Copied from hf_models.modeling_gpt.dropout_or_identity
def dropout_or_identity(rate: float) -> nn.Module:
    """``nn.Dropout(rate)``, or nothing at all at rate 0: at width 128 even a no-op module costs time per step."""
    return nn.Dropout(rate) if rate > 0 else nn.Identity()


class ModernDecoderLayer(GradientCheckpointingLayer):
    """Lesson 4's pre-norm block with RMSNorm, rotary attention and SwiGLU: ``x + attn(norm(x))``, ``x + mlp(norm(x))``."""

    def __init__(self, config: ModernDecoderConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.self_attn = ModernAttention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = SwiGLU(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.residual_dropout = dropout_or_identity(config.dropout)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attn_implementation: str | None,
        past_key_values: Cache | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The new hidden states (B, T, C) and the attention weights (B, H, T, S), or ``None`` (SDPA)."""
        attended, weights = self.self_attn(
            self.input_layernorm(hidden_states), attention_mask, position_embeddings, past_key_values, attn_implementation
        )
        hidden_states = hidden_states + self.residual_dropout(attended)
        return hidden_states + self.residual_dropout(self.mlp(self.post_attention_layernorm(hidden_states))), weights


class ModernDecoderPreTrainedModel(ZooPreTrainedModel):
    """The modern decoder's init and transformers flags, shared by the backbone and the causal LM."""

    config_class = ModernDecoderConfig
    # One decoding step traces into one graph with lesson 6's static cache (tests/test_generation_features.py).
    _can_compile_fullgraph = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _no_split_modules = ["ModernDecoderLayer"]
    has_attention_weights = True

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, RotaryEmbedding):
            # A non-persistent buffer: not in the checkpoint, so from_pretrained must recompute it.
            init.copy_(module.inv_freq, module.compute_inv_freq(module.inv_freq.device))

    # Copied from hf_models.modeling_gpt.GPTPreTrainedModel.new_cache
    def new_cache(self, static: bool | None = None, max_cache_len: int | None = None) -> Cache:
        """Lesson 6's cache: static or growing as ``static`` (else ``config.kv_cache``) says; see ``ZooPreTrainedModel.new_cache``."""
        if self.config.kv_cache == "static" if static is None else static:
            max_cache_len = max_cache_len or self.config.max_position_embeddings
            return StaticKVCache(max_cache_len=max_cache_len, num_layers=self.config.num_hidden_layers)
        return GrowingKVCache(num_layers=self.config.num_hidden_layers)


class ModernDecoderModel(ModernDecoderPreTrainedModel):
    """The modern backbone: ids (B, T) -> hidden states (B, T, C) after the final RMSNorm (``AutoModel``)."""

    def __init__(self, config: ModernDecoderConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.rotary_emb = RotaryEmbedding(config.head_dim, base=config.rope_theta, frequency_scaling=config.rope_frequency_scaling)
        self.dropout = dropout_or_identity(config.dropout)
        self.layers = nn.ModuleList(ModernDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
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
        position_embeddings = self.rotary_emb(position_ids, inputs_embeds.dtype)  # one (cos, sin) for every layer
        hidden_states = self.dropout(inputs_embeds)
        all_hidden_states = [] if output_hidden_states else None
        all_attentions = [] if output_attentions else None
        for layer in self.layers:
            if all_hidden_states is not None:
                all_hidden_states.append(hidden_states)
            hidden_states, weights = layer(hidden_states, mask, position_embeddings, attn_implementation, past_key_values=cache)
            if all_attentions is not None:
                all_attentions.append(weights)
        hidden_states = self.norm(hidden_states)
        if all_hidden_states is not None:
            all_hidden_states.append(hidden_states)
        return self.model_output(hidden_states, cache, all_hidden_states, return_dict, all_attentions)


# Copied from hf_models.modeling_gpt.GPTForCausalLM with GPT->ModernDecoder
class ModernDecoderForCausalLM(ModernDecoderPreTrainedModel, GenerationMixin):
    """The ModernDecoder backbone (``self.model``) and an LM head tied to its token embedding.

    Generation uses lesson 6's hand-written KV cache by default (``config.kv_cache``: "growing" or
    "static"); any transformers ``Cache`` passed as ``past_key_values`` works too.
    """

    base_model_class = ModernDecoderModel
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: ModernDecoderConfig):
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


__all__ = ["ModernDecoderForCausalLM", "ModernDecoderModel", "ModernDecoderPreTrainedModel"]
