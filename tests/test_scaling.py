"""The scaling notes' numbers: published frontier figures, and analytic counts equal to real models' own counts."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, BertConfig, GPT2Config, LlamaConfig, MistralConfig, MixtralConfig, Qwen2Config
from transformers.pytorch_utils import Conv1D

import hf_models
from hf_models.experiments.scaling import FRONTIER_CONFIGS, main, scaling_figures, scaling_note

TINY = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, max_position_embeddings=16)
TINY_HF = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, max_position_embeddings=16)


def frontier(name: str):
    return scaling_figures(FRONTIER_CONFIGS[name](), name)


# --- against published figures --------------------------------------------------------------------------------


def test_llama_2_7b_parameters_and_its_2_gib_cache_at_4096_tokens():
    figures = frontier("llama-2-7b")
    assert figures.total_parameters == figures.active_parameters == 6_738_415_616
    assert figures.context == 4096
    assert figures.kv_cache_bytes_per_context == 2 * 2**30  # 2 (K, V) x 32 layers x 4096 wide x 2 B x 4096 tokens
    assert figures.weight_bytes["bf16"] == 2 * 6_738_415_616 and figures.weight_bytes["fp32"] == 4 * 6_738_415_616


def test_llama_3_gqa_cuts_the_cache_per_token_by_4x():
    assert frontier("llama-2-7b").kv_cache_bytes_per_token == 4 * frontier("llama-3-8b").kv_cache_bytes_per_token


def test_mixtral_total_and_active_parameters():
    figures = frontier("mixtral-8x7b")
    assert figures.total_parameters == 46_702_792_704
    assert figures.active_parameters == 12_879_925_248
    assert figures.context == 32768


def test_gpt2_xl_parameters():
    assert frontier("gpt2-xl").total_parameters == 1_557_611_200


def test_training_flops_are_6n_plus_12lhqt_by_hand():
    config = hf_models.ModernDecoderConfig(**TINY, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64)
    # Per layer, matmul weights: q 32x32 + k 16x32 + v 16x32 + o 32x32 + SwiGLU 3 x 32x64 = 9216; two layers,
    # plus the (tied) LM head 64x32 = 2048: N = 20480. Attention: 12 x 2 layers x 4 heads x 8 wide x 16 tokens.
    assert scaling_figures(config).training_flops_per_token == 6 * 20480 + 12 * 2 * 4 * 8 * 16
    assert scaling_figures(config, context=32).training_flops_per_token == 6 * 20480 + 12 * 2 * 4 * 8 * 32


# --- analytic counts equal the real models' ----------------------------------------------------------------------

ZOO_CONFIGS = {
    "bigram": lambda: hf_models.BigramConfig(vocab_size=64),
    "ngram_mlp": lambda: hf_models.NGramMLPConfig(vocab_size=64, context_size=3, embedding_dim=8, hidden_size=32),
    "ngram_mlp_direct": lambda: hf_models.NGramMLPConfig(vocab_size=64, context_size=3, embedding_dim=8, hidden_size=32, direct_connection=True),
    "gru": lambda: hf_models.GRULMConfig(**TINY),
    "gru_untied": lambda: hf_models.GRULMConfig(**TINY, tie_word_embeddings=False),
    "gpt": lambda: hf_models.GPTConfig(**TINY, num_attention_heads=4),
    "gpt_untied_no_bias": lambda: hf_models.GPTConfig(**TINY, num_attention_heads=4, bias=False, tie_word_embeddings=False),
    "modern_gqa": lambda: hf_models.ModernDecoderConfig(**TINY, num_attention_heads=4, num_key_value_heads=2),
    "modern_untied_head_dim": lambda: hf_models.ModernDecoderConfig(
        **TINY, num_attention_heads=4, num_key_value_heads=1, head_dim=16, tie_word_embeddings=False
    ),
    "moe": lambda: hf_models.MoEDecoderConfig(**TINY, num_attention_heads=4, num_local_experts=4, num_experts_per_tok=2),
    "configurable_gpt": lambda: hf_models.ConfigurableDecoderConfig(**TINY, num_attention_heads=4),
    "configurable_modern_qk_norm": lambda: hf_models.ConfigurableDecoderConfig.preset(
        "modern", **TINY, num_attention_heads=4, num_key_value_heads=2, qk_norm=True, tie_word_embeddings=False
    ),
    "configurable_moe_layernorm_bias": lambda: hf_models.ConfigurableDecoderConfig.preset(
        "moe", **TINY, num_attention_heads=4, norm="layernorm", bias=True, qk_norm=True, num_local_experts=4, num_experts_per_tok=1
    ),
    "configurable_rmsnorm_bias": lambda: hf_models.ConfigurableDecoderConfig.preset("modern", **TINY, num_attention_heads=4, bias=True),
    # Width 20: q, k and v are 400 weights each, not a multiple of nf4's 64-block, so fused and separate differ in bytes.
    "configurable_nope_unfused": lambda: hf_models.ConfigurableDecoderConfig(
        **{**TINY, "hidden_size": 20}, num_attention_heads=4, positions="none", fused_qkv=False
    ),
    "gpt_width_20": lambda: hf_models.GPTConfig(**{**TINY, "hidden_size": 20}, num_attention_heads=4),
}


def expected_weight_bytes(model: torch.nn.Module) -> dict[str, int]:
    """The documented rule, read off the real modules: every Linear weight but the LM head's is quantized
    (GPT-2's Conv1D is a Linear stored transposed; bitsandbytes quantizes it too)."""
    rows = {
        id(m.weight): m.out_features if isinstance(m, torch.nn.Linear) else m.nf
        for name, m in model.named_modules()
        if isinstance(m, (torch.nn.Linear, Conv1D)) and not name.endswith("lm_head")
    }
    int8 = nf4 = 0
    for p in model.parameters():  # tied parameters once
        if id(p) in rows:
            int8 += p.numel() + 4 * rows[id(p)]
            nf4 += p.numel() // 2 + 4 * -(-p.numel() // 64)
        else:
            int8 += 2 * p.numel()
            nf4 += 2 * p.numel()
    total = model.num_parameters()
    return {"fp32": 4 * total, "bf16": 2 * total, "int8": int8, "nf4": nf4}


@pytest.mark.parametrize("case", sorted(ZOO_CONFIGS))
def test_analytic_count_equals_the_zoo_model(case):
    config = ZOO_CONFIGS[case]()
    torch.manual_seed(0)
    model = hf_models.MODEL_REGISTRY[config.model_type][1](config)
    figures = scaling_figures(config)
    assert figures.total_parameters == model.num_parameters()
    active = model.num_active_parameters() if hasattr(model, "num_active_parameters") else model.num_parameters()
    assert figures.active_parameters == active
    if "moe" in case:
        assert figures.active_parameters < figures.total_parameters
    assert figures.weight_bytes == expected_weight_bytes(model)


def test_recurrent_models_have_a_fixed_state_not_a_kv_cache():
    config = hf_models.GRULMConfig(**TINY)
    short, long = scaling_figures(config, context=10), scaling_figures(config, context=10_000)
    assert short.kv_cache_bytes_per_token == long.kv_cache_bytes_per_context == 0
    assert short.state_bytes_per_sequence == long.state_bytes_per_sequence == 2 * 32 * 2  # layers x hidden x 2 B
    assert scaling_figures(hf_models.BigramConfig()).state_bytes_per_sequence == 0
    assert scaling_figures(hf_models.NGramMLPConfig()).kv_cache_bytes_per_token == 0


def test_gqa_and_head_dim_set_the_zoo_cache():
    config = hf_models.ModernDecoderConfig(**TINY, num_attention_heads=4, num_key_value_heads=1, head_dim=16)
    assert scaling_figures(config, kv_bytes=1).kv_cache_bytes_per_token == 2 * 2 * 1 * 16  # K+V x layers x kv heads x head_dim


HF_CONFIGS = {
    "gpt2": lambda: GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=16),
    "gpt2_width_20": lambda: GPT2Config(vocab_size=64, n_embd=20, n_layer=2, n_head=4, n_positions=16),
    "gpt2_n_inner_untied": lambda: GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=16, n_inner=40, tie_word_embeddings=False),
    "llama_gqa_untied": lambda: LlamaConfig(**TINY_HF, num_key_value_heads=2, tie_word_embeddings=False),
    "llama_biases_tied": lambda: LlamaConfig(**TINY_HF, num_key_value_heads=4, attention_bias=True, mlp_bias=True, tie_word_embeddings=True),
    "mistral_head_dim": lambda: MistralConfig(**TINY_HF, num_key_value_heads=2, head_dim=16),
    "qwen2": lambda: Qwen2Config(**TINY_HF, num_key_value_heads=2),
    "mixtral": lambda: MixtralConfig(**TINY_HF, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2),
}


@pytest.mark.parametrize("case", sorted(HF_CONFIGS))
def test_analytic_count_equals_the_transformers_model(case):
    config = HF_CONFIGS[case]()
    model = AutoModelForCausalLM.from_config(config)
    figures = scaling_figures(config)
    assert figures.total_parameters == model.num_parameters()
    if case == "mixtral":  # 2 of 4 SwiGLU experts (3 x 32 x 48 each) idle per token in each of 2 layers
        assert figures.active_parameters == model.num_parameters() - 2 * 2 * 3 * 32 * 48
    else:
        assert figures.active_parameters == figures.total_parameters
    if case != "mixtral":  # transformers' Mixtral keeps its experts as 3-D tensors, not Linears
        assert figures.weight_bytes == expected_weight_bytes(model)


# --- the note and its errors ---------------------------------------------------------------------------------------


def test_note_is_a_markdown_table_of_both_models():
    note = scaling_note(hf_models.ModernDecoderConfig(), "llama-3-8b", name="lesson 5")
    header, rule = note.splitlines()[:2]
    assert "lesson 5" in header and "llama-3-8b" in header
    assert rule.startswith("|---")
    assert "8.03B" in note and "10.5M" in note
    assert 2 <= sum(line.startswith("- ") for line in note.splitlines()) <= 4


@pytest.mark.parametrize("case", sorted(ZOO_CONFIGS))
def test_every_zoo_model_gets_a_note(case):
    note = scaling_note(ZOO_CONFIGS[case](), "mixtral-8x7b", name=case)
    assert note.count("\n|") >= 10 and "mixtral-8x7b stores 46.7B" in note


def test_unknown_frontier_and_unsupported_type_name_the_value():
    with pytest.raises(ValueError, match="'gpt-5'") as error:
        scaling_note(hf_models.GPTConfig(), "gpt-5")
    assert "llama-2-7b" in str(error.value)
    with pytest.raises(ValueError, match="'bert'") as error:
        scaling_figures(BertConfig())
    assert "zoo_modern" in str(error.value) and "mixtral" in str(error.value)


def test_cli_prints_the_note_for_a_saved_folder(tmp_path, capsys):
    hf_models.ModernDecoderConfig().save_pretrained(tmp_path)
    assert main([str(tmp_path), "--frontier", "mixtral-8x7b"]) == 0
    out = capsys.readouterr().out
    assert tmp_path.name in out and "mixtral-8x7b" in out and "46.7B" in out


@pytest.mark.parametrize(
    "argv, named",
    [(["/no/such/folder"], ["--model", "'/no/such/folder'", "zoo_modern"]), (["zoo_modern", "--frontier", "gpt-5"], ["--frontier", "'gpt-5'", "llama-3-8b"])],
)
def test_cli_bad_input_names_the_flag_the_value_and_what_is_allowed(argv, named, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert all(word in err for word in named), err


def test_serving_a_model_whose_weights_outgrow_one_gpu_says_so():
    """Mixtral 8x7B's experts stay bf16 under 4-bit quantization (bitsandbytes swaps nn.Linear only): 85 GiB,
    more than an 80 GiB GPU. The note says it is served across GPUs (it once printed "-2 such sequences")."""
    note = scaling_note(hf_models.MoEDecoderConfig(), "mixtral-8x7b", name="lesson 10")
    serving = next(line for line in note.splitlines() if line.startswith("- Serving"))
    assert "several GPUs" in serving and "-" not in serving.split(";")[1]
    assert "such sequences" in scaling_note(hf_models.ModernDecoderConfig(), "llama-3-8b")  # one that fits keeps its batch
