"""The two layouts of the same rotary rotation, and the row permutation between them (for converters and tests).

The model files (``modeling_modern.py`` and the lessons after it) use transformers' rotate-half
layout. Meta's original LLaMA code, the RoFormer paper and llama.cpp pair neighbouring features
instead. This module holds the interleaved reference (complex numbers, as Meta's code) and the
permutation of the q/k projection rows that turns one layout into the other, which is all a
converter needs. Why it matters:

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
"""

from __future__ import annotations

import torch


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
