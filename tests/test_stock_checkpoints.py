"""Stock checkpoints load into the zoo's own classes and compute transformers' function, or are refused by name.

Each family's twin is a random-weight checkpoint saved by transformers' own class in the Hub layout
(``tests.helpers.save_stock_twin``): config.json, model.safetensors and a real tokenizer.json.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, MixtralConfig, Qwen2Config
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from hf_models import ModernDecoderConfig, ModernDecoderForCausalLM, MoEDecoderForCausalLM
from hf_models.conversion import configurable_config_from, load_stock_checkpoint, modern_to_llama, moe_to_mixtral
from hf_models.conversion.stock_configs import FIELD_HANDLING
from hf_models.modeling_gpt import GPTForCausalLM
from hf_models.modeling_modern import RotaryEmbedding
from tests.helpers import TINY_TEXT, save_stock_twin, stock_twin_config

TOLERANCE = dict(rtol=1e-5, atol=1e-5)
ZOO_CLASS = {"gpt2": GPTForCausalLM, "llama": ModernDecoderForCausalLM, "qwen2": ModernDecoderForCausalLM, "mixtral": MoEDecoderForCausalLM}
CONFIG_CLASS = {"gpt2": GPT2Config, "llama": LlamaConfig, "qwen2": Qwen2Config, "mixtral": MixtralConfig}


def assert_same_function(ours: torch.nn.Module, theirs: torch.nn.Module, vocab_size: int, length: int = 300) -> float:
    """Logits to 1e-5 over ``length`` positions (past Llama 3's 256-token pretraining context) and identical greedy
    tokens (with the KV cache); returns the largest |difference| of the logits."""
    x = torch.randint(0, vocab_size, (2, length), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ours(x).logits, theirs(x).logits
    torch.testing.assert_close(a, b, **TOLERANCE)
    prompt = x[:, :12]
    greedy = [m.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=16, do_sample=False, pad_token_id=0) for m in (ours, theirs)]
    assert torch.equal(*greedy)
    return (a - b).abs().max().item()


@pytest.mark.parametrize("model_type", sorted(ZOO_CLASS))
def test_stock_checkpoint_loads_into_the_zoo_class_with_the_same_logits(model_type, tmp_path):
    """The loader returns the zoo class for the family, the checkpoint's own tokenizer, and transformers' logits."""
    save_stock_twin(model_type, tmp_path / "stock")
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "stock").eval()
    ours, tokenizer = load_stock_checkpoint(tmp_path / "stock")
    assert type(ours) is ZOO_CLASS[model_type] and type(theirs) is not type(ours)
    assert tokenizer.get_vocab() == AutoTokenizer_vocab(tmp_path / "stock")
    assert ours.config.source_checkpoint == {"model_type": model_type, "name_or_path": str(tmp_path / "stock")}
    assert_same_function(ours.eval(), theirs, len(tokenizer))
    # Saved as a zoo folder, it reloads with every new field (biases, rotary scaling) and the same function.
    ours.save_pretrained(tmp_path / "zoo")
    assert_same_function(AutoModelForCausalLM.from_pretrained(tmp_path / "zoo").eval(), theirs, len(tokenizer))


def AutoTokenizer_vocab(folder) -> dict:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder).get_vocab()


def test_the_twins_carry_what_they_claim(tmp_path):
    """The twins exercise the features named in the issue; a twin that lost one would make the tests above vacuous."""
    llama = save_stock_twin("llama", tmp_path / "llama")
    ours, _ = load_stock_checkpoint(tmp_path / "llama")
    c = ours.config
    assert c.head_dim == 16 != c.hidden_size // c.num_attention_heads and c.num_key_value_heads < c.num_attention_heads
    assert c.attention_bias and c.attention_output_bias and c.mlp_bias and not c.tie_word_embeddings
    assert c.rope_frequency_scaling["rope_type"] == "llama3"
    assert llama.model.layers[0].self_attn.o_proj.bias.abs().sum() > 0  # random, not transformers' zero init
    save_stock_twin("qwen2", tmp_path / "qwen2")
    qwen, _ = load_stock_checkpoint(tmp_path / "qwen2")
    assert qwen.config.attention_bias and not qwen.config.attention_output_bias and qwen.config.tie_word_embeddings
    assert qwen.config.rope_theta == 1e6


@pytest.mark.parametrize("model_type, overrides", [
    ("gpt2", dict(tie_word_embeddings=False)),
    ("llama", dict(pretraining_tp=2)),  # transformers 5 does not read it: the same function
    ("llama", dict(rope_parameters={"rope_type": "default", "rope_theta": 123.0}, attention_bias=False, mlp_bias=False, head_dim=None)),
    ("qwen2", dict(use_sliding_window=True, max_window_layers=2)),  # the flag, but no layer past max_window_layers
    ("qwen2", dict(tie_word_embeddings=False, head_dim=16)),  # head_dim from config.json, read by Qwen2's model
    ("mixtral", dict(rope_parameters={"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 256})),
])
def test_config_variants_load_exactly(model_type, overrides, tmp_path):
    save_stock_twin(model_type, tmp_path / "stock", **overrides)
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "stock").eval()
    ours, tokenizer = load_stock_checkpoint(tmp_path / "stock")
    assert_same_function(ours.eval(), theirs, len(tokenizer))


def test_exported_back_to_transformers_the_function_is_kept(tmp_path):
    """Llama with biases and Llama 3's rotary, and Mixtral with it, round-trip through the zoo and back."""
    for model_type, export in (("llama", modern_to_llama), ("mixtral", moe_to_mixtral)):
        overrides = {} if model_type == "llama" else dict(rope_parameters=stock_twin_config("llama", 10).rope_parameters)
        theirs = save_stock_twin(model_type, tmp_path / model_type, **overrides)
        ours, tokenizer = load_stock_checkpoint(tmp_path / model_type)
        assert_same_function(export(ours), theirs, len(tokenizer), length=40)
    qwen = save_stock_twin("qwen2", tmp_path / "qwen2")
    with pytest.raises(ValueError, match="attention_output_bias=False"):
        modern_to_llama(load_stock_checkpoint(tmp_path / "qwen2")[0])
    del qwen


def test_llama3_rotary_frequencies_match_transformers():
    """The hand-written frequency adjustment equals transformers' rope init, and the test case has all three bands."""
    config = stock_twin_config("llama", 100)
    theirs, scaling = ROPE_INIT_FUNCTIONS["llama3"](config)
    assert scaling == 1.0
    rope = config.rope_parameters
    ours = RotaryEmbedding(config.head_dim, base=rope["rope_theta"], frequency_scaling=rope).inv_freq
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=0)
    plain = RotaryEmbedding(config.head_dim, base=rope["rope_theta"]).inv_freq
    ratio = plain / ours
    kept, divided = torch.isclose(ratio, torch.tensor(1.0)), torch.isclose(ratio, torch.tensor(rope["factor"]))
    assert kept.any() and divided.any() and (~kept & ~divided).any()  # fast pairs kept, slow ones divided, one blended


@pytest.mark.parametrize("model_type", sorted(CONFIG_CLASS))
def test_every_field_of_the_family_config_has_a_decision(model_type):
    """Walked field by field: a field transformers adds to the config class fails here until it is decided."""
    fields = set(vars(CONFIG_CLASS[model_type])["__annotations__"])
    assert set(FIELD_HANDLING[model_type]) == fields


REFUSALS = [
    ("gpt2", dict(scale_attn_by_inverse_layer_idx=True), ["scale_attn_by_inverse_layer_idx=True"]),
    ("gpt2", dict(reorder_and_upcast_attn=True), ["reorder_and_upcast_attn=True"]),
    ("gpt2", dict(scale_attn_weights=False), ["scale_attn_weights=False"]),
    ("gpt2", dict(activation_function="relu"), ["activation_function='relu'", "gelu_new"]),
    ("gpt2", dict(embd_pdrop=0.0, resid_pdrop=0.1), ["embd_pdrop=0.0", "embd_pdrop=0.1"]),
    ("gpt2", dict(add_cross_attention=True), ["add_cross_attention=True"]),
    ("llama", dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0, "original_max_position_embeddings": 256}),
     ["rope_type='yarn'", "'default' and 'llama3'"]),
    ("llama", dict(rope_parameters={"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}), ["rope_type='linear'"]),
    ("llama", dict(rope_parameters={"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}), ["rope_type='dynamic'"]),
    ("llama", dict(rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}), ["partial_rotary_factor=0.5"]),
    ("llama", dict(hidden_act="gelu"), ["hidden_act='gelu'", "hidden_act='silu'"]),
    ("qwen2", dict(use_sliding_window=True, sliding_window=64, max_window_layers=1), ["use_sliding_window=True", "sliding_window=64", "layers [1]"]),
    ("qwen2", dict(hidden_act="relu"), ["hidden_act='relu'"]),
    ("mixtral", dict(router_jitter_noise=0.1), ["router_jitter_noise=0.1"]),
    ("mixtral", dict(sliding_window=64), ["sliding_window=64"]),
    ("mixtral", dict(hidden_act="gelu", router_jitter_noise=0.1), ["hidden_act='gelu'", "router_jitter_noise=0.1"]),  # all at once
]


@pytest.mark.parametrize("model_type, overrides, messages", REFUSALS, ids=[f"{t}-{next(iter(o))}" for t, o, _ in REFUSALS])
def test_what_the_zoo_does_not_compute_exactly_is_refused_by_name_before_the_weights(model_type, overrides, messages, tmp_path):
    """A config.json alone (no weights): the refusal must come from the config, before any weight is read."""
    stock_twin_config(model_type, 100, **overrides).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="refused rather than approximated") as error:
        load_stock_checkpoint(tmp_path)
    for message in messages:
        assert message in str(error.value)


def test_a_zoo_folder_is_not_taken_for_a_stock_checkpoint(tmp_path):
    ModernDecoderForCausalLM(ModernDecoderConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=4)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="model_type 'zoo_modern' is not a stock family"):
        load_stock_checkpoint(tmp_path)


def test_folders_saved_before_the_new_fields_load_as_before(tmp_path):
    """A modern config.json without attention_bias, mlp_bias or rope_frequency_scaling is today's model: no biases,
    plain RoPE, the same logits."""
    torch.manual_seed(0)
    model = ModernDecoderForCausalLM(ModernDecoderConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=4)).eval()
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    for key in ("attention_bias", "attention_output_bias", "mlp_bias", "rope_frequency_scaling"):
        config.pop(key)
    (tmp_path / "config.json").write_text(json.dumps(config))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert not any(name.endswith("bias") for name, _ in reloaded.named_parameters())
    assert reloaded.config.rope_frequency_scaling is None
    x = torch.randint(0, 50, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).logits, model(x).logits, rtol=0, atol=0)


def test_lesson_12_refuses_what_it_has_no_toggle_for(tmp_path):
    save_stock_twin("qwen2", tmp_path)
    qwen, _ = load_stock_checkpoint(tmp_path)
    with pytest.raises(ValueError, match="configurable decoder has no field for .*attention_bias"):
        configurable_config_from(qwen.config)


def test_the_tokenizer_is_the_checkpoints_own(tmp_path):
    save_stock_twin("qwen2", tmp_path)
    _, tokenizer = load_stock_checkpoint(tmp_path)
    assert tokenizer.chat_template is not None and "<|im_start|>" in tokenizer.chat_template
    assert tokenizer.decode(tokenizer(TINY_TEXT)["input_ids"]) == TINY_TEXT


@pytest.mark.parametrize("model_type", ["gpt2", "mixtral"])
def test_peft_all_linear_lora_with_dropout_trains_the_loaded_model(model_type, tmp_path):
    """What failed on transformers' own classes: GPT-2's Conv1D matched no nn.Linear. Mixtral's fused 3-D experts (the
    zoo MoE's too) are no nn.Linear: "all-linear" adapts attention, and the experts take LoRA through
    ``target_parameters`` (peft's ParamWrapper), which refuses lora_dropout, so only with lora_dropout=0."""
    from peft import LoraConfig, get_peft_model

    save_stock_twin(model_type, tmp_path)
    model, tokenizer = load_stock_checkpoint(tmp_path)
    adapted = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.05, target_modules="all-linear"))
    targets = {name.rsplit(".", 1)[-1] for name, module in adapted.named_modules() if hasattr(module, "lora_A")}
    assert targets == ({"qkv_proj", "o_proj", "up_proj", "down_proj"} if model_type == "gpt2"
                       else {"q_proj", "k_proj", "v_proj", "o_proj"})
    x = torch.tensor([tokenizer(TINY_TEXT)["input_ids"]])
    adapted.train()(input_ids=x, labels=x).loss.backward()
    assert all(p.grad is not None for n, p in adapted.named_parameters() if p.requires_grad and "lora_B" in n)
    if model_type == "mixtral":
        model, _ = load_stock_checkpoint(tmp_path)
        experts = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj"],
                             target_parameters=["experts.gate_up_proj", "experts.down_proj"])
        adapted = get_peft_model(model, experts)
        adapted.train()(input_ids=x, labels=x).loss.backward()
        expert_factors = [n for n, p in adapted.named_parameters() if "lora_B" in n and "experts" in n]
        assert len(expert_factors) == 2 * model.config.num_hidden_layers
        assert all(p.grad is not None for n, p in adapted.named_parameters() if n in expert_factors)
