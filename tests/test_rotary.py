"""The hand-written rotary position embedding equals LLaMA's, and Meta's layout maps onto it.

``RotaryEmbedding`` / ``apply_rotary`` against transformers' ``LlamaRotaryEmbedding`` /
``apply_rotary_pos_emb`` (positions from a left-padded mask too); ``apply_rotary_interleaved`` on
Meta-layout weights against rotate-half on the same weights permuted by ``permute_for_rotate_half``,
and the permutations' round trip.
"""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from hf_models.conversion.rotary_layout import apply_rotary_interleaved, permute_for_interleaved, permute_for_rotate_half
from hf_models.modeling_modern import RotaryEmbedding, apply_rotary
from tests.helpers import HEAD_DIM, HEADS, HIDDEN, left_padding_mask, llama_config, positions_from_mask

pytestmark = pytest.mark.usefixtures("single_thread", "torch_seed")


def test_rope_matches_llama():
    base = 500000.0
    config = llama_config(rope_parameters={"rope_type": "default", "rope_theta": base})
    reference = LlamaRotaryEmbedding(config)
    ours = RotaryEmbedding(HEAD_DIM, base=base)
    position_ids = torch.stack([torch.arange(10), positions_from_mask(left_padding_mask(1, 10, [3]))[0] + 40])
    x = torch.randn(2, 10, HIDDEN)
    cos_ref, sin_ref = reference(x, position_ids)
    cos, sin = ours(position_ids, x.dtype)
    assert cos.shape == (2, 10, HEAD_DIM)
    torch.testing.assert_close(cos, cos_ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(sin, sin_ref, atol=1e-6, rtol=0)
    q, k = torch.randn(2, HEADS, 10, HEAD_DIM), torch.randn(2, 2, 10, HEAD_DIM)
    for got, expected in zip(apply_rotary(q, k, cos, sin), apply_rotary_pos_emb(q, k, cos_ref, sin_ref)):
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def test_interleaved_on_meta_weights_equals_rotate_half_on_permuted_weights():
    num_heads, head_dim, batch, length = 3, 16, 2, 9
    meta_wq = torch.randn(num_heads * head_dim, HIDDEN)
    meta_wk = torch.randn(num_heads * head_dim, HIDDEN)
    hf_wq, hf_wk = permute_for_rotate_half(meta_wq, num_heads), permute_for_rotate_half(meta_wk, num_heads)
    x = torch.randn(batch, length, HIDDEN)
    position_ids = torch.arange(length).expand(batch, length) + torch.tensor([[0], [5]])

    def heads(weight):  # (B, T, C) @ (C, H*D) -> (B, H, T, D)
        return (x @ weight.T).view(batch, length, num_heads, head_dim).transpose(1, 2)

    q_meta, k_meta = apply_rotary_interleaved(heads(meta_wq), heads(meta_wk), position_ids, base=10000.0)
    cos, sin = RotaryEmbedding(head_dim)(position_ids)
    q_hf, k_hf = apply_rotary(heads(hf_wq), heads(hf_wk), cos, sin)

    # Same vectors, features reordered within each head: interleaved slot 2i + c is rotate-half slot c*D/2 + i.
    to_half = lambda t: t.unflatten(-1, (head_dim // 2, 2)).transpose(-1, -2).flatten(-2)  # noqa: E731
    torch.testing.assert_close(q_hf, to_half(q_meta), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k_hf, to_half(k_meta), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(q_hf @ k_hf.transpose(-1, -2), q_meta @ k_meta.transpose(-1, -2), atol=1e-4, rtol=1e-5)

    # The silent bug: rotate-half on unpermuted (Meta) weights runs fine and is exact at distance 0 only.
    q_bad, k_bad = apply_rotary(heads(meta_wq), heads(meta_wk), cos, sin)
    scores_bad, scores_good = q_bad @ k_bad.transpose(-1, -2), q_hf @ k_hf.transpose(-1, -2)
    torch.testing.assert_close(scores_bad.diagonal(dim1=-2, dim2=-1), scores_good.diagonal(dim1=-2, dim2=-1))
    assert (scores_bad - scores_good).abs().max() > 1.0


def test_permutations_round_trip():
    weight, bias = torch.randn(4 * 8, HIDDEN), torch.randn(4 * 8)
    for tensor in (weight, bias):
        assert not torch.equal(permute_for_rotate_half(tensor, 4), tensor)
        assert torch.equal(permute_for_interleaved(permute_for_rotate_half(tensor, 4), 4), tensor)
        assert torch.equal(permute_for_rotate_half(permute_for_interleaved(tensor, 4), 4), tensor)
    # Row 2i + c of a head moves to row c * D/2 + i.
    rows = torch.arange(8).float()[:, None]
    assert permute_for_rotate_half(rows, 1).flatten().tolist() == [0, 2, 4, 6, 1, 3, 5, 7]
