"""The hand-written attention layer equals its references.

``CausalSelfAttention``: eager against SDPA (MHA, GQA, MQA; dense and left-padded; with a cache
offset), against transformers' ``LlamaAttention`` through prompt and decode steps on a
``DynamicCache``, and against ``GPT2Attention`` (with ``GPT2MLP``) on GPT-2's fused Conv1D weights;
the fused ``qkv_proj`` against three separate projections. ``build_causal_mask`` against the masks
written out by hand, and the SDPA ``is_causal`` fast path when there is no padding.
"""

from __future__ import annotations

import functools
import pytest
import torch
import torch.nn.functional as F
from transformers import DynamicCache, GPT2Config
from transformers.masking_utils import create_causal_mask
from transformers.models.gpt2.modeling_gpt2 import GPT2Attention, GPT2MLP
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding

from hf_models.modeling_modern import (
    ATTENTION_FUNCTIONS,
    build_causal_mask,
    eager_attention,
    sdpa_attention,
)
import hf_models
from hf_models.modeling_gpt import GPTMLP as GELUMLP
from hf_models.modeling_modern import RotaryEmbedding
from tests.helpers import (
    attention_layer,
    ATOL,
    HEAD_DIM,
    HEADS,
    HIDDEN,
    left_padding_mask,
    llama_config,
    positions_from_mask,
    run_attention,
)

pytestmark = pytest.mark.usefixtures("single_thread", "torch_seed")


@pytest.mark.parametrize("num_kv_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("padded", [False, True], ids=["dense", "left_padded"])
@pytest.mark.parametrize("past", [0, 5], ids=["no_cache", "cache_offset"])
def test_eager_matches_sdpa(num_kv_heads, padded, past):
    attention = attention_layer(HIDDEN, HEADS, num_kv_heads, bias=True).eval()
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
    output, _ = function(None, q, k, v, mask, scaling=8**-0.5)  # transformers' AttentionInterface contract
    assert output.shape == (2, 3, 4, 8) and torch.isfinite(output).all()


def test_unknown_attention_implementation():
    attention = attention_layer(HIDDEN, HEADS)
    with pytest.raises(ValueError, match=r"attn_implementation must be one of \['eager', 'sdpa'\] or a name registered .* got 'flash'"):
        attention(torch.randn(1, 3, HIDDEN), attn_implementation="flash")
    assert set(ATTENTION_FUNCTIONS) == {"eager", "sdpa"}


def test_attention_validates_head_counts():
    with pytest.raises(ValueError, match="divisible by num_key_value_heads"):
        attention_layer(HIDDEN, 4, 3)
    with pytest.raises(ValueError, match="divisible by num_attention_heads"):
        hf_models.GPTConfig(hidden_size=30, num_attention_heads=4)



@pytest.mark.parametrize("config_type", ["ModernDecoderConfig", "MoEDecoderConfig", "ConfigurableDecoderConfig"])
def test_rotary_configs_name_the_width_and_heads_behind_head_dim(config_type):
    """hidden_size 36 over 8 heads once floored head_dim to 4 (the Llama export then failed); an odd
    head_dim was reported as head_dim, a field the recipes' flags never set."""
    config_class = getattr(hf_models, config_type)
    if config_type == "ConfigurableDecoderConfig":
        config_class = functools.partial(config_class, positions="rope")
    with pytest.raises(ValueError, match=r"hidden_size=36 must be divisible by num_attention_heads=8 \(head_dim"):
        config_class(hidden_size=36, num_attention_heads=8, num_key_value_heads=8)
    with pytest.raises(ValueError, match=r"head_dim must be even .*got 7 = hidden_size 56 / num_attention_heads 8"):
        config_class(hidden_size=56, num_attention_heads=8, num_key_value_heads=8)
    with pytest.raises(ValueError, match=r"got 7 \(given as head_dim\)"):
        config_class(hidden_size=64, num_attention_heads=8, num_key_value_heads=8, head_dim=7)
    assert config_class(hidden_size=36, num_attention_heads=6, num_key_value_heads=6).head_dim == 6

@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_matches_llama_attention(implementation):
    config = llama_config(num_kv_heads=2)
    config._attn_implementation = implementation
    reference = LlamaAttention(config, layer_idx=0).eval()
    ours = attention_layer(HIDDEN, HEADS, 2, bias=False).eval()
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
    attention, mlp = attention_layer(HIDDEN, HEADS, bias=True).eval(), GELUMLP(HIDDEN, 4 * HIDDEN, activation="gelu_new")
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
    run_attention(attention_layer(HIDDEN, HEADS), torch.randn(2, 5, HIDDEN), None, None, None, "sdpa")
    assert calls == [(None, True)]


@pytest.mark.parametrize("num_key_value_heads", [HEADS, 2, 1])
@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_fused_qkv_projection_equals_separate_projections(num_key_value_heads, implementation):
    """GPT's one ``qkv_proj`` (rows q | k | v) computes what LLaMA's three projections compute, GQA too."""
    torch.manual_seed(0)
    separate = attention_layer(HIDDEN, HEADS, num_key_value_heads, bias=True).eval()
    fused = attention_layer(HIDDEN, HEADS, num_key_value_heads, bias=True, fused_qkv=True).eval()
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
