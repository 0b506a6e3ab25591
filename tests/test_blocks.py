"""Tests for the hand-written building blocks: norms, MLPs, RoPE, attention, KV caches.

Each block is checked against a direct formula or against its transformers / torch counterpart
on the same weights, so that the decoders assembled from them can match GPT-2 and LLaMA to 1e-5.
"""

from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import DynamicCache, GPT2Config, LlamaConfig, LlamaForCausalLM, StaticCache
from transformers.activations import ACT2FN
from transformers.masking_utils import create_causal_mask
from transformers.models.gpt2.modeling_gpt2 import GPT2Attention, GPT2MLP
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaMLP,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
)

from hf_models.attention import (
    ATTENTION_FUNCTIONS,
    CausalSelfAttention,
    build_causal_mask,
    eager_attention,
    mask_lengths,
    sdpa_attention,
)
from hf_models.feed_forward import GELUMLP, SwiGLU
from hf_models.kv_cache import GrowingKVCache, GrowingKVLayer, StaticKVCache, StaticKVLayer
from hf_models.norms import LayerNorm, RMSNorm
from hf_models.rotary import (
    RotaryEmbedding,
    apply_rotary,
    apply_rotary_interleaved,
    permute_for_interleaved,
    permute_for_rotate_half,
)

HIDDEN, HEADS, HEAD_DIM = 32, 4, 8
ATOL = 1e-5


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """These tensors are tiny: worker threads only add sync cost, and on a busy CI box they spin-wait."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def left_padding_mask(batch_size: int, length: int, pads: list[int]) -> torch.Tensor:
    """(B, L) mask of 1/0 where row b starts with pads[b] padding tokens."""
    mask = torch.ones(batch_size, length, dtype=torch.long)
    for row, pad in enumerate(pads):
        mask[row, :pad] = 0
    return mask


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Position ids as transformers' generate derives them: count real tokens, padding at 0."""
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)


def llama_config(num_kv_heads: int = 2, **kwargs) -> LlamaConfig:
    defaults = dict(
        hidden_size=HIDDEN,
        num_attention_heads=HEADS,
        num_key_value_heads=num_kv_heads,
        num_hidden_layers=2,
        intermediate_size=64,
        vocab_size=97,
        max_position_embeddings=128,
        attention_bias=False,
    )
    defaults.update(kwargs)
    return LlamaConfig(**defaults)


# ----------------------------------------------------------------------------- flat-module contract


BLOCK_MODULES = ["norms", "feed_forward", "rotary", "attention", "kv_cache"]


@pytest.mark.parametrize("name", BLOCK_MODULES)
def test_block_module_imports_only_torch_transformers_and_siblings(name):
    """trust_remote_code copies only same-folder relative imports, so blocks must stay flat."""
    package = Path(__file__).resolve().parents[1] / "hf_models"
    tree = ast.parse((package / f"{name}.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level > 0:
            assert node.level == 1 and node.module and "." not in node.module, ast.unparse(node)
            assert (package / f"{node.module}.py").exists(), ast.unparse(node)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            roots = [alias.name for alias in node.names] if isinstance(node, ast.Import) else [node.module]
            for root in roots:
                top = root.split(".")[0]
                assert top in {"torch", "transformers", "__future__", "collections", "functools", "typing", "math"}, (
                    ast.unparse(node)
                )


# ----------------------------------------------------------------------------- norms


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_layer_norm_matches_torch(fused, bias):
    ours = LayerNorm(HIDDEN, eps=1e-5, bias=bias, fused=fused)
    reference = torch.nn.LayerNorm(HIDDEN, eps=1e-5, bias=bias)
    with torch.no_grad():
        reference.weight.normal_()
        if bias:
            reference.bias.normal_()
    assert ours.state_dict().keys() == reference.state_dict().keys()
    ours.load_state_dict(reference.state_dict())
    x = torch.randn(3, 7, HIDDEN) * 3 + 1
    torch.testing.assert_close(ours(x), reference(x), atol=1e-6, rtol=0)


def test_rms_norm_matches_torch_and_llama():
    ours = RMSNorm(HIDDEN, eps=1e-6)
    reference = torch.nn.RMSNorm(HIDDEN, eps=1e-6)
    llama = LlamaRMSNorm(HIDDEN, eps=1e-6)
    with torch.no_grad():
        reference.weight.normal_()
    assert ours.state_dict().keys() == reference.state_dict().keys() == llama.state_dict().keys()
    ours.load_state_dict(reference.state_dict())
    llama.load_state_dict(reference.state_dict())
    x = torch.randn(3, 7, HIDDEN) * 3 + 1
    torch.testing.assert_close(ours(x), reference(x), atol=1e-6, rtol=0)
    torch.testing.assert_close(ours(x), llama(x), atol=0, rtol=0)
    x16 = x.to(torch.bfloat16)
    assert ours.to(torch.bfloat16)(x16).dtype == torch.bfloat16


# ----------------------------------------------------------------------------- feed-forward


def _new_gelu(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


@pytest.mark.parametrize(
    "activation,formula",
    [
        ("gelu", lambda x: 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))),
        ("gelu_new", _new_gelu),
        ("gelu_pytorch_tanh", _new_gelu),
    ],
)
def test_gelu_mlp_matches_formula(activation, formula):
    mlp = GELUMLP(HIDDEN, 4 * HIDDEN, bias=True, activation=activation)
    x = torch.randn(2, 5, HIDDEN)
    expected = formula(x @ mlp.up_proj.weight.T + mlp.up_proj.bias) @ mlp.down_proj.weight.T + mlp.down_proj.bias
    torch.testing.assert_close(mlp(x), expected, atol=1e-5, rtol=0)
    hidden = torch.randn(1000) * 4
    torch.testing.assert_close(mlp.act_fn(hidden), ACT2FN[activation](hidden), atol=1e-6, rtol=0)


def test_gelu_mlp_rejects_unknown_activation():
    with pytest.raises(ValueError, match=r"activation.*'gelu_new'.*got 'relu'"):
        GELUMLP(HIDDEN, 4 * HIDDEN, activation="relu")


def test_swiglu_matches_formula_and_llama_mlp():
    mlp = SwiGLU(HIDDEN, 64)
    assert mlp.gate_proj.bias is None
    x = torch.randn(2, 5, HIDDEN)
    gate, up, down = mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight
    expected = (F.silu(x @ gate.T) * (x @ up.T)) @ down.T
    torch.testing.assert_close(mlp(x), expected, atol=1e-6, rtol=0)
    llama = LlamaMLP(llama_config())
    llama.load_state_dict(mlp.state_dict())
    torch.testing.assert_close(mlp(x), llama(x), atol=0, rtol=0)


# ----------------------------------------------------------------------------- RoPE


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


# ----------------------------------------------------------------------------- attention


def prepare_inputs(query_length, mask_2d, cache, rope):
    """What a model computes once per forward, before any layer updates the cache: mask and (cos, sin)."""
    past_length, key_length = mask_lengths(cache, query_length)
    mask = build_causal_mask(mask_2d, query_length, key_length, past_length)
    position_embeddings = None
    if rope is not None:
        if mask_2d is None:
            position_ids = torch.arange(past_length, past_length + query_length)[None]
        else:
            position_ids = positions_from_mask(mask_2d)[:, past_length : past_length + query_length]
        position_embeddings = rope(position_ids, torch.float32)
    return mask, position_embeddings


def run_attention(attention, x, mask_2d, cache, rope, attn_implementation):
    """One forward of a single attention layer on x (B, T, C)."""
    mask, position_embeddings = prepare_inputs(x.shape[1], mask_2d, cache, rope)
    return attention(
        x,
        attention_mask=mask,
        position_embeddings=position_embeddings,
        past_key_values=cache,
        attn_implementation=attn_implementation,
    )


@pytest.mark.parametrize("num_kv_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("padded", [False, True], ids=["dense", "left_padded"])
@pytest.mark.parametrize("past", [0, 5], ids=["no_cache", "cache_offset"])
def test_eager_matches_sdpa(num_kv_heads, padded, past):
    attention = CausalSelfAttention(HIDDEN, HEADS, num_kv_heads, bias=True).eval()
    rope = RotaryEmbedding(HEAD_DIM)
    new = 6
    x = torch.randn(3, past + new, HIDDEN)
    mask_2d = left_padding_mask(3, past + new, [0, 2, 4]) if padded else None
    outputs = {}
    for implementation in ("eager", "sdpa"):
        cache = DynamicCache() if past else None
        if past:
            prefix_mask = mask_2d[:, :past] if padded else None
            run_attention(attention, x[:, :past], prefix_mask, cache, rope, implementation)
        outputs[implementation] = run_attention(attention, x[:, past:], mask_2d, cache, rope, implementation)
    assert torch.isfinite(outputs["eager"]).all()
    torch.testing.assert_close(outputs["eager"], outputs["sdpa"], atol=ATOL, rtol=0)


def test_build_causal_mask_cases():
    # No padding, no cache: SDPA's is_causal fast path.
    assert build_causal_mask(None, 5, 5, 0) is None
    assert build_causal_mask(torch.ones(2, 5, dtype=torch.long), 5, 5, 0) is None
    # One new token after a cache, no padding: it may see every key.
    assert build_causal_mask(None, 1, 8, 7) is None
    # A chunk after a cache: bottom-right aligned causal mask.
    mask = build_causal_mask(None, 2, 6, 4)
    assert mask.shape == (1, 1, 2, 6)
    assert mask[0, 0].tolist() == [[True] * 5 + [False], [True] * 6]
    # A static buffer longer than the filled part: the tail is hidden by causality.
    mask = build_causal_mask(None, 1, 10, 3)
    assert mask[0, 0, 0].tolist() == [True] * 4 + [False] * 6
    # Left padding: padded keys hidden, a padded query sees only itself.
    mask = build_causal_mask(left_padding_mask(1, 4, [2]), 4, 4, 0)
    assert mask[0, 0].int().tolist() == [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]]
    with pytest.raises(ValueError, match="must cover past and new tokens"):
        build_causal_mask(torch.ones(1, 3), 2, 6, 4)


@pytest.mark.parametrize("function", [eager_attention, sdpa_attention])
def test_fully_masked_rows_are_finite(function):
    q, k, v = torch.randn(2, 4, 3, 8), torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
    mask = torch.ones(2, 1, 3, 5, dtype=torch.bool)
    mask[0, 0, 0] = False
    assert torch.isfinite(function(q, k, v, mask, 8**-0.5)).all()


def test_unknown_attention_implementation():
    attention = CausalSelfAttention(HIDDEN, HEADS)
    with pytest.raises(ValueError, match=r"attn_implementation must be one of \['eager', 'sdpa'\], got 'flash'"):
        attention(torch.randn(1, 3, HIDDEN), attn_implementation="flash")
    assert set(ATTENTION_FUNCTIONS) == {"eager", "sdpa"}


def test_attention_validates_head_counts():
    with pytest.raises(ValueError, match="divisible by num_key_value_heads"):
        CausalSelfAttention(HIDDEN, 4, 3)
    with pytest.raises(ValueError, match="divisible by num_attention_heads"):
        CausalSelfAttention(30, 4)


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_matches_llama_attention(implementation):
    config = llama_config(num_kv_heads=2)
    config._attn_implementation = implementation
    reference = LlamaAttention(config, layer_idx=0).eval()
    ours = CausalSelfAttention(HIDDEN, HEADS, 2, bias=False).eval()
    ours.load_state_dict(reference.state_dict())
    rope_ref, rope = LlamaRotaryEmbedding(config), RotaryEmbedding(HEAD_DIM, base=config.rope_parameters["rope_theta"])

    prompt, new = 6, 3
    x = torch.randn(3, prompt + new, HIDDEN)
    mask_2d = left_padding_mask(3, prompt + new, [0, 1, 3])
    real = mask_2d.bool()
    cache_ref, cache = DynamicCache(), DynamicCache()
    for start, end in ((0, prompt), (prompt, prompt + 1), (prompt + 1, prompt + new)):
        chunk, chunk_mask = x[:, start:end], mask_2d[:, :end]
        position_ids = positions_from_mask(chunk_mask)[:, start:end]
        hf_mask = create_causal_mask(config, chunk, chunk_mask, cache_ref, position_ids)
        expected, _ = reference(chunk, rope_ref(chunk, position_ids), hf_mask, past_key_values=cache_ref)
        got = run_attention(ours, chunk, chunk_mask, cache, rope, implementation)
        # Padded query rows are garbage by design (and differ between HF's eager and sdpa); compare real ones.
        torch.testing.assert_close(got[real[:, start:end]], expected[real[:, start:end]], atol=ATOL, rtol=0)


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_matches_gpt2_attention_and_mlp(implementation):
    """GPT-2's fused Conv1D c_attn (x @ W, W: (C, 3C)) splits into q/k/v Linears with transposed weights."""
    config = GPT2Config(n_embd=HIDDEN, n_head=HEADS, n_layer=1, attn_pdrop=0.0, resid_pdrop=0.0)
    config._attn_implementation = implementation
    attention_ref, mlp_ref = GPT2Attention(config, layer_idx=0).eval(), GPT2MLP(4 * HIDDEN, config).eval()
    with torch.no_grad():
        for module in (attention_ref.c_attn, attention_ref.c_proj, mlp_ref.c_fc, mlp_ref.c_proj):
            module.bias.normal_()
    attention, mlp = CausalSelfAttention(HIDDEN, HEADS, bias=True).eval(), GELUMLP(HIDDEN, 4 * HIDDEN, activation="gelu_new")
    state = {}
    for name, weight, bias in zip(
        ("q_proj", "k_proj", "v_proj"),
        attention_ref.c_attn.weight.split(HIDDEN, dim=1),
        attention_ref.c_attn.bias.split(HIDDEN),
    ):
        state[f"{name}.weight"], state[f"{name}.bias"] = weight.T, bias
    state["o_proj.weight"], state["o_proj.bias"] = attention_ref.c_proj.weight.T, attention_ref.c_proj.bias
    attention.load_state_dict(state)
    mlp.load_state_dict(
        {
            "up_proj.weight": mlp_ref.c_fc.weight.T,
            "up_proj.bias": mlp_ref.c_fc.bias,
            "down_proj.weight": mlp_ref.c_proj.weight.T,
            "down_proj.bias": mlp_ref.c_proj.bias,
        }
    )

    x = torch.randn(3, 9, HIDDEN)
    mask_2d = left_padding_mask(3, 9, [0, 2, 5])
    hf_mask = create_causal_mask(config, x, mask_2d, None, positions_from_mask(mask_2d))
    expected, _ = attention_ref(x, attention_mask=hf_mask)
    got = run_attention(attention, x, mask_2d, None, None, implementation)
    real = mask_2d.bool()
    torch.testing.assert_close(got[real], expected[real], atol=ATOL, rtol=0)
    torch.testing.assert_close(mlp(x), mlp_ref(x), atol=ATOL, rtol=0)


def test_no_padding_uses_is_causal_fast_path(monkeypatch):
    calls = []
    original = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        calls.append((kwargs["attn_mask"], kwargs["is_causal"]))
        return original(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    run_attention(CausalSelfAttention(HIDDEN, HEADS), torch.randn(2, 5, HIDDEN), None, None, None, "sdpa")
    assert calls == [(None, True)]


# ----------------------------------------------------------------------------- KV caches


def make_cache(kind: str):
    if kind == "growing":
        return GrowingKVCache(initial_capacity=2)  # forces several doublings
    if kind == "static":
        return StaticKVCache(max_cache_len=24)
    if kind == "dynamic":
        return DynamicCache()
    if kind == "hf_static":
        return StaticCache(config=llama_config(), max_cache_len=24)
    raise ValueError(kind)


class TwoLayerAttention(torch.nn.Module):
    """Two residual attention layers sharing one cache, as in a decoder."""

    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList(CausalSelfAttention(HIDDEN, HEADS, 2, bias=False, layer_idx=i) for i in range(2))
        self.rope = RotaryEmbedding(HEAD_DIM)

    def forward(self, x, mask_2d, cache, implementation):
        mask, position_embeddings = prepare_inputs(x.shape[1], mask_2d, cache, self.rope)
        for layer in self.layers:
            x = x + layer(
                x,
                attention_mask=mask,
                position_embeddings=position_embeddings,
                past_key_values=cache,
                attn_implementation=implementation,
            )
        return x


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("kind", ["growing", "static", "dynamic", "hf_static"])
@pytest.mark.parametrize("padded", [False, True], ids=["dense", "left_padded"])
def test_incremental_decoding_matches_full_forward(kind, implementation, padded):
    model = TwoLayerAttention().eval()
    length, prompt = 11, 5
    x = torch.randn(3, length, HIDDEN)
    mask_2d = left_padding_mask(3, length, [0, 2, 3]) if padded else None
    full = model(x, mask_2d, None, implementation)

    cache = make_cache(kind)
    # Prompt, then single tokens, then a two-token chunk (speculative-decoding style), then a token.
    boundaries = [0, prompt, prompt + 1, prompt + 2, prompt + 3, prompt + 5, length]
    pieces = []
    for start, end in zip(boundaries, boundaries[1:]):
        pieces.append(model(x[:, start:end], None if mask_2d is None else mask_2d[:, :end], cache, implementation))
    assert int(cache.get_seq_length()) == length
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=ATOL, rtol=0)


def fill(cache, batch=3, length=6, layers=2):
    data = [(torch.randn(batch, 2, length, HEAD_DIM), torch.randn(batch, 2, length, HEAD_DIM)) for _ in range(layers)]
    for layer_idx, (k, v) in enumerate(data):
        cache.update(k, v, layer_idx)
    return data


@pytest.mark.parametrize("kind", ["growing", "static"])
def test_cache_operations_match_dynamic_cache(kind):
    ours, reference = make_cache(kind), DynamicCache()
    data = fill(ours)
    for layer_idx, (k, v) in enumerate(data):
        reference.update(k, v, layer_idx)

    def same():
        assert ours.get_seq_length() == reference.get_seq_length()
        for mine, theirs in zip(ours.layers, reference.layers):
            torch.testing.assert_close(mine.keys, theirs.keys, atol=0, rtol=0)
            torch.testing.assert_close(mine.values, theirs.values, atol=0, rtol=0)

    same()
    assert ours.get_mask_sizes(1, 0) == (7, 0)
    assert not ours.is_compileable and ours.is_croppable

    buffer_address = ours.layers[0].key_buffer.data_ptr()
    beam_idx = torch.tensor([2, 0, 0])
    ours.reorder_cache(beam_idx)
    reference.reorder_cache(beam_idx)
    same()
    assert ours.layers[0].key_buffer.data_ptr() == buffer_address  # reordered in place

    ours.crop(-2)
    reference.crop(-2)
    same()
    with pytest.raises(ValueError, match="negative"):
        ours.crop(3)

    step = [(torch.randn(3, 2, 1, HEAD_DIM), torch.randn(3, 2, 1, HEAD_DIM)) for _ in range(2)]
    for layer_idx, (k, v) in enumerate(step):
        assert ours.update(k, v, layer_idx)[0].shape == reference.update(k, v, layer_idx)[0].shape == (3, 2, 5, HEAD_DIM)
    same()

    ours.batch_repeat_interleave(2)
    reference.batch_repeat_interleave(2)
    same()
    ours.batch_select_indices(torch.tensor([1, 4, 5]))
    reference.batch_select_indices(torch.tensor([1, 4, 5]))
    same()

    ours.reset()
    assert ours.get_seq_length() == 0 and ours.layers[0].keys.shape[-2] == 0
    # A fresh sequence after reset may use another batch size.
    fill(ours, batch=1, length=3)
    assert ours.layers[1].keys.shape == (1, 2, 3, HEAD_DIM)


def test_growing_cache_doubles_capacity():
    layer = GrowingKVLayer(initial_capacity=4)
    capacities = []
    for _ in range(9):
        layer.update(torch.randn(1, 2, 1, HEAD_DIM), torch.randn(1, 2, 1, HEAD_DIM))
        capacities.append(layer.key_buffer.shape[-2])
    assert capacities == [4, 4, 4, 4, 8, 8, 8, 8, 16]
    layer.update(torch.randn(1, 2, 40, HEAD_DIM), torch.randn(1, 2, 40, HEAD_DIM))
    assert layer.key_buffer.shape[-2] == 49 and layer.get_seq_length() == 49


def test_static_cache_is_preallocated_and_bounded():
    layer = StaticKVLayer(max_cache_len=6)
    layer.update(torch.randn(2, 2, 4, HEAD_DIM), torch.randn(2, 2, 4, HEAD_DIM))
    address = layer.key_buffer.data_ptr()
    keys, _ = layer.update(torch.randn(2, 2, 2, HEAD_DIM), torch.randn(2, 2, 2, HEAD_DIM))
    assert keys.shape == (2, 2, 6, HEAD_DIM) and layer.key_buffer.shape[-2] == 6
    assert layer.key_buffer.data_ptr() == address and keys.data_ptr() == address  # a view, no copy
    with pytest.raises(ValueError, match="max_cache_len=6"):
        layer.update(torch.randn(2, 2, 1, HEAD_DIM), torch.randn(2, 2, 1, HEAD_DIM))
    assert layer.get_max_length() == 6
    cache = StaticKVCache(max_cache_len=6, num_layers=2)
    cache.early_initialization(batch_size=2, num_heads=2, head_dim=HEAD_DIM, dtype=torch.float32, device="cpu")
    assert all(layer.key_buffer.shape == (2, 2, 6, HEAD_DIM) for layer in cache.layers)


@pytest.mark.parametrize("kind", ["growing", "static"])
def test_caches_drive_transformers_generate(kind):
    """Greedy, beam search and sampling on a left-padded batch give DynamicCache's exact tokens."""
    model = LlamaForCausalLM(llama_config(num_hidden_layers=2)).eval()
    input_ids = torch.randint(3, 97, (2, 7))
    attention_mask = left_padding_mask(2, 7, [0, 3])
    settings = [
        dict(do_sample=False),
        dict(do_sample=False, num_beams=3, num_return_sequences=2),
        dict(do_sample=True, top_k=20),
    ]
    for generate_kwargs in settings:
        outputs = []
        for cache in (None, make_cache(kind)):
            torch.manual_seed(1)
            outputs.append(
                model.generate(
                    input_ids,
                    attention_mask=attention_mask,
                    max_new_tokens=6,
                    pad_token_id=0,
                    past_key_values=cache,
                    **generate_kwargs,
                )
            )
            assert cache is None or cache.get_seq_length() > input_ids.shape[1]
        assert torch.equal(outputs[0], outputs[1]), generate_kwargs


@pytest.mark.parametrize("num_key_value_heads", [HEADS, 2, 1])
@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_fused_qkv_projection_equals_separate_projections(num_key_value_heads, implementation):
    """GPT's one ``qkv_proj`` (rows q | k | v) computes what LLaMA's three projections compute, GQA too."""
    torch.manual_seed(0)
    separate = CausalSelfAttention(HIDDEN, HEADS, num_key_value_heads, bias=True).eval()
    fused = CausalSelfAttention(HIDDEN, HEADS, num_key_value_heads, bias=True, fused_qkv=True).eval()
    assert not hasattr(fused, "q_proj") and fused.qkv_proj.out_features == HIDDEN + 2 * num_key_value_heads * (HIDDEN // HEADS)
    with torch.no_grad():
        fused.qkv_proj.weight.copy_(torch.cat([separate.q_proj.weight, separate.k_proj.weight, separate.v_proj.weight]))
        fused.qkv_proj.bias.copy_(torch.cat([separate.q_proj.bias, separate.k_proj.bias, separate.v_proj.bias]))
        fused.o_proj.load_state_dict(separate.o_proj.state_dict())
    x = torch.randn(3, 9, HIDDEN)
    mask_2d = left_padding_mask(3, 9, [0, 2, 5])
    expected = run_attention(separate, x, mask_2d, None, None, implementation)
    got = run_attention(fused, x, mask_2d, None, None, implementation)
    real = mask_2d.bool()
    torch.testing.assert_close(got[real], expected[real], atol=1e-6, rtol=0)
