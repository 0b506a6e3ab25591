"""Lesson 12's configurable decoder: its presets *are* lessons 4, 5 and 10's models, and every switch builds a working model.

* each preset, with the dedicated model's weights, gives the same logits (1e-6, fp32), and saved
  folders convert to the configurable type and back;
* QK-norm equals transformers' Qwen3 (the reference that has it) on copied weights;
* every switch (norm, QK-norm, positions, feed-forward, attention type, fused q/k/v, biases, tied
  embeddings) builds a model whose cached generation equals the uncached one;
* bad values name the field.

The integration matrix (``test_model_matrix.py``, ``test_model_contract.py``) covers the client
libraries through its tiny config in ``tests/helpers.py``.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen3Config, Qwen3ForCausalLM

from hf_models import (
    ConfigurableDecoderConfig,
    ConfigurableDecoderForCausalLM,
    GPTForCausalLM,
    ModernDecoderForCausalLM,
    MoEDecoderForCausalLM,
)
from hf_models.conversion import convert_folder, dedicated_config_from, to_configurable, to_dedicated
from tests.helpers import TINY_TEXT, build_tiny_model

DEDICATED = {"zoo_gpt": GPTForCausalLM, "zoo_modern": ModernDecoderForCausalLM, "zoo_moe": MoEDecoderForCausalLM}
PRESET_OF = {"zoo_gpt": "gpt", "zoo_modern": "modern", "zoo_moe": "moe"}
SMALL = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64)


def ids_for(tokenizer, batch: int = 2) -> torch.LongTensor:
    return torch.tensor([tokenizer(TINY_TEXT[:40])["input_ids"]] * batch)


@pytest.mark.parametrize("model_type", sorted(DEDICATED))
def test_each_preset_gives_the_dedicated_models_logits(model_type, tiny_tokenizer):
    dedicated = build_tiny_model(model_type, len(tiny_tokenizer), output_router_logits=True) if model_type == "zoo_moe" \
        else build_tiny_model(model_type, len(tiny_tokenizer))
    configurable = to_configurable(dedicated).eval()
    assert type(configurable) is ConfigurableDecoderForCausalLM
    # The preset builds the same modules under the same names: nothing renamed, nothing added.
    assert configurable.state_dict().keys() == dedicated.state_dict().keys()
    ids = ids_for(tiny_tokenizer)
    with torch.no_grad():
        expected, got = dedicated(ids, labels=ids), configurable(ids, labels=ids)
    torch.testing.assert_close(got.logits, expected.logits, rtol=0, atol=1e-6)
    torch.testing.assert_close(got.loss, expected.loss, rtol=0, atol=1e-6)
    if model_type == "zoo_moe":  # lesson 10's balancing loss comes along
        torch.testing.assert_close(got.aux_loss, expected.aux_loss, rtol=0, atol=1e-6)
    back = to_dedicated(configurable)
    assert type(back) is DEDICATED[model_type]
    assert back.config.to_diff_dict() == dedicated.config.to_diff_dict()


@pytest.mark.parametrize("model_type", sorted(DEDICATED))
def test_the_preset_constructor_builds_the_dedicated_architecture(model_type):
    """``ConfigurableDecoderConfig.preset(name)`` with lesson-sized fields has the dedicated model's parameters, shape for shape."""
    config_class, model_class = ConfigurableDecoderConfig, DEDICATED[model_type]
    extra = dict(num_local_experts=4, num_experts_per_tok=2) if model_type == "zoo_moe" else {}
    kv = {} if model_type == "zoo_gpt" else dict(num_key_value_heads=2)
    torch.manual_seed(0)
    preset = ConfigurableDecoderForCausalLM(config_class.preset(PRESET_OF[model_type], **SMALL, **kv, **extra))
    torch.manual_seed(0)
    dedicated = model_class(model_class.config_class(**SMALL, **kv, **extra))
    shapes = lambda model: {name: tuple(p.shape) for name, p in model.state_dict().items()}  # noqa: E731
    assert shapes(preset) == shapes(dedicated)
    assert type(to_dedicated(preset)) is model_class


@pytest.mark.parametrize("model_type", sorted(DEDICATED))
def test_saved_folders_convert_to_the_configurable_type_and_back(model_type, tiny_tokenizer, tmp_path):
    model = build_tiny_model(model_type, len(tiny_tokenizer))
    model.save_pretrained(tmp_path / "dedicated")
    tiny_tokenizer.save_pretrained(tmp_path / "dedicated")
    convert_folder(tmp_path / "dedicated", tmp_path / "configurable")
    convert_folder(tmp_path / "configurable", tmp_path / "back", to="dedicated")

    as_configurable = AutoModelForCausalLM.from_pretrained(tmp_path / "configurable").eval()
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    assert type(as_configurable) is ConfigurableDecoderForCausalLM and type(back) is type(model)
    assert (tmp_path / "configurable" / "tokenizer.json").is_file()
    ids = ids_for(tiny_tokenizer)
    with torch.no_grad():
        expected = model(ids).logits
        torch.testing.assert_close(as_configurable(ids).logits, expected, rtol=0, atol=1e-6)
        torch.testing.assert_close(back(ids).logits, expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"needs a configurable decoder.*model_type 'zoo_"):
        convert_folder(tmp_path / "dedicated", tmp_path / "never", to="dedicated")
    assert not (tmp_path / "never").exists()


def test_a_preset_exports_for_serving_as_its_transformers_twin(tiny_tokenizer, tmp_path):
    from hf_models.conversion import export_for_serving

    configurable = to_configurable(build_tiny_model("zoo_modern", len(tiny_tokenizer))).eval()
    folder = export_for_serving(configurable, tiny_tokenizer, tmp_path / "llama")
    llama = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert llama.config.model_type == "llama"
    ids = ids_for(tiny_tokenizer)
    with torch.no_grad():
        torch.testing.assert_close(llama(ids).logits, configurable(ids).logits, rtol=0, atol=1e-5)
    odd = ConfigurableDecoderForCausalLM(ConfigurableDecoderConfig.preset("modern", **SMALL, qk_norm=True))
    with pytest.raises(ValueError, match=r"none of the presets.*qk_norm=True \(needs False\)"):
        export_for_serving(odd, tiny_tokenizer, tmp_path / "never")
    assert not (tmp_path / "never").exists()


def test_a_model_that_is_no_preset_does_not_convert_back_and_says_why():
    config = ConfigurableDecoderConfig.preset("modern", **SMALL, qk_norm=True, positions="none")
    with pytest.raises(ValueError, match=r"nearest is 'modern', which differs in: qk_norm=True \(needs False\), positions='none'"):
        dedicated_config_from(config)


def test_qk_norm_equals_transformers_qwen3_on_copied_weights():
    """Qwen3 is transformers' decoder with QK-norm (RMSNorm per head before RoPE), SwiGLU, GQA, no biases."""
    torch.manual_seed(0)
    config = ConfigurableDecoderConfig.preset(
        "modern", **SMALL, num_key_value_heads=2, intermediate_size=64, qk_norm=True, norm_eps=1e-6, tie_word_embeddings=False
    )
    ours = ConfigurableDecoderForCausalLM(config).eval()
    for layer in ours.model.layers:  # the norms start at 1: give them weights that matter
        for norm in (layer.self_attn.q_norm, layer.self_attn.k_norm, layer.input_layernorm):
            torch.nn.init.uniform_(norm.weight, 0.5, 1.5)
    reference = Qwen3ForCausalLM(
        Qwen3Config(
            vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, max_position_embeddings=64, rms_norm_eps=1e-6, tie_word_embeddings=False,
            attention_bias=False,
        )
    ).eval()
    missing, unexpected = reference.load_state_dict(ours.state_dict(), strict=False)
    assert not unexpected and not [name for name in missing if "rotary" not in name]
    ids = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, reference(ids).logits, rtol=0, atol=1e-5)
        plain = ConfigurableDecoderForCausalLM(ConfigurableDecoderConfig(**{**config.to_dict(), "qk_norm": False})).eval()
        plain.load_state_dict(ours.state_dict(), strict=False)
        assert (plain(ids).logits - ours(ids).logits).abs().max() > 1e-3  # the switch changes the function


# One switch at a time away from GPT-2, and a few combinations no lesson built.
SWITCHES = {
    "rmsnorm": dict(norm="rmsnorm"),
    "qk_norm": dict(qk_norm=True),
    "qk_norm_layernorm_no_bias": dict(qk_norm=True, bias=False),
    "rope": dict(positions="rope"),
    "nope": dict(positions="none"),
    "swiglu": dict(feed_forward="swiglu"),
    "moe": dict(feed_forward="moe", num_local_experts=4, num_experts_per_tok=2),
    "gqa": dict(num_key_value_heads=2),
    "mqa": dict(num_key_value_heads=1),
    "separate_qkv": dict(fused_qkv=False),
    "no_bias": dict(bias=False),
    "untied": dict(tie_word_embeddings=False),
    "modern_with_qk_norm_mqa_nope": dict(
        norm="rmsnorm", qk_norm=True, positions="none", feed_forward="swiglu", num_key_value_heads=1, fused_qkv=False, bias=False
    ),
    "gelu_moe_rope_untied": dict(
        positions="rope", feed_forward="moe", num_local_experts=4, num_experts_per_tok=1, tie_word_embeddings=False
    ),
}


@pytest.mark.parametrize("switch", sorted(SWITCHES))
def test_every_switch_builds_a_model_whose_cached_generation_matches(switch, tiny_tokenizer):
    torch.manual_seed(0)
    config = ConfigurableDecoderConfig(**{**SMALL, "vocab_size": len(tiny_tokenizer)}, **SWITCHES[switch])
    model = ConfigurableDecoderForCausalLM(config).eval()
    ids = ids_for(tiny_tokenizer, batch=1)
    with torch.no_grad():
        cached = model.generate(ids, max_new_tokens=8, do_sample=False, use_cache=True)
        uncached = model.generate(ids, max_new_tokens=8, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)
    names = {name for name, _ in model.named_parameters()}
    assert any("embed_positions" in n for n in names) == (config.positions == "learned")
    assert any("q_norm" in n for n in names) == config.qk_norm
    assert any(".experts." in n for n in names) == (config.feed_forward == "moe")
    assert any(n.endswith(".bias") for n in names) == config.bias
    assert ("lm_head.weight" in dict(model.named_parameters())) == (not config.tie_word_embeddings)
    loss = model(ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_attention_type_is_read_off_the_key_value_heads():
    kinds = {kv: ConfigurableDecoderConfig(**SMALL, num_key_value_heads=kv).attention_type for kv in (4, 2, 1)}
    assert kinds == {4: "multi-head", 2: "grouped-query", 1: "multi-query"}


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (dict(positions="alibi"), r"ConfigurableDecoderConfig.positions must be one of \['learned', 'rope', 'none'\], got 'alibi'"),
        (dict(norm="batchnorm"), r"ConfigurableDecoderConfig.norm must be one of \['layernorm', 'rmsnorm'\], got 'batchnorm'"),
        (dict(feed_forward="relu"), r"ConfigurableDecoderConfig.feed_forward must be one of \['gelu', 'swiglu', 'moe'\], got 'relu'"),
        (dict(num_key_value_heads=3), r"num_attention_heads=4 must be divisible by num_key_value_heads=3"),
        (dict(num_local_experts=2, num_experts_per_tok=3), r"num_experts_per_tok=3 must be at most num_local_experts=2"),
        (dict(qk_norm="yes"), r"ConfigurableDecoderConfig.qk_norm must be one of \[True, False\], got 'yes'"),
        (dict(positions="rope", head_dim=7), r"head_dim must be even for positions='rope', got 7"),
        (dict(router_aux_loss_coef=0.01), r"router_aux_loss_coef=0.01 applies only to feed_forward='moe'.*'gelu' it must be 0"),
    ],
)
def test_bad_switch_values_name_the_field(fields, message):
    with pytest.raises(ValueError, match=message):
        ConfigurableDecoderConfig(**{**SMALL, **fields})
    with pytest.raises(ValueError, match=r"preset name must be one of \['gpt', 'modern', 'moe'\], got 'llama'"):
        ConfigurableDecoderConfig.preset("llama")
