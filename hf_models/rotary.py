"""Rotary position embeddings (RoPE, Su et al. 2021, "RoFormer").

What
----
Attention by itself is blind to order: permute the keys and the scores permute with them. GPT-2
fixes that by *adding* a learned vector per absolute position to the token embeddings. RoPE
instead *rotates* each query and key according to its position, inside every attention layer:
split a head's ``D`` features into ``D/2`` pairs, and turn pair ``i`` of the vector at position
``m`` by the angle ``m * theta_i``, with ``theta_i = base ** (-2i / D)`` (``base`` = 10000). Pair
0 spins fastest (one radian per token), the last pair barely moves. Because a rotation by ``a``
followed by the transpose of a rotation by ``b`` is a rotation by ``b - a``::

    <R(m) q, R(n) k> = <q, R(n - m) k>

the score between two tokens depends on their *relative* distance only, with no parameters, and
nothing limits the position index to a table size. LLaMA, Mistral, Qwen, Gemma and GPT-NeoX all
use it.

Two layouts of the same rotation -- the most reported RoPE bug
---------------------------------------------------------------
*Which* features form a pair is a convention, and two are in use:

* **interleaved**: pairs ``(x0, x1), (x2, x3), ...`` -- the RoFormer paper, and Meta's original
  LLaMA code, which views each pair as one complex number and multiplies by ``e^{i m theta}``
  (``apply_rotary_interleaved`` below is that reference);
* **rotate-half**: pairs ``(x_i, x_{i + D/2})`` -- GPT-NeoX and every transformers model
  (``rotate_half``). It needs no complex dtype and no strided gathers: ``q * cos +
  rotate_half(q) * sin`` with ``cos``/``sin`` repeated as ``[c0..c_{D/2-1}, c0..c_{D/2-1}]``.

The two are the same function up to a fixed reordering of each head's ``D`` output rows of the
q/k projections. That is why transformers' ``convert_llama_weights_to_hf.py`` permutes Meta's
``wq``/``wk``: ``w.view(H, D/2, 2, C).transpose(1, 2).reshape(H*D, C)`` moves row ``2i + c`` to
row ``c*D/2 + i`` (``permute_for_rotate_half``; ``permute_for_interleaved`` undoes it).

Mixing them up does not crash. The permutation keeps every shape, the rotation is still
orthogonal and still applied identically to queries and keys, so scores are still a function of
relative distance only -- just not the function the model was trained with. At distance 0 the
rotation is the identity, so a token's score with itself is exact; every other score rotates the
wrong feature pairs at the wrong frequencies. The converted model loads, runs and even writes
grammatical text, but perplexity is far worse and long-range recall is gone. The only reliable
check is numerical: compare logits against the reference implementation, which is what the
tests do (interleaved on Meta-layout weights == rotate-half on permuted weights, to 1e-6).

How it scales
-------------
Long-context models stretch the rotation instead of retraining from scratch: raise ``base``
(Code Llama: 1e6), or rescale the frequencies per band (NTK-aware scaling, YaRN, LLaMA-3.1's
``rope_type="llama3"``). All of them only change ``inv_freq`` (and sometimes scale cos/sin), so
they slot into ``RotaryEmbedding`` without touching attention. Fused kernels apply the rotation
inside the attention kernel so q/k are never written back rotated.
"""

from __future__ import annotations

import torch
from torch import nn


class RotaryEmbedding(nn.Module):
    """Computes the rotate-half ``cos``/``sin`` tables for given positions (as ``LlamaRotaryEmbedding``).

    Build one per model and call it once per forward; every layer reuses ``(cos, sin)``.

    Args:
        head_dim: per-head feature size ``D`` (even).
        base: the ``theta`` of the frequency ladder (``rope_theta`` in transformers configs).

    ``inv_freq`` is a non-persistent buffer (not saved, recomputed from the config). transformers
    builds models on the meta device and re-creates non-persistent buffers with ``torch.empty``,
    so a model's ``_init_weights`` must refill it (``from transformers import initialization as init``)::

        if isinstance(module, RotaryEmbedding):
            init.copy_(module.inv_freq, module.compute_inv_freq(module.inv_freq.device))
    """

    def __init__(self, head_dim: int, base: float = 10000.0) -> None:
        super().__init__()
        if head_dim % 2 != 0:
            raise ValueError(f"RotaryEmbedding head_dim must be even, got {head_dim}.")
        self.head_dim = head_dim
        self.base = base
        self.register_buffer("inv_freq", self.compute_inv_freq(), persistent=False)

    def compute_inv_freq(self, device: torch.device | None = None) -> torch.Tensor:
        """``theta_i = base ** (-2i / D)`` for ``i = 0 .. D/2 - 1``, float32, shape (D/2,)."""
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=device) / self.head_dim
        return 1.0 / (self.base**exponents)

    @torch.no_grad()
    def forward(
        self, position_ids: torch.LongTensor, dtype: torch.dtype = torch.float32
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(cos, sin)``, each (B, T, D), for integer ``position_ids`` of shape (B, T)."""
        # Angles in float32: position * theta loses whole radians in bf16 beyond a few hundred tokens.
        freqs = position_ids[..., None].float() * self.inv_freq  # (B, T, 1) * (D/2,) -> (B, T, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, D): rotate-half layout
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, base={self.base}"


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``(x1, x2) -> (-x2, x1)`` on the two halves of the last dimension: a 90-degree turn of each pair."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate queries (B, H, T, D) and keys (B, H_kv, T, D) by ``cos``/``sin`` of shape (B, T, D)."""
    cos = cos.unsqueeze(1)  # (B, T, D) -> (B, 1, T, D), broadcast over heads
    sin = sin.unsqueeze(1)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def apply_rotary_interleaved(
    q: torch.Tensor, k: torch.Tensor, position_ids: torch.LongTensor, base: float = 10000.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference RoPE in the interleaved layout, with complex numbers as in Meta's LLaMA code.

    Pairs ``(x_{2i}, x_{2i+1})`` are read as ``x_{2i} + 1j * x_{2i+1}`` and multiplied by
    ``exp(1j * m * theta_i)``. ``q``: (B, H, T, D), ``k``: (B, H_kv, T, D), ``position_ids``: (B, T).
    """
    head_dim = q.shape[-1]
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=q.device) / head_dim))
    angles = position_ids[..., None].float() * inv_freq  # (B, T, D/2)
    rotation = torch.polar(torch.ones_like(angles), angles)[:, None]  # (B, 1, T, D/2), complex64

    def rotate(x: torch.Tensor) -> torch.Tensor:
        pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))  # (B, H, T, D) -> (B, H, T, D/2)
        return torch.view_as_real(pairs * rotation).flatten(-2).to(x.dtype)  # (B, H, T, D/2, 2) -> (B, H, T, D)

    return rotate(q), rotate(k)


def permute_for_rotate_half(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Reorder q/k projection rows from the interleaved (Meta) to the rotate-half (HF) layout.

    ``weight``: (num_heads * D, in_features), or a (num_heads * D,) bias. Within each head, row
    ``2i + c`` moves to row ``c * D/2 + i``. Same as ``permute`` in transformers'
    ``convert_llama_weights_to_hf.py``; apply it to ``wq`` with the query heads and to ``wk``
    with the key/value heads.
    """
    out_features, *rest = weight.shape
    head_dim = out_features // num_heads
    # (H*D, ...) -> (H, D/2, 2, ...) -> (H, 2, D/2, ...) -> (H*D, ...)
    return weight.reshape(num_heads, head_dim // 2, 2, *rest).transpose(1, 2).reshape(out_features, *rest)


def permute_for_interleaved(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Inverse of ``permute_for_rotate_half``: rotate-half (HF) rows back to the interleaved (Meta) layout."""
    out_features, *rest = weight.shape
    head_dim = out_features // num_heads
    # (H*D, ...) -> (H, 2, D/2, ...) -> (H, D/2, 2, ...) -> (H*D, ...)
    return weight.reshape(num_heads, 2, head_dim // 2, *rest).transpose(1, 2).reshape(out_features, *rest)
