"""Lesson 12: the configurable decoder, every block of lessons 4-10 behind a config switch.

A research engineer's question is rarely "is this model good?" but "what does *this* change buy?".
Answering it needs two models that differ in exactly one choice and agree on everything else:
the same data, token budget, optimiser, seed and code path. This model makes each choice of the
curriculum one field of :class:`ConfigurableDecoderConfig`:

==============  =========================================  ===========================
choice          options                                    lesson
==============  =========================================  ===========================
norm            LayerNorm, RMSNorm (pre-norm); QK-norm      4, 5, 12
positions       learned table, rotary, none (NoPE)          4, 5, 12
feed-forward    GELU MLP, SwiGLU, mixture of experts        4, 5, 10
attention       multi-head, grouped-query, multi-query;     4, 5, 6
                fused or separate q/k/v
biases          on (GPT-2) or off (LLaMA)                   4, 5
embeddings      tied or untied LM head                      4
==============  =========================================  ===========================

Nothing here is new code: every block is the one its lesson wrote, copied from that lesson's file
under a ``# Copied from`` marker that ``utils/check_copies.py`` keeps identical. That is what makes
the ablation honest (a SwiGLU here *is* lesson 5's SwiGLU) and what makes the presets exact:
``ConfigurableDecoderConfig.preset("gpt")`` builds lesson 4's modules under lesson 4's names, so a GPT
checkpoint loads unchanged and gives the same logits (``hf_models.conversion.configurable`` converts
folders both ways). This file is where the toggles live; the lesson files hold none they do not use.

Two choices appear only here. **QK-norm** (Dehghani et al. 2023, ViT-22B; OLMo 2, Qwen3, Gemma 3):
without it the attention logits ``q . k`` grow with the norms of q and k during training until the
softmax saturates into one-hot rows whose gradients vanish; normalising each head's q and k bounds
the logits, so the temperature of attention is a parameter, not an accident. **NoPE** (no positions
at all): a causal decoder can still infer order, since token ``t`` attends to exactly ``t + 1`` keys.

The MoE outputs (router logits, ``aux_loss``) are lesson 10's; with a dense feed-forward the router
logits are absent and ``aux_loss`` is 0 when asked for (trl's trainers ask whenever a config has
``output_router_logits``).
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
from transformers.modeling_outputs import MoeCausalLMOutputWithPast, MoeModelOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .causal_lm import CACHE_FIELD, ZooPreTrainedModel, is_tracing, keep_last_positions, mask_has_padding, take_loss_kwargs
from .configuration_configurable import ConfigurableDecoderConfig
from .kv_cache import GrowingKVCache, StaticKVCache


# Copied from hf_models.modeling_gpt.LayerNorm
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


# Copied from hf_models.modeling_modern.RMSNorm
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


# Copied from hf_models.modeling_gpt.GELU_ACTIVATIONS
GELU_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "gelu_new": partial(F.gelu, approximate="tanh"),
    "gelu_pytorch_tanh": partial(F.gelu, approximate="tanh"),
}


# Copied from hf_models.modeling_gpt.GPTMLP with GPTMLP->GELUMLP
class GELUMLP(nn.Module):
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


# Copied from hf_models.modeling_modern.SwiGLU
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


# Copied from hf_models.modeling_modern.llama3_scaled_inv_freq
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


# Copied from hf_models.modeling_modern.RotaryEmbedding
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


# Copied from hf_models.modeling_modern.rotate_half
def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``(x1, x2) -> (-x2, x1)`` on the two halves of the last dimension: a 90-degree turn of each pair."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


# Copied from hf_models.modeling_modern.apply_rotary
def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate queries (B, H, T, D) and keys (B, H_kv, T, D) by ``cos``/``sin`` of shape (B, T, D)."""
    cos = cos.unsqueeze(1)  # (B, T, D) -> (B, 1, T, D), broadcast over heads
    sin = sin.unsqueeze(1)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


# Copied from hf_models.modeling_modern.repeat_kv
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


# Copied from hf_models.modeling_modern.eager_attention
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


# Copied from hf_models.modeling_modern.sdpa_attention
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


# Copied from hf_models.modeling_modern.ATTENTION_FUNCTIONS
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


def build_norm(config: ConfigurableDecoderConfig, size: int | None = None) -> nn.Module:
    """The config's norm (``norm``: "layernorm" or "rmsnorm") over ``size`` features (default: the model width)."""
    size = config.hidden_size if size is None else size
    if config.norm == "layernorm":
        return LayerNorm(size, eps=config.norm_eps, bias=config.bias)
    return RMSNorm(size, eps=config.norm_eps)


class ConfigurableAttention(nn.Module):
    """Lessons 4 and 5's attention with every choice a switch: heads (MHA/GQA/MQA), fused or separate q/k/v,
    biases, QK-norm, rotary or no position rotation.

    Args:
        config: the model's :class:`ConfigurableDecoderConfig`.
        layer_idx: this layer's slot in the KV cache.
    """

    def __init__(self, config: ConfigurableDecoderConfig, layer_idx: int) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scaling = self.head_dim**-0.5
        self.layer_idx = layer_idx
        self.attention_dropout = config.attention_dropout
        self.fused_qkv = config.fused_qkv
        self.qkv_sizes = (self.num_heads * self.head_dim, self.num_key_value_heads * self.head_dim, self.num_key_value_heads * self.head_dim)
        if config.fused_qkv:
            self.qkv_proj = nn.Linear(config.hidden_size, sum(self.qkv_sizes), bias=config.bias)  # GPT-2's c_attn
        else:
            self.q_proj = nn.Linear(config.hidden_size, self.qkv_sizes[0], bias=config.bias)
            self.k_proj = nn.Linear(config.hidden_size, self.qkv_sizes[1], bias=config.bias)
            self.v_proj = nn.Linear(config.hidden_size, self.qkv_sizes[2], bias=config.bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=config.bias)
        self.o_proj.is_residual_projection = True  # see ConfigurableDecoderPreTrainedModel._init_weights
        # QK-norm: the model's norm type over each head's D features.
        self.q_norm = build_norm(config, self.head_dim) if config.qk_norm else None
        self.k_norm = build_norm(config, self.head_dim) if config.qk_norm else None
        self.is_causal = True  # read by transformers' attention backends
        self.num_key_value_groups = self.num_heads // self.num_key_value_heads

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        past_key_values: Cache | None = None,
        attn_implementation: str | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, T, C) -> (B, T, C), and the attention weights (B, H, T, S) where the backend computes them;
        RoPE is applied only when ``position_embeddings`` (cos, sin) are given."""
        batch_size, query_length, _ = hidden_states.shape
        head_shape = (batch_size, query_length, -1, self.head_dim)
        if self.fused_qkv:
            # (B, T, (H + 2 H_kv) D) -> three views (B, T, H*D), (B, T, H_kv*D), (B, T, H_kv*D)
            query, key, value = self.qkv_proj(hidden_states).split(self.qkv_sizes, dim=-1)
        else:
            query, key, value = self.q_proj(hidden_states), self.k_proj(hidden_states), self.v_proj(hidden_states)
        query, key = query.view(head_shape), key.view(head_shape)  # (B, T, H*D) -> (B, T, H, D)
        if self.q_norm is not None:
            query, key = self.q_norm(query), self.k_norm(key)  # each head over its D features
        query = query.transpose(1, 2)  # (B, T, H, D) -> (B, H, T, D)
        key = key.transpose(1, 2)  # (B, T, H_kv, D) -> (B, H_kv, T, D)
        value = value.view(head_shape).transpose(1, 2)  # (B, T, H_kv*D) -> (B, H_kv, T, D)
        if position_embeddings is not None:
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
        return (
            f"heads={self.num_heads}, kv_heads={self.num_key_value_heads}, head_dim={self.head_dim}, "
            f"fused_qkv={self.fused_qkv}, qk_norm={self.q_norm is not None}, layer_idx={self.layer_idx}"
        )


# How MoEExperts runs its per-expert matmuls: "grouped_mm" or "sorted_runs" (see MoEExperts). grouped_mm: on a GPU
# one kernel with no host read; on CPU, where torch._grouped_mm is itself a loop of one matmul per expert, it measured
# a little ahead in training and level with sorted_runs at batch-1 decoding (benchmarks/moe_dispatch.py, 2 cores).
# A model can switch with `block.experts.dispatch = ...`.
MOE_DISPATCH = "grouped_mm"


# Copied from hf_models.modeling_moe.register_legacy_expert_layout
def register_legacy_expert_layout(model_type: str) -> None:
    """Teach ``from_pretrained`` the layout of folders saved before the experts were fused.

    Those folders hold one ``nn.Linear`` per expert and projection, ``mlp.experts.<e>.gate_proj.weight``
    (I, C), ``up_proj`` (I, C) and ``down_proj`` (C, I). transformers 5 converts checkpoint keys on
    load with ``WeightConverter``s (as it does for Mixtral's own old ``w1/w2/w3`` checkpoints): the
    per-expert matrices are stacked over ``e`` and gate and up concatenated into ``gate_up_proj``.
    The zoo saves the fused layout only (``save_original_format=False`` in ``save_pretrained``).
    """
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping
    from transformers.core_model_loading import Concatenate, MergeModulelist, WeightConverter

    if get_checkpoint_conversion_mapping(model_type) is not None:
        return
    register_checkpoint_conversion_mapping(model_type, [
        WeightConverter(
            source_patterns=[".experts.*.gate_proj.weight", ".experts.*.up_proj.weight"],
            target_patterns=".experts.gate_up_proj",
            operations=[MergeModulelist(dim=0), Concatenate(dim=1)],  # E x (I, C) twice -> (E, I, C) twice -> (E, 2I, C)
        ),
        WeightConverter(
            source_patterns=[".experts.*.down_proj.weight"],
            target_patterns=".experts.down_proj",
            operations=[MergeModulelist(dim=0)],  # E x (C, I) -> (E, C, I)
        ),
    ])


register_legacy_expert_layout(ConfigurableDecoderConfig.model_type)


# Copied from hf_models.modeling_moe.TopKRouter
class TopKRouter(nn.Module):
    """Scores the experts for each token and keeps the ``k`` best, with weights renormalised to sum to 1.

    The softmax runs in float32 whatever the activations' dtype: routing decisions flip on small
    logit differences, and bf16 has 8 bits of mantissa. Renormalising over the chosen ``k`` (Mixtral)
    keeps the output's scale independent of how confident the router is, and the router still learns
    from the task loss through the ratio of the ``k`` weights. At ``k = 1`` that ratio is gone (the
    weight is always 1) and the router learns from the balancing loss alone, which is why Switch
    (``k = 1``) scales the expert's output by the raw probability instead (transformers' Qwen2-MoE
    makes the choice a config field, ``norm_topk_prob``; this router always renormalises, as Mixtral).

    Args:
        hidden_size: model width ``C``.
        num_experts: ``E``.
        top_k: ``k``, experts per token, ``1 <= k <= E``.
    """

    def __init__(self, hidden_size: int, num_experts: int, top_k: int) -> None:
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"TopKRouter top_k must be in [1, num_experts={num_experts}], got {top_k}.")
        self.num_experts = num_experts
        self.top_k = top_k
        # (E, C): a bare parameter, not an nn.Linear, so int8/NF4 and "all-linear" LoRA leave routing alone.
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(N, C) -> router logits (N, E), top-k weights (N, k) in float32, top-k expert ids (N, k)."""
        logits = F.linear(hidden_states, self.weight)  # (N, E)
        probs = torch.softmax(logits.float(), dim=-1)
        weights, experts = torch.topk(probs, self.top_k, dim=-1)  # (N, k)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        return logits, weights, experts

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, top_k={self.top_k}"


# Copied from hf_models.modeling_moe.MoEExperts
class MoEExperts(nn.Module):
    """``E`` SwiGLU experts in Mixtral's fused layout, dropless, run only on the tokens routed to them.

    Layout (transformers 5's ``MixtralExperts``, so converting to Mixtral is a rename)::

        gate_up_proj  (E, 2I, C)   rows [:I] the SwiGLU gate, rows [I:] the up projection
        down_proj     (E, C, I)

    Why fused: one (E, ...) tensor per projection instead of ``3 * E`` ``nn.Linear`` modules. The
    gate and up projections read the same input, so one (2I, C) matmul replaces two (I, C) ones
    (2 matmuls per expert instead of 3); a single 3-D tensor is what a grouped GEMM takes whole; the
    checkpoint is Mixtral's. The price: the experts are no longer ``nn.Linear``, so LoRA reaches them
    through ``target_parameters`` (peft's ``ParamWrapper``, lesson 8's ``hf_models.adapters``) and
    bitsandbytes, which only swaps ``nn.Linear`` layers, leaves them in full precision (lesson 9).

    Dispatch, in :meth:`forward`: the ``N * k`` (token, expert) slots are **sorted by expert** once
    (``argsort`` of the expert ids); each expert's tokens are then one contiguous run of the sorted
    batch, and each expert multiplies its run only, as dense matmuls. Nothing is computed for a token
    an expert does not see: a decode step with one token runs exactly its ``k`` experts. Two ways
    to run the per-expert matmuls over the runs, ``dispatch``:

    * ``"grouped_mm"``: ``torch._grouped_mm(x, W, offs)`` multiplies the run ending at ``offs[e]``
      by ``W[e]``, all experts in one call (the grouped GEMM of MegaBlocks and CUTLASS). The run
      ends stay on the device: no host read, so it is also what ``torch.compile`` traces in bf16.
    * ``"sorted_runs"``: the same as a Python loop of one matmul per expert over
      ``split(counts.tolist())``: readable, and one host read of the counts per layer.
    * ``"gathered"``: each slot multiplies its own expert's weights, gathered per slot (one ``bmm``):
      what ``torch.compile`` and ``torch.export`` trace in fp32, where ``_grouped_mm``'s tracing
      kernel accepts bf16 only; it copies k experts' weights per token, so it is for few tokens.

    ``benchmarks/moe_dispatch.py`` times the first two; :data:`MOE_DISPATCH` is the faster measured. At a
    decode step (one token, ``k`` slots) the matmuls are tiny and the bookkeeping around them is what
    costs: so the outputs go back to slot order by a copy (``index_copy_``) and each token sums its
    ``k`` rows, rather than a scatter-add into the tokens (``index_add_``), which on CPU cost a third
    or more of the layer there. Every dispatch runs only the chosen experts' matmuls; a per-token loop
    over the ``k`` chosen experts would save the sort too, but needs a host read of the expert ids
    (a stall on a GPU) for a few percent of a CPU decode step, so it is not another path here.

    At scale, **expert parallelism** (GShard, Lepikhin et al. 2020) puts different experts on
    different devices: the sorted runs are exactly what one all-to-all sends to each expert's device,
    and a second all-to-all brings the results back before the weighted sum.

    Args:
        hidden_size: model width ``C``.
        intermediate_size: each expert's SwiGLU width ``I``.
        num_experts: ``E``.
        bias: biases ``gate_up_proj_bias`` (E, 2I) and ``down_proj_bias`` (E, C) (Mixtral: no).
    """

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, bias: bool = False) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.intermediate_size = intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        self.gate_up_proj_bias = nn.Parameter(torch.zeros(num_experts, 2 * intermediate_size)) if bias else None
        self.down_proj_bias = nn.Parameter(torch.zeros(num_experts, hidden_size)) if bias else None
        self.dispatch = MOE_DISPATCH

    def forward(self, tokens: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """Tokens (N, C), top-k weights (N, k) and expert ids (N, k) -> the weighted sum of each token's experts (N, C)."""
        top_k = experts.shape[-1]
        flat_experts = experts.reshape(-1)  # (N*k,): slot s belongs to token s // k
        order = flat_experts.argsort(stable=True)  # (N*k,): the slots, expert 0's first
        token_of_slot = order // top_k  # (N*k,): the token of each sorted slot
        expert_of_slot = flat_experts[order]  # (N*k,): non-decreasing
        counts = torch.bincount(flat_experts, minlength=self.num_experts)  # (E,): the length of each run
        grouped = tokens[token_of_slot]  # (N*k, C): expert 0's run, then expert 1's, ...
        if is_tracing():  # torch.compile / torch.export: no host read; _grouped_mm's tracing kernel takes bf16 only
            run = self.grouped_mm_runs if self.gate_up_proj.dtype == torch.bfloat16 else self.gathered_runs
        else:
            run = {"grouped_mm": self.grouped_mm_runs, "sorted_runs": self.sorted_runs, "gathered": self.gathered_runs}[self.dispatch]
        expert_out = run(grouped, counts, expert_of_slot)  # (N*k, C), still in sorted order
        expert_out = expert_out * weights.reshape(-1)[order, None].to(expert_out.dtype)
        # Back to slot order, then each token sums its k slots. `order` is a permutation, so putting the rows
        # back is a copy (index_copy_; its backward a gather), not the scatter-add that index_add_(0,
        # token_of_slot, ...) would be: same sum, but on CPU that scatter-add took ~40 us even for one
        # token, as long as a grouped_mm (torch.profiler; a third or more of a decode step's MoE layer).
        slot_out = torch.empty_like(expert_out).index_copy_(0, order, expert_out)  # (N*k, C): row s is slot s
        return slot_out.view(-1, top_k, slot_out.shape[-1]).sum(dim=1).to(tokens.dtype)  # (N, k, C) -> (N, C)

    def swiglu(self, gate_up: torch.Tensor) -> torch.Tensor:
        """(M, 2I) -> (M, I): ``silu(gate) * up``, gate first as in ``MixtralExperts``."""
        gate, up = gate_up.chunk(2, dim=-1)  # (M, I) each
        return F.silu(gate) * up

    def grouped_mm_runs(self, grouped: torch.Tensor, counts: torch.Tensor, expert_of_slot: torch.Tensor) -> torch.Tensor:
        """All experts in one ``torch._grouped_mm`` per projection: rows up to ``offs[e]`` (exclusive of the previous run) times ``W[e]``."""
        offsets = counts.cumsum(0).to(torch.int32)  # (E,): where each run ends, on the device
        gate_up_proj, down_proj = self.gate_up_proj, self.down_proj
        if torch.is_autocast_enabled(grouped.device.type):
            # Autocast's op lists cover F.linear and bmm (the other dispatches) but not the private
            # _grouped_mm, which would run in fp32 beside a dense model's bf16 matmuls: cast as autocast would.
            dtype = torch.get_autocast_dtype(grouped.device.type)
            grouped, gate_up_proj, down_proj = grouped.to(dtype), gate_up_proj.to(dtype), down_proj.to(dtype)
        # _grouped_mm takes (M, K) @ (E, K, N): the transposes are views of Mixtral's (E, out, in) tensors.
        gate_up = torch._grouped_mm(grouped, gate_up_proj.transpose(1, 2), offs=offsets)  # (N*k, C) -> (N*k, 2I)
        if self.gate_up_proj_bias is not None:
            gate_up = gate_up + self.gate_up_proj_bias[expert_of_slot].to(gate_up.dtype)  # (N*k, 2I): each slot its expert's bias
        out = torch._grouped_mm(self.swiglu(gate_up), down_proj.transpose(1, 2), offs=offsets)  # (N*k, I) -> (N*k, C)
        if self.down_proj_bias is not None:
            out = out + self.down_proj_bias[expert_of_slot].to(out.dtype)
        return out

    def sorted_runs(self, grouped: torch.Tensor, counts: torch.Tensor, expert_of_slot: torch.Tensor) -> torch.Tensor:
        """One matmul per projection and expert, over that expert's run; experts with no tokens are skipped."""
        # Each stack read once: under a LoRA parametrization (lesson 8) every read recomputes W + BA.
        gate_up_proj, down_proj = self.gate_up_proj, self.down_proj
        outputs = []
        for e, run in enumerate(grouped.split(counts.tolist())):  # run: (n_e, C)
            if run.shape[0] == 0:
                continue
            gate_up_bias = None if self.gate_up_proj_bias is None else self.gate_up_proj_bias[e]
            down_bias = None if self.down_proj_bias is None else self.down_proj_bias[e]
            hidden = self.swiglu(F.linear(run, gate_up_proj[e], gate_up_bias))  # (n_e, C) -> (n_e, 2I) -> (n_e, I)
            outputs.append(F.linear(hidden, down_proj[e], down_bias))  # (n_e, C)
        return torch.cat(outputs)  # (N*k, C)

    def gathered_runs(self, grouped: torch.Tensor, counts: torch.Tensor, expert_of_slot: torch.Tensor) -> torch.Tensor:
        """Each slot times its own expert's weights, gathered per slot: one ``bmm`` per projection.

        No host read and no shape that depends on the routing, so it traces in any dtype; the price is a
        copy of each slot's expert weights ((N*k, 2I, C) and (N*k, C, I)): fine for the few tokens of a
        compiled or exported decoding step, too much for a long prefill, which runs eagerly.
        """
        gate_up_proj, down_proj = self.gate_up_proj, self.down_proj
        gate_up = torch.bmm(gate_up_proj[expert_of_slot], grouped.unsqueeze(-1)).squeeze(-1)  # (N*k, 2I, C) @ (N*k, C, 1) -> (N*k, 2I)
        if self.gate_up_proj_bias is not None:
            gate_up = gate_up + self.gate_up_proj_bias[expert_of_slot]
        out = torch.bmm(down_proj[expert_of_slot], self.swiglu(gate_up).unsqueeze(-1)).squeeze(-1)  # (N*k, C, I) @ (N*k, I, 1) -> (N*k, C)
        if self.down_proj_bias is not None:
            out = out + self.down_proj_bias[expert_of_slot]
        return out

    def extra_repr(self) -> str:
        E, two_i, C = self.gate_up_proj.shape
        return f"num_experts={E}, hidden_size={C}, intermediate_size={two_i // 2}, dispatch={self.dispatch}"


# Copied from hf_models.modeling_moe.SparseMoeBlock
class SparseMoeBlock(nn.Module):
    """A top-k routed mixture of SwiGLU experts (:class:`MoEExperts`): Mixtral's ``MixtralSparseMoeBlock``.

    In place of a dense FFN: (B, T, C) -> (B, T, C), returned with the router logits (B*T, E) that the
    model's balancing losses and the expert-load monitor (``hf_models.evaluation.expert_load``) read.

    Args:
        hidden_size: model width ``C``.
        intermediate_size: each expert's SwiGLU width.
        num_experts: ``E``.
        top_k: experts per token ``k``.
        bias: biases in the experts' projections (Mixtral: no).
    """

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, top_k: int, bias: bool = False) -> None:
        super().__init__()
        self.router = TopKRouter(hidden_size, num_experts, top_k)
        self.experts = MoEExperts(hidden_size, intermediate_size, num_experts, bias=bias)

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = hidden_states.shape
        tokens = hidden_states.reshape(-1, shape[-1])  # (B, T, C) -> (N, C)
        logits, weights, experts = self.router(tokens)  # (N, E), (N, k), (N, k)
        combined = self.experts(tokens, weights, experts)  # (N, C)
        return combined.reshape(shape), logits


# Copied from hf_models.modeling_moe._padding_weights
def _padding_weights(attention_mask: torch.Tensor | None, rows: int, device: torch.device) -> torch.Tensor | None:
    """The (N,) float weights of each router row: 1 for real tokens, 0 for padding; None without a 2-D mask.

    Router rows are the (B, T) positions of this forward, flattened; with a KV cache the mask covers
    the cached tokens too, so its last T columns are the ones that match.
    """
    if attention_mask is None or attention_mask.dim() != 2:
        return None
    batch = attention_mask.shape[0]
    return attention_mask[:, -(rows // batch):].reshape(-1).to(device=device, dtype=torch.float32)


# Copied from hf_models.modeling_moe.load_balancing_loss
def load_balancing_loss(
    router_logits: tuple[torch.Tensor, ...],
    num_experts: int,
    top_k: int,
    attention_mask: torch.Tensor | None = None,
    per_layer: bool = False,
) -> torch.Tensor:
    """Switch Transformer's balancing loss ``E * sum_e f_e * P_e`` (Fedus et al. 2021, eqs. 4-6).

    ``f_e``: the fraction of top-k routing slots given to expert ``e``; ``P_e``: the mean router
    probability of ``e``; padding (``attention_mask == 0``) excluded. Equals ``k`` for a perfectly
    uniform router; ``k * E`` when every token goes to the same ``k`` experts.

    ``per_layer=False`` is transformers' Mixtral: ``f`` and ``P`` are taken over every layer's
    tokens at once, so expert ``e`` of layer 1 and expert ``e`` of layer 2 (different experts)
    share one count, and layers can stay unbalanced as long as their imbalances cancel.
    ``per_layer=True`` is the Switch Transformer's: the loss of each layer, averaged over layers.

    Args:
        router_logits: one (N, E) tensor per layer.
        attention_mask: (B, S) with 1 for real tokens, or None.
    """
    if per_layer:
        return torch.stack([load_balancing_loss((logits,), num_experts, top_k, attention_mask) for logits in router_logits]).mean()
    device = router_logits[0].device
    mask = _padding_weights(attention_mask, router_logits[0].shape[0], device)
    slots = torch.zeros(num_experts, device=device)
    prob_sum = torch.zeros(num_experts, device=device)
    rows = torch.zeros((), device=device)
    for logits in router_logits:
        probs = torch.softmax(logits.float(), dim=-1)  # (N, E)
        chosen = torch.topk(probs, top_k, dim=-1).indices  # (N, k)
        weight = torch.ones(logits.shape[0], device=device) if mask is None else mask
        slots = slots.scatter_add(0, chosen.reshape(-1), weight.repeat_interleave(top_k))
        prob_sum = prob_sum + (probs * weight[:, None]).sum(dim=0)
        rows = rows + weight.sum()
    return num_experts * torch.sum((slots / rows) * (prob_sum / rows))


# Copied from hf_models.modeling_moe.router_z_loss
def router_z_loss(router_logits: tuple[torch.Tensor, ...], attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """ST-MoE's router z-loss (Zoph et al. 2022, eq. 5): mean over tokens of ``logsumexp(logits)^2``, averaged over layers.

    Penalises large router logits, which in bf16 make the softmax round badly and training diverge.
    Padding (``attention_mask == 0``) is excluded, as in the balancing loss.
    """
    device = router_logits[0].device
    mask = _padding_weights(attention_mask, router_logits[0].shape[0], device)
    total = torch.zeros((), device=device)
    for logits in router_logits:
        z = torch.logsumexp(logits.float(), dim=-1).square()  # (N,)
        total = total + (z.mean() if mask is None else (z * mask).sum() / mask.sum())
    return total / len(router_logits)


# Copied from hf_models.modeling_gpt.dropout_or_identity
def dropout_or_identity(rate: float) -> nn.Module:
    """``nn.Dropout(rate)``, or nothing at all at rate 0: at width 128 even a no-op module costs time per step."""
    return nn.Dropout(rate) if rate > 0 else nn.Identity()


def build_feed_forward(config: ConfigurableDecoderConfig) -> nn.Module:
    """The config's feed-forward: GPT-2's GELU MLP, LLaMA's SwiGLU or lesson 10's routed mixture of SwiGLU experts."""
    if config.feed_forward == "gelu":
        return GELUMLP(config.hidden_size, config.intermediate_size, bias=config.bias, activation=config.hidden_act)
    if config.feed_forward == "swiglu":
        mlp = SwiGLU(config.hidden_size, config.intermediate_size, bias=config.bias)
        mlp.down_proj.is_residual_projection = True  # as GELUMLP's: see ConfigurableDecoderPreTrainedModel._init_weights
        return mlp
    return SparseMoeBlock(config.hidden_size, config.intermediate_size, config.num_local_experts, config.num_experts_per_tok, bias=config.bias)


class ConfigurableDecoderLayer(GradientCheckpointingLayer):
    """The pre-norm block of lessons 4, 5 and 10; returns the new hidden states, the attention weights
    (``None`` from SDPA) and the router logits (``None`` when dense)."""

    def __init__(self, config: ConfigurableDecoderConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = build_norm(config)
        self.self_attn = ConfigurableAttention(config, layer_idx)
        self.post_attention_layernorm = build_norm(config)
        self.mlp = build_feed_forward(config)
        self.residual_dropout = dropout_or_identity(config.dropout)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None,
        attn_implementation: str | None,
        past_key_values: Cache | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        attended, weights = self.self_attn(
            self.input_layernorm(hidden_states), attention_mask, position_embeddings, past_key_values, attn_implementation
        )
        hidden_states = hidden_states + self.residual_dropout(attended)
        mixed = self.mlp(self.post_attention_layernorm(hidden_states))
        mixed, router_logits = mixed if isinstance(self.mlp, SparseMoeBlock) else (mixed, None)
        return hidden_states + self.residual_dropout(mixed), weights, router_logits


class ConfigurableDecoderPreTrainedModel(ZooPreTrainedModel):
    """The configurable decoder's init (GPT-2's scaled residual init when the config asks, the rotary table, the router)."""

    config_class = ConfigurableDecoderConfig
    # One decoding step traces into one graph with lesson 6's static cache (tests/test_generation_features.py).
    _can_compile_fullgraph = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _no_split_modules = ["ConfigurableDecoderLayer"]
    has_attention_weights = True

    def context_limit(self) -> int | None:
        """Learned positions end at the table's length; rotary and no positions (NoPE) run past it."""
        return self.config.max_position_embeddings if self.config.positions == "learned" else None

    # Copied from hf_models.modeling_moe.MoEDecoderPreTrainedModel.save_pretrained
    def save_pretrained(self, save_directory, *args, **kwargs):
        # Always the fused layout: transformers would otherwise revert the legacy-layout converter on save.
        kwargs.setdefault("save_original_format", False)
        return super().save_pretrained(save_directory, *args, **kwargs)

    def _init_weights(self, module: nn.Module) -> None:
        residual = isinstance(module, nn.Linear) and getattr(module, "is_residual_projection", False)
        if residual and self.config.scale_residual_init:
            # GPT-2's scaled init, exactly as lesson 4's GPTPreTrainedModel does it (the MoE experts keep LLaMA's).
            std = self.config.initializer_range / math.sqrt(2 * self.config.num_hidden_layers)
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
            return
        super()._init_weights(module)
        if isinstance(module, RotaryEmbedding):
            # A non-persistent buffer: not in the checkpoint, so from_pretrained must recompute it.
            init.copy_(module.inv_freq, module.compute_inv_freq(module.inv_freq.device))
        elif isinstance(module, TopKRouter):
            init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
        elif isinstance(module, MoEExperts):
            # 3-D parameters the generic nn.Linear init does not see: LLaMA's normal init, zero biases.
            init.normal_(module.gate_up_proj, mean=0.0, std=self.config.initializer_range)
            init.normal_(module.down_proj, mean=0.0, std=self.config.initializer_range)
            for bias in (module.gate_up_proj_bias, module.down_proj_bias):
                if bias is not None:
                    init.zeros_(bias)

    # Copied from hf_models.modeling_gpt.GPTPreTrainedModel.new_cache
    def new_cache(self, static: bool | None = None, max_cache_len: int | None = None) -> Cache:
        """Lesson 6's cache: static or growing as ``static`` (else ``config.kv_cache``) says; see ``ZooPreTrainedModel.new_cache``."""
        if self.config.kv_cache == "static" if static is None else static:
            max_cache_len = max_cache_len or self.config.max_position_embeddings
            return StaticKVCache(max_cache_len=max_cache_len, num_layers=self.config.num_hidden_layers)
        return GrowingKVCache(num_layers=self.config.num_hidden_layers)


class ConfigurableDecoderModel(ConfigurableDecoderPreTrainedModel):
    """The configurable backbone: ids (B, T) -> hidden states after the final norm (``AutoModel``), and the router logits of a routed model."""

    def __init__(self, config: ConfigurableDecoderConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        learned, rope = config.positions == "learned", config.positions == "rope"
        self.embed_positions = nn.Embedding(config.max_position_embeddings, config.hidden_size) if learned else None
        self.rotary_emb = RotaryEmbedding(config.head_dim, base=config.rope_theta) if rope else None
        self.dropout = dropout_or_identity(config.dropout)
        self.layers = nn.ModuleList(ConfigurableDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = build_norm(config)
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
        output_router_logits: bool | None = None,
        **kwargs,
    ) -> MoeModelOutputWithPast | tuple:
        output_attentions, output_hidden_states = self.output_flags(output_attentions, output_hidden_states)
        cache, past_length, seq_len = self.start_forward(input_ids, inputs_embeds, past_key_values, use_cache, output_attentions, kwargs)
        if output_router_logits is None:
            output_router_logits = self.config.output_router_logits
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
        hidden_states = inputs_embeds
        if self.embed_positions is not None:
            hidden_states = hidden_states + self.embed_positions(position_ids)  # + (B or 1, T, C)
        position_embeddings = self.rotary_emb(position_ids, hidden_states.dtype) if self.rotary_emb is not None else None
        hidden_states = self.dropout(hidden_states)
        all_hidden_states = [] if output_hidden_states else None
        all_attentions = [] if output_attentions else None
        all_router_logits = []
        for layer in self.layers:
            if all_hidden_states is not None:
                all_hidden_states.append(hidden_states)
            hidden_states, weights, router_logits = layer(hidden_states, mask, position_embeddings, attn_implementation, past_key_values=cache)
            if router_logits is not None:
                all_router_logits.append(router_logits)
            if all_attentions is not None:
                all_attentions.append(weights)
        hidden_states = self.norm(hidden_states)
        if all_hidden_states is not None:
            all_hidden_states.append(hidden_states)
        output = MoeModelOutputWithPast(
            last_hidden_state=hidden_states,
            hidden_states=tuple(all_hidden_states) if all_hidden_states is not None else None,
            attentions=tuple(all_attentions) if all_attentions is not None else None,
            router_logits=tuple(all_router_logits) if output_router_logits and all_router_logits else None,
            **{CACHE_FIELD: cache},
        )
        return output if self.wants_dict(return_dict) else output.to_tuple()


class ConfigurableDecoderForCausalLM(ConfigurableDecoderPreTrainedModel, GenerationMixin):
    """The configurable backbone (``self.model``) and an LM head, tied to the embedding unless the config says not."""

    base_model_class = ConfigurableDecoderModel
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: ConfigurableDecoderConfig):
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
        output_router_logits: bool | None = None,
        **kwargs,
    ) -> MoeCausalLMOutputWithPast | tuple:
        loss_kwargs = take_loss_kwargs(kwargs, shift_labels)
        if output_router_logits is None:
            output_router_logits = self.config.output_router_logits
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            output_router_logits=output_router_logits,
            return_dict=True,
            **kwargs,
        )
        logits = self.lm_head(keep_last_positions(outputs.last_hidden_state, logits_to_keep))  # (B, T, C) -> (B, T, V)
        loss = self.causal_lm_loss(logits, labels, loss_kwargs)
        aux_loss = None
        if output_router_logits and outputs.router_logits is None:
            # A dense feed-forward: nothing is unbalanced. A zero, not None, because clients that see
            # `output_router_logits` in the config (trl's trainers) ask for it and read `aux_loss` as a tensor.
            aux_loss = torch.zeros((), device=logits.device)
        elif output_router_logits:
            c = self.config
            # As Mixtral: padding is excluded from the balancing loss, which joins `loss` only with labels.
            aux_loss = load_balancing_loss(
                outputs.router_logits, c.num_local_experts, c.num_experts_per_tok, attention_mask, c.router_aux_loss_per_layer
            )
            if loss is not None:
                extra = c.router_aux_loss_coef * aux_loss
                if c.router_z_loss_coef:
                    extra = extra + c.router_z_loss_coef * router_z_loss(outputs.router_logits, attention_mask)
                loss = loss + extra.to(loss.device)
        output = MoeCausalLMOutputWithPast(
            loss=loss,
            aux_loss=aux_loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            router_logits=outputs.router_logits,
            **{CACHE_FIELD: getattr(outputs, CACHE_FIELD)},
        )
        return output if self.wants_dict(return_dict) else output.to_tuple()

    def num_active_parameters(self) -> int:
        """Parameters one token uses: all of a dense model; all but the ``E - k`` unchosen experts of a routed one."""
        c = self.config
        if c.feed_forward != "moe":
            return self.num_parameters()
        experts = self.model.layers[0].mlp.experts
        per_expert = sum(p.numel() for p in experts.parameters()) // experts.num_experts
        return self.num_parameters() - c.num_hidden_layers * (c.num_local_experts - c.num_experts_per_tok) * per_expert


__all__ = ["ConfigurableDecoderForCausalLM", "ConfigurableDecoderModel", "ConfigurableDecoderPreTrainedModel"]
