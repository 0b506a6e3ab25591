"""A saved folder carries only the code its forward runs: its lesson's files, the small shared base and lesson 6's cache.

Each registered type is saved with ``save_pretrained`` and its ``.py`` files are listed: a decoder
(GPT, modern, MoE, configurable) carries its configuration and modeling file, ``kv_cache.py`` (lesson
6, the cache every decoder generates with) and ``causal_lm.py`` (the transformers contract every
model shares): 4 files; the bigram, n-gram and GRU carry 3 (no KV cache). No folder carries another
lesson's model, and only a folder saved quantized with lesson 9's int8 carries the int8 code. That
each folder loads in a fresh process where ``hf_models`` cannot be imported is
``test_model_matrix.py::test_loads_with_trust_remote_code_where_hf_models_is_not_importable``
(and, quantized, ``test_quantization.py``).

Old folders: the weight names and shapes of every type are those saved before the lessons were
split into one file each (pinned below, recorded from commit 4a66604's classes on the same tiny
configs), so folders saved then load into today's classes unchanged.
"""

from __future__ import annotations

import hashlib

import pytest
import torch

import hf_models
from hf_models import ZooInt8Config
from tests.helpers import build_tiny_model

MODEL_TYPES = sorted(hf_models.MODEL_REGISTRY)
SHARED = {"causal_lm.py"}
DECODER = SHARED | {"kv_cache.py"}
EXPECTED_FILES = {
    "zoo_bigram": SHARED | {"configuration_bigram.py", "modeling_bigram.py"},
    "zoo_ngram_mlp": SHARED | {"configuration_ngram_mlp.py", "modeling_ngram_mlp.py"},
    "zoo_gru": SHARED | {"configuration_gru.py", "modeling_gru.py"},
    "zoo_gpt": DECODER | {"configuration_gpt.py", "modeling_gpt.py"},
    "zoo_modern": DECODER | {"configuration_modern.py", "modeling_modern.py"},
    "zoo_moe": DECODER | {"configuration_moe.py", "modeling_moe.py"},
    "zoo_configurable": DECODER | {"configuration_configurable.py", "modeling_configurable.py"},
}
MAX_FILES = {"zoo_bigram": 3, "zoo_ngram_mlp": 3, "zoo_gru": 3, "zoo_gpt": 4, "zoo_modern": 4, "zoo_moe": 4, "zoo_configurable": 4}
INT8_FILES = {"int8.py", "quantization_int8.py", "quantized_int8.py"}

# sha256 of "name:shape;..." over the sorted state dict of build_tiny_model(type, 64), first 16 hex digits.
WEIGHT_LAYOUT_BEFORE_THE_SPLIT = {
    "zoo_bigram": ("5473e68d182fb491", 1),
    "zoo_configurable": ("90d77a6bff511dba", 19),
    "zoo_gpt": ("8546560e6359b78e", 29),
    "zoo_gru": ("7a6b8001c64c7b24", 10),
    "zoo_modern": ("c3e1e4388e189134", 21),
    # Lesson 10's experts fused into Mixtral's (E, 2I, C) / (E, C, I) tensors (issue 19); folders of the
    # old per-expert layout still load (tests/test_moe.py, through modeling_moe.register_legacy_expert_layout).
    "zoo_moe": ("8ca1337d12330878", 21),
    "zoo_ngram_mlp": ("7d8aaed538882792", 5),
}


def test_every_type_is_covered():
    assert set(EXPECTED_FILES) == set(MODEL_TYPES) == set(WEIGHT_LAYOUT_BEFORE_THE_SPLIT)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_a_saved_folder_carries_only_its_lessons_code(model_type, tmp_path):
    build_tiny_model(model_type, 64).save_pretrained(tmp_path)
    carried = {path.name for path in tmp_path.glob("*.py")}
    assert carried == EXPECTED_FILES[model_type]
    assert len(carried) <= MAX_FILES[model_type]
    assert not carried & INT8_FILES


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_weight_names_and_shapes_are_those_of_folders_saved_before_the_split(model_type):
    state = build_tiny_model(model_type, 64).state_dict()
    layout = ";".join(f"{name}:{tuple(tensor.shape)}" for name, tensor in sorted(state.items()))
    assert (hashlib.sha256(layout.encode()).hexdigest()[:16], len(state)) == WEIGHT_LAYOUT_BEFORE_THE_SPLIT[model_type]


def test_only_a_folder_saved_int8_quantized_carries_the_int8_code(tmp_path):
    model = build_tiny_model("zoo_modern", 64)
    model.save_pretrained(tmp_path / "fp32")
    quantized = hf_models.AutoModelForCausalLM.from_pretrained(tmp_path / "fp32", quantization_config=ZooInt8Config())
    quantized.save_pretrained(tmp_path / "int8")
    carried = {path.name for path in (tmp_path / "int8").glob("*.py")}
    assert carried == EXPECTED_FILES["zoo_modern"] | INT8_FILES
    config = hf_models.AutoConfig.from_pretrained(tmp_path / "int8").to_dict()
    assert config["auto_map"]["AutoModelForCausalLM"] == "quantized_int8.ModernDecoderForCausalLM"
    assert config["auto_map"]["AutoConfig"] == "configuration_modern.ModernDecoderConfig"


def test_the_gpt_starts_with_gpt2s_scaled_residual_init():
    """GPT-2 and nanoGPT: the projections that write into the residual stream start at 0.02 / sqrt(2 * layers)."""
    layers = 8
    torch.manual_seed(0)
    model = hf_models.GPTForCausalLM(hf_models.GPTConfig(vocab_size=64, hidden_size=256, num_hidden_layers=layers, num_attention_heads=4))
    expected = 0.02 / (2 * layers) ** 0.5  # 0.0050
    for layer in model.model.layers:
        for projection in (layer.self_attn.o_proj, layer.mlp.down_proj):
            assert abs(projection.weight.std().item() - expected) < 0.1 * expected
        assert abs(layer.mlp.up_proj.weight.std().item() - 0.02) < 0.002  # every other Linear keeps 0.02
    # lesson 12's GPT preset starts the same; LLaMA-style models keep 0.02 (as transformers' Llama).
    torch.manual_seed(0)
    preset = hf_models.ConfigurableDecoderForCausalLM(
        hf_models.ConfigurableDecoderConfig.preset("gpt", vocab_size=64, hidden_size=256, num_hidden_layers=layers, num_attention_heads=4)
    )
    torch.testing.assert_close(preset.state_dict(), model.state_dict(), rtol=0, atol=0)
    modern = hf_models.ModernDecoderForCausalLM(hf_models.ModernDecoderConfig(vocab_size=64, hidden_size=256, num_hidden_layers=layers, num_attention_heads=4))
    assert abs(modern.model.layers[0].self_attn.o_proj.weight.std().item() - 0.02) < 0.002
