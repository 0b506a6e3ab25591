"""The hand-written decoders are the architectures they claim: identical to transformers' own
``GPT2LMHeadModel`` and ``LlamaForCausalLM`` on the same weights, in both directions."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from hf_models import GPTConfig, GPTForCausalLM, ModernDecoderConfig, ModernDecoderForCausalLM
from hf_models.conversion import export_for_serving, gpt2_to_gpt, gpt_to_gpt2, llama_to_modern, modern_to_llama
from hf_models.tokenization import build_char_tokenizer

TOLERANCE = dict(rtol=1e-5, atol=1e-5)
VOCAB = 61


def ids(batch: int = 2, length: int = 24, seed: int = 0) -> torch.LongTensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def assert_same_function(a: torch.nn.Module, b: torch.nn.Module) -> None:
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(a(x).logits, b(x).logits, **TOLERANCE)
    greedy_a = a.generate(x, max_new_tokens=16, do_sample=False)
    greedy_b = b.generate(x, max_new_tokens=16, do_sample=False)
    assert torch.equal(greedy_a, greedy_b)


def tiny_gpt(bias: bool, attn: str) -> GPTForCausalLM:
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=VOCAB, max_position_embeddings=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, bias=bias)
    model = GPTForCausalLM(config).eval()
    model.config._attn_implementation = attn
    if bias:  # random non-zero biases and norm parameters, so that a missed copy shows
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias") or "norm" in name:
                    p.normal_(0, 0.1).add_(1.0 if "norm" in name and name.endswith("weight") else 0.0)
    return model


def tiny_modern(kv_heads: int, attn: str, tie: bool = True) -> ModernDecoderForCausalLM:
    torch.manual_seed(0)
    config = ModernDecoderConfig(
        vocab_size=VOCAB, max_position_embeddings=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=kv_heads, tie_word_embeddings=tie, rope_theta=500.0,
    )
    model = ModernDecoderForCausalLM(config).eval()
    model.config._attn_implementation = attn
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.1)
    return model


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("bias", [True, False])
def test_gpt_to_gpt2_and_back(bias, attn):
    ours = tiny_gpt(bias, attn)
    theirs = gpt_to_gpt2(ours)
    assert isinstance(theirs, GPT2LMHeadModel)
    assert_same_function(ours, theirs)
    assert_same_function(gpt2_to_gpt(theirs), theirs)


def test_gpt2_from_transformers_converts_to_ours():
    torch.manual_seed(1)
    theirs = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=4)).eval()
    with torch.no_grad():  # GPT-2's init leaves biases at zero: randomise them so the mapping is tested
        for name, p in theirs.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    ours = gpt2_to_gpt(theirs)
    assert isinstance(ours, GPTForCausalLM)
    assert_same_function(ours, theirs)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("kv_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
def test_modern_to_llama_and_back(kv_heads, attn):
    ours = tiny_modern(kv_heads, attn)
    theirs = modern_to_llama(ours)
    assert isinstance(theirs, LlamaForCausalLM)
    assert_same_function(ours, theirs)
    assert_same_function(llama_to_modern(theirs), theirs)


def test_llama_from_transformers_converts_to_ours():
    torch.manual_seed(2)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    theirs = LlamaForCausalLM(config).eval()
    ours = llama_to_modern(theirs)
    assert not ours.config.tie_word_embeddings
    assert_same_function(ours, theirs)


def test_unsupported_variants_are_refused_by_name():
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, hidden_act="gelu"))
    with pytest.raises(ValueError, match="hidden_act='gelu'"):
        llama_to_modern(llama)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=1, n_head=4, scale_attn_by_inverse_layer_idx=True))
    with pytest.raises(ValueError, match="scale_attn_by_inverse_layer_idx"):
        gpt2_to_gpt(gpt2)


@pytest.mark.parametrize("build, expected", [(lambda: tiny_gpt(True, "sdpa"), GPT2LMHeadModel), (lambda: tiny_modern(2, "sdpa"), LlamaForCausalLM)])
def test_export_for_serving_reloads_as_plain_transformers(build, expected, tmp_path):
    model = build()
    tokenizer = build_char_tokenizer("abcdefghijklmnopqrstuvwxyz ,.\n" + "ABCDEFGHIJKLMNOPQRSTUVWXYZ!?;:'-0123456")
    folder = export_for_serving(model, tokenizer, tmp_path / "export")
    assert "auto_map" not in (folder / "config.json").read_text()
    assert not list(folder.glob("*.py"))  # no remote code
    reloaded = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert type(reloaded) is expected
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).logits, model(x).logits, **TOLERANCE)
