"""Causal self-attention: multi-head, grouped-query and multi-query in one module.

What
----
Scaled dot-product attention (Vaswani et al. 2017, "Attention Is All You Need") lets every token
read from every earlier token. Each token emits a query ``q``, a key ``k`` and a value ``v``; the
output at position ``t`` is the average of the values, weighted by how well ``q_t`` matches each
key::

    attention(Q, K, V) = softmax(Q K^T / sqrt(D) + mask) V

``sqrt(D)`` keeps the logits at unit scale as the head size ``D`` grows (a dot product of ``D``
unit-variance terms has variance ``D``), so the softmax does not saturate. The causal mask sets
the logits of future keys to -inf: the model cannot peek at the token it must predict. Running
``H`` such heads in parallel on ``D = C / H``-sized slices lets different heads track different
relations (syntax, coreference, copying) at the cost of one.

Multi-head, multi-query, grouped-query
--------------------------------------
During generation the keys and values of all past tokens are cached (see ``kv_cache.py``), and
every new token must read that whole cache from memory. With ``H`` key/value heads the cache is
``2 * layers * H * D`` numbers per token -- the memory-bandwidth bottleneck of decoding.

* **MHA** (Vaswani 2017): ``num_key_value_heads == num_attention_heads``.
* **MQA** (Shazeer 2019, "Fast Transformer Decoding: One Write-Head is All You Need"): one K/V
  head shared by all query heads; ``H`` times smaller cache, some quality loss.
* **GQA** (Ainslie et al. 2023): ``H_kv`` groups, each shared by ``H / H_kv`` query heads; almost
  MHA quality at almost MQA cost. LLaMA-2-70B, LLaMA-3, Mistral and Qwen use it.

Here all three are one code path: K/V are projected to ``H_kv`` heads and, in the eager reference,
each is repeated ``H / H_kv`` times (``repeat_kv``) so the math is plain MHA. SDPA does the
sharing inside the kernel (``enable_gqa=True``) without materialising the copies.

Implementations and masks
-------------------------
Like transformers (``config._attn_implementation`` -> ``ALL_ATTENTION_FUNCTIONS``), the math lives
in small functions selected by name from ``ATTENTION_FUNCTIONS``:

* ``"eager"`` -- the readable reference: scores, mask, float32 softmax, weighted sum;
* ``"sdpa"`` -- ``torch.nn.functional.scaled_dot_product_attention``, which dispatches to fused
  FlashAttention-style kernels (Dao et al. 2022) that never materialise the (T, S) score matrix.

Masks are built **once per forward** by ``build_causal_mask`` and shared by all layers. It returns
either ``None`` -- "plain causal, nothing else to hide", which lets SDPA take its fastest
``is_causal=True`` path -- or a boolean tensor (B or 1, 1, T, S), True = may attend, that folds in:

* the **cache offset**: query ``i`` sits at absolute position ``past_length + i`` and sees keys
  ``0 .. past_length + i``;
* **static caches** returning a key buffer longer than what is filled: the unfilled slots lie
  beyond every query's position, so causality already hides them;
* **left padding** from the 2-D (B, S) mask of 1/0. A padding *query* would have no visible key at
  all (its row fully masked gives NaN in a naive softmax), so every token may always attend to
  itself: padded rows stay finite and real rows are unchanged (a real token is never padding).

Frontier systems keep exactly this structure and swap the kernel: FlashAttention-2/3 on GPUs,
paged attention over block tables in serving engines (vLLM), ring/context parallelism to split
one long sequence's keys across devices. The projections and the mask semantics stay the same.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import Cache

from .rotary import apply_rotary

# `enable_gqa` arrived in torch 2.5; before that, K/V heads are repeated by hand.
_SDPA_HAS_ENABLE_GQA: bool = torch.__version__ >= "2.5"


def repeat_kv(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    """Repeat each K/V head ``n_rep`` times: (B, H_kv, S, D) -> (B, H_kv * n_rep, S, D)."""
    if n_rep == 1:
        return hidden_states
    batch, num_kv_heads, seq_len, head_dim = hidden_states.shape
    hidden_states = hidden_states[:, :, None].expand(batch, num_kv_heads, n_rep, seq_len, head_dim)
    return hidden_states.reshape(batch, num_kv_heads * n_rep, seq_len, head_dim)


def _bottom_right_causal_mask(query_length: int, key_length: int, device: torch.device) -> torch.Tensor:
    """(T, S) boolean causal mask for the last T of S positions: query i sees keys <= S - T + i."""
    return torch.ones(query_length, key_length, dtype=torch.bool, device=device).tril(key_length - query_length)


def eager_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
) -> torch.Tensor:
    """Reference attention. q: (B, H, T, D), k/v: (B, H_kv, S, D) -> (B, H, T, D).

    ``attention_mask``: ``None`` (causal), boolean (True = attend) or additive float, broadcastable
    to (B, H, T, S).
    """
    query_length, key_length = query.shape[-2], key.shape[-2]
    n_rep = query.shape[1] // key.shape[1]
    key = repeat_kv(key, n_rep)  # (B, H_kv, S, D) -> (B, H, S, D)
    value = repeat_kv(value, n_rep)

    scores = torch.matmul(query, key.transpose(-2, -1)) * scaling  # (B, H, T, S)
    if attention_mask is None and query_length > 1:
        attention_mask = _bottom_right_causal_mask(query_length, key_length, query.device)
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            # The dtype's minimum rather than -inf: a fully-masked row becomes uniform, not NaN.
            scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + attention_mask
    weights = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    if dropout > 0.0:
        weights = F.dropout(weights, p=dropout, training=True)
    return torch.matmul(weights, value)  # (B, H, T, S) @ (B, H, S, D) -> (B, H, T, D)


def sdpa_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
) -> torch.Tensor:
    """Fused attention via ``F.scaled_dot_product_attention``; same contract as ``eager_attention``."""
    query_length, key_length = query.shape[-2], key.shape[-2]
    is_causal = False
    if attention_mask is None and query_length > 1:
        # SDPA's `is_causal` aligns the mask top-left, which is only right when T == S.
        if query_length == key_length:
            is_causal = True
        else:
            attention_mask = _bottom_right_causal_mask(query_length, key_length, query.device)
    n_rep = query.shape[1] // key.shape[1]
    if n_rep > 1 and _SDPA_HAS_ENABLE_GQA:
        return F.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, dropout_p=dropout, is_causal=is_causal, scale=scaling,
            enable_gqa=True,
        )
    key = repeat_kv(key, n_rep)  # (B, H_kv, S, D) -> (B, H, S, D)
    value = repeat_kv(value, n_rep)
    return F.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, is_causal=is_causal, scale=scaling
    )


# (query, key, value, attention_mask, scaling, dropout) -> (B, H, T, D)
AttentionFunction = Callable[..., torch.Tensor]

ATTENTION_FUNCTIONS: dict[str, AttentionFunction] = {
    "eager": eager_attention,
    "sdpa": sdpa_attention,
}


def mask_lengths(past_key_values: Cache | None, query_length: int) -> tuple[int, int]:
    """``(past_length, key_length)`` for a forward of ``query_length`` new tokens, before the cache update.

    ``key_length`` is what ``past_key_values.update`` will return along the sequence axis: ``past +
    T`` for growing caches and for ``StaticKVCache`` (which returns the filled prefix), ``max_cache_len``
    for transformers' ``StaticCache`` (which returns its whole buffer).
    """
    if past_key_values is None:
        return 0, query_length
    past_length = int(past_key_values.get_seq_length())
    key_length, _ = past_key_values.get_mask_sizes(query_length, 0)
    return past_length, int(key_length)


def build_causal_mask(
    attention_mask: torch.Tensor | None,
    query_length: int,
    key_length: int,
    past_length: int = 0,
    device: torch.device | None = None,
    has_padding: bool | None = None,
) -> torch.Tensor | None:
    """The mask every layer of one forward shares, or ``None`` when plain causal attention is right.

    Args:
        attention_mask: (B, L) padding mask, 1 = real token, 0 = padding, covering the cached and the
            new tokens (``L >= past_length + query_length``; extra columns are ignored). A 4-D mask
            (e.g. one transformers' ``generate`` built) is returned unchanged.
        query_length: ``T``, the number of new tokens in this forward.
        key_length: ``S``, the key length the cache will return (see ``mask_lengths``).
        past_length: tokens already in the cache; query ``i`` is at absolute position ``past_length + i``.
        device: where to build the mask when ``attention_mask`` is ``None``.
        has_padding: whether the 2-D mask hides any token, when the caller knows (a model decides
            it once per sequence, on the prefill); ``None`` checks it here, which reads a value back
            to the host (a device sync on a GPU).

    Returns:
        ``None`` if there is no padding and the keys are exactly the causal prefix (no past, or a
        single new token), else a boolean (B or 1, 1, T, S) tensor, True = may attend.
    """
    if attention_mask is not None:
        if attention_mask.dim() == 4:
            return attention_mask
        if attention_mask.shape[-1] < past_length + query_length:
            raise ValueError(
                f"attention_mask covers {attention_mask.shape[-1]} positions, but the cache holds {past_length} "
                f"and {query_length} are new; a 2-D mask must cover past and new tokens."
            )
        if has_padding is None:
            has_padding = not bool(attention_mask.all())
        if not has_padding:
            attention_mask = None
    if attention_mask is None and key_length == past_length + query_length and (past_length == 0 or query_length == 1):
        return None

    if attention_mask is not None:
        device = attention_mask.device
    query_positions = torch.arange(past_length, past_length + query_length, device=device)  # (T,)
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


class CausalSelfAttention(nn.Module):
    """Causal self-attention: q/k/v projections, heads, attention, output projection ``o_proj``.

    The q/k/v projections come in two layouts with the same math:

    * separate ``q_proj``, ``k_proj``, ``v_proj`` (LLaMA's layout): LoRA can target each one;
    * one fused ``qkv_proj`` (GPT-2's ``c_attn``, nanoGPT's): a single (C -> (H + 2 H_kv) D)
      matmul instead of three. At small widths a step is bound by per-op cost, and one larger
      matmul (and one weight for AdamW) is measurably faster than three small ones: at nanoGPT's
      CPU size (width 128) the fused layout is what closes the gap with nanoGPT.

    Args:
        hidden_size: model width ``C``.
        num_attention_heads: query heads ``H``.
        num_key_value_heads: key/value heads ``H_kv`` (``H`` = MHA, ``1`` = MQA, in between = GQA);
            ``None`` means ``H``.
        head_dim: per-head size ``D``; defaults to ``C // H``.
        bias: biases on all four projections (GPT-2: yes, LLaMA: no).
        layer_idx: this layer's slot in the KV cache.
        attention_dropout: dropout on the attention weights while training.
        fused_qkv: one ``qkv_proj`` instead of ``q_proj``/``k_proj``/``v_proj`` (rows in q, k, v order).
        qk_norm: a norm builder ``size -> module``; when given, each query and key head is normalised
            over its ``D`` features (``q_norm``, ``k_norm``) before the rotary rotation.

    QK-norm (Dehghani et al. 2023, ViT-22B; OLMo 2, Qwen3, Gemma 3): without it, the attention logits
    ``q . k`` grow with the norms of q and k, which grow during training until the softmax saturates
    into one-hot rows whose gradients vanish, the instability that stopped ViT-22B and that high
    learning rates provoke. Normalising each head's q and k bounds the logits by ``D`` times the
    norms' learned gains, so the temperature of attention is a parameter, not an accident.
    """

    # The projection that writes into the residual stream (its init is scaled with depth).
    _residual_projections = ("o_proj",)

    def __init__(
        self,
        hidden_size: int,
        num_attention_heads: int,
        num_key_value_heads: int | None = None,
        head_dim: int | None = None,
        bias: bool = True,
        layer_idx: int = 0,
        attention_dropout: float = 0.0,
        fused_qkv: bool = False,
        qk_norm: Callable[[int], nn.Module] | None = None,
    ) -> None:
        super().__init__()
        num_key_value_heads = num_attention_heads if num_key_value_heads is None else num_key_value_heads
        if head_dim is None:
            if hidden_size % num_attention_heads != 0:
                raise ValueError(
                    f"hidden_size={hidden_size} must be divisible by num_attention_heads={num_attention_heads} "
                    "when head_dim is not given."
                )
            head_dim = hidden_size // num_attention_heads
        if num_attention_heads % num_key_value_heads != 0:
            raise ValueError(
                f"num_attention_heads={num_attention_heads} must be divisible by "
                f"num_key_value_heads={num_key_value_heads}."
            )
        self.hidden_size = hidden_size
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim
        self.layer_idx = layer_idx
        self.attention_dropout = attention_dropout
        self.scaling = head_dim**-0.5

        self.fused_qkv = fused_qkv
        self.qkv_sizes = (num_attention_heads * head_dim, num_key_value_heads * head_dim, num_key_value_heads * head_dim)
        if fused_qkv:
            self.qkv_proj = nn.Linear(hidden_size, sum(self.qkv_sizes), bias=bias)
        else:
            self.q_proj = nn.Linear(hidden_size, self.qkv_sizes[0], bias=bias)
            self.k_proj = nn.Linear(hidden_size, self.qkv_sizes[1], bias=bias)
            self.v_proj = nn.Linear(hidden_size, self.qkv_sizes[2], bias=bias)
        self.o_proj = nn.Linear(num_attention_heads * head_dim, hidden_size, bias=bias)
        self.q_norm = qk_norm(head_dim) if qk_norm is not None else None
        self.k_norm = qk_norm(head_dim) if qk_norm is not None else None

    def forward(
        self,
        hidden_states: torch.Tensor,
        *,
        attention_mask: torch.Tensor | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        past_key_values: Cache | None = None,
        attn_implementation: str = "sdpa",
    ) -> torch.Tensor:
        """(B, T, C) -> (B, T, C).

        ``attention_mask`` is the prebuilt mask from ``build_causal_mask`` (``None`` = causal).
        ``position_embeddings`` is ``(cos, sin)`` from ``RotaryEmbedding``; RoPE is applied only if given.
        ``past_key_values`` is any transformers ``Cache``; this layer writes slot ``layer_idx``.
        """
        attention_function = ATTENTION_FUNCTIONS.get(attn_implementation)
        if attention_function is None:
            raise ValueError(
                f"attn_implementation must be one of {sorted(ATTENTION_FUNCTIONS)}, got {attn_implementation!r}."
            )
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

        output = attention_function(
            query, key, value, attention_mask, self.scaling, self.attention_dropout if self.training else 0.0
        )  # (B, H, T, D)
        output = output.transpose(1, 2).reshape(batch_size, query_length, -1)  # (B, H, T, D) -> (B, T, H*D)
        return self.o_proj(output)

    def extra_repr(self) -> str:
        return (
            f"heads={self.num_attention_heads}, kv_heads={self.num_key_value_heads}, head_dim={self.head_dim}, "
            f"fused_qkv={self.fused_qkv}, qk_norm={self.q_norm is not None}, layer_idx={self.layer_idx}"
        )

