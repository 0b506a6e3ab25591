"""Lesson 9: the hand-written int8 (``hf_models/int8.py``, ``hf_models/quantization_int8.py``).

* each scheme's math against its formula, and the rounding error bound;
* the same codes and scales as bitsandbytes on identical weights, and the same layer outputs
  where the schemes coincide (bitsandbytes computes in fp16: fp16 tolerances);
* LLM.int8()'s decomposition: exact where int8 is lossless; outliers break plain absmax, the
  decomposition recovers;
* the quantizer in ``from_pretrained``: quantize on load -> save -> reload, identical logits,
  int8 in the safetensors, also with ``trust_remote_code`` where hf_models is absent; ``generate``
  with the hand KV cache and ``pipeline``; bad input named.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoModelForCausalLM, pipeline

import hf_models
from hf_models import ZooInt8Config
from hf_models.int8 import (
    Int8Linear,
    absmax_quantize,
    dequantize,
    int8_matmul,
    llm_int8_matmul,
    outlier_columns,
    quantize,
    w8a8_matmul,
)
from hf_models.kv_cache import GrowingKVCache
from tests.helpers import TINY_TEXT, build_tiny_model

pytestmark = pytest.mark.usefixtures("single_thread")
SCHEMES = ["weight_only", "w8a8", "llm_int8"]


def fp16_exact(*shape: int, generator: torch.Generator) -> torch.Tensor:
    """Random fp32 values that fp16 represents exactly (bitsandbytes casts to fp16 before it quantizes)."""
    return torch.randn(*shape, generator=generator).half().float()


# ----------------------------------------------------------------------------- the math


def test_absmax_codes_and_scales_follow_the_formula_and_bound_the_error():
    weight = torch.randn(24, 40, generator=torch.Generator().manual_seed(0)) * torch.logspace(-2, 1, 24)[:, None]
    codes, scale = absmax_quantize(weight)
    reference_absmax = weight.double().abs().amax(dim=1)
    assert codes.dtype == torch.int8 and codes.shape == weight.shape and scale.shape == (24,)
    torch.testing.assert_close(scale.double(), reference_absmax / 127, rtol=1e-7, atol=0)
    torch.testing.assert_close(codes, torch.round(weight.double() * 127 / reference_absmax[:, None]).to(torch.int8), rtol=0, atol=0)
    assert (codes.abs().amax(dim=1) == 127).all()  # each row's largest weight maps to +-127
    error = (dequantize(codes, scale) - weight).abs()
    assert (error <= scale[:, None] / 2 * (1 + 1e-5)).all()  # per-channel rounding: at most half a step
    # Per-channel beats per-tensor on rows of different magnitude: the small rows keep their resolution.
    per_tensor_scale = weight.abs().max() / 127
    per_tensor_error = (torch.round(weight / per_tensor_scale) * per_tensor_scale - weight).abs().mean()
    assert error.mean() < per_tensor_error / 3
    zero_codes, zero_scale = absmax_quantize(torch.zeros(2, 8))
    assert not zero_codes.any() and not zero_scale.any()


def test_w8a8_matmul_is_the_exact_integer_product_times_both_scales():
    generator = torch.Generator().manual_seed(1)
    x, weight = torch.randn(7, 48, generator=generator), torch.randn(16, 48, generator=generator)
    weight_codes, weight_scale = absmax_quantize(weight)
    x_codes, x_scale = absmax_quantize(x)
    exact = x_codes.long() @ weight_codes.long().T  # int64, no rounding anywhere
    assert torch.equal(int8_matmul(x_codes, weight_codes), exact.to(torch.int32))
    expected = exact.double() * x_scale.double()[:, None] * weight_scale.double()[None, :]
    torch.testing.assert_close(w8a8_matmul(x, weight_codes, weight_scale).double(), expected, rtol=1e-6, atol=1e-6)


def test_llm_int8_decomposition_is_exact_where_int8_is_lossless():
    """Integer activations with a 127 in each row quantize without loss; the two outlier columns
    (|x| >= threshold) go through the fp matmul. With power-of-two weight scales everything is an
    exact integer sum in fp32, so the decomposition must equal x @ W.T to the last bit, while plain
    per-token absmax (the outliers setting the row scale) cannot."""
    generator = torch.Generator().manual_seed(2)
    x = torch.randint(-127, 128, (6, 32), generator=generator).float()
    x[:, 0] = 127
    x[:, [5, 17]] = torch.tensor([[1000.0, -3000.0]]).repeat(6, 1)  # outlier features, every token
    weight_codes = torch.randint(-127, 128, (10, 32), generator=generator, dtype=torch.int8)
    weight_codes[:, 0] = 127
    weight_scale = torch.full((10,), 2.0**-7)
    weight = dequantize(weight_codes, weight_scale)
    threshold = 500.0
    assert outlier_columns(x, threshold).tolist() == [5, 17]
    exact = x.double() @ weight.double().T
    decomposed = llm_int8_matmul(x, weight_codes, weight_scale, threshold)
    torch.testing.assert_close(decomposed.double(), exact, rtol=0, atol=0)
    # Its fp half alone, on the outlier columns only, is exactly the fp matmul of those columns.
    only_outliers = torch.zeros_like(x)
    only_outliers[:, [5, 17]] = x[:, [5, 17]]
    torch.testing.assert_close(llm_int8_matmul(only_outliers, weight_codes, weight_scale, threshold).double(),
                               x[:, [5, 17]].double() @ weight[:, [5, 17]].double().T, rtol=0, atol=0)
    assert (w8a8_matmul(x, weight_codes, weight_scale).double() - exact).abs().max() > 1.0


def test_outlier_features_break_absmax_int8_and_llm_int8_recovers():
    """The LLM.int8() paper's finding in miniature: three feature columns 60x larger than the rest."""
    generator = torch.Generator().manual_seed(3)
    x, weight = torch.randn(64, 256, generator=generator), torch.randn(128, 256, generator=generator) / 16
    codes, scale = absmax_quantize(weight)
    exact = x @ dequantize(codes, scale).T  # isolate activation error: same int8 weights everywhere

    def error(out):  # absolute: the outliers also inflate the output, which would flatter a relative error
        return (out - exact).norm().item()

    clean_absmax, clean_llm = error(w8a8_matmul(x, codes, scale)), error(llm_int8_matmul(x, codes, scale))
    with_outliers = x.clone()
    with_outliers[:, [7, 100, 201]] *= 60.0
    exact = with_outliers @ dequantize(codes, scale).T
    outlier_absmax, outlier_llm = error(w8a8_matmul(with_outliers, codes, scale)), error(llm_int8_matmul(with_outliers, codes, scale))
    print(f"error norm: clean absmax {clean_absmax:.4f}, clean llm_int8 {clean_llm:.4f}, "
          f"outliers absmax {outlier_absmax:.4f}, outliers llm_int8 {outlier_llm:.4f}")
    assert outlier_absmax > 5 * clean_absmax  # one outlier per row flattens the row's scale
    assert outlier_llm < outlier_absmax / 5  # the decomposition takes the outliers out of int8
    assert outlier_llm < 2 * clean_absmax


def _linear(weight: torch.Tensor, bias: torch.Tensor | None = None) -> nn.Linear:
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
    return linear


@pytest.mark.parametrize("scheme", SCHEMES)
def test_int8_linear_keeps_nn_linear_shapes_and_bias(scheme):
    generator = torch.Generator().manual_seed(4)
    linear = _linear(torch.randn(12, 32, generator=generator), torch.randn(12, generator=generator))
    layer = Int8Linear.from_linear(linear, scheme)
    x = torch.randn(2, 5, 32, generator=generator)
    out = layer(x)
    assert out.shape == (2, 5, 12) and out.dtype == x.dtype
    reference = linear(x)
    assert ((out - reference).norm() / reference.norm()).item() < 0.02
    if scheme == "weight_only":  # dequantize-then-matmul: exactly F.linear on the dequantized weight
        torch.testing.assert_close(out, nn.functional.linear(x, layer.dequantized_weight(), linear.bias), rtol=0, atol=0)


# ----------------------------------------------------------------------------- against bitsandbytes


def test_same_codes_and_scales_as_bitsandbytes_vectorwise_quant():
    import bitsandbytes.functional as bnb_functional

    weight = fp16_exact(48, 64, generator=torch.Generator().manual_seed(5))
    bnb_codes, bnb_absmax, _ = bnb_functional.int8_vectorwise_quant(weight.clone())
    codes, scale = absmax_quantize(weight)
    assert torch.equal(codes, bnb_codes)
    assert torch.equal(scale, bnb_absmax / 127)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_hand_int8_matches_bitsandbytes_linear8bitlt_on_identical_weights(scheme):
    """weight_only = F.linear on bitsandbytes' dequantized weight (1e-6); w8a8 = Linear8bitLt
    (threshold 0); llm_int8 = Linear8bitLt(threshold=6), with outlier columns that hold only
    outliers, where the two define the int8 part alike. bitsandbytes computes in fp16: 2e-3 relative."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnb_functional

    generator = torch.Generator().manual_seed(6)
    weight = fp16_exact(32, 64, generator=generator)
    x = fp16_exact(9, 64, generator=generator).clamp(-3, 3)
    if scheme == "llm_int8":
        x[:, [3, 40]] = torch.tensor([9.0, -12.0])
    threshold = 6.0 if scheme == "llm_int8" else 0.0
    reference = bnb.nn.Linear8bitLt(64, 32, bias=False, has_fp16_weights=False, threshold=threshold)
    reference.load_state_dict(_linear(weight).state_dict())
    reference = reference.to("cpu").eval()
    ours = Int8Linear.from_linear(_linear(weight), scheme)
    assert torch.equal(ours.weight, reference.weight.data) and torch.equal(ours.weight_scale, reference.weight.SCB / 127)
    with torch.no_grad():
        if scheme == "weight_only":
            bnb_weight = bnb_functional.int8_vectorwise_dequant(reference.weight.data, reference.weight.SCB)
            torch.testing.assert_close(ours(x), nn.functional.linear(x, bnb_weight), rtol=1e-6, atol=1e-6)
        else:
            expected = reference(x).float()
            torch.testing.assert_close(ours(x), expected, rtol=2e-3, atol=2e-3 * expected.abs().max().item())


# ----------------------------------------------------------------------------- the model, in transformers


@pytest.fixture(scope="module")
def fp_folder(tmp_path_factory, tiny_tokenizer):
    """A tiny modern decoder saved in fp32 with its tokenizer: (model, folder)."""
    model = build_tiny_model("zoo_modern", len(tiny_tokenizer))
    folder = tmp_path_factory.mktemp("fp32")
    model.save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return model, folder


def sample_ids(tokenizer) -> torch.LongTensor:
    return torch.tensor([tokenizer(TINY_TEXT[:24])["input_ids"]] * 2)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_quantize_on_load_save_reload_gives_identical_logits(scheme, fp_folder, tiny_tokenizer, tmp_path):
    model, folder = fp_folder
    loaded = AutoModelForCausalLM.from_pretrained(folder, quantization_config=ZooInt8Config(scheme=scheme)).eval()
    layers = loaded.model.layers
    assert all(isinstance(layer.self_attn.q_proj, Int8Linear) and isinstance(layer.mlp.down_proj, Int8Linear) for layer in layers)
    assert type(loaded.lm_head) is nn.Linear and loaded.lm_head.weight is loaded.model.embed_tokens.weight  # still tied, fp32
    ids = sample_ids(tiny_tokenizer)
    # The quantizer inside from_pretrained and the plain quantize() are the same algorithm.
    by_hand = quantize(build_tiny_model("zoo_modern", len(tiny_tokenizer)), scheme=scheme)
    with torch.no_grad():
        logits = loaded(ids).logits
        torch.testing.assert_close(logits, by_hand(ids).logits, rtol=0, atol=0)
        assert (logits - model(ids).logits).abs().max() < 0.05 * model(ids).logits.abs().max()

    saved = tmp_path / "int8"
    loaded.save_pretrained(saved)
    config = json.loads((saved / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "zoo_int8" and config["quantization_config"]["scheme"] == scheme
    with safe_open(saved / "model.safetensors", "pt") as weights:
        dtypes = {key: weights.get_slice(key).get_dtype() for key in weights.keys()}
    assert dtypes["model.layers.0.mlp.down_proj.weight"] == "I8" and dtypes["model.layers.0.mlp.down_proj.weight_scale"] == "F32"
    assert dtypes["model.embed_tokens.weight"] == "F32"
    assert (saved / "model.safetensors").stat().st_size < 0.6 * (folder / "model.safetensors").stat().st_size

    reloaded = AutoModelForCausalLM.from_pretrained(saved).eval()
    assert isinstance(reloaded.model.layers[1].mlp.up_proj, Int8Linear) and reloaded.model.layers[1].mlp.up_proj.scheme == scheme
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, logits, rtol=0, atol=0)


def test_quantized_folder_reloads_with_trust_remote_code_without_hf_models(fp_folder, tiny_tokenizer, tmp_path):
    _, folder = fp_folder
    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=ZooInt8Config(scheme="llm_int8")).eval()
    saved = tmp_path / "int8"
    model.save_pretrained(saved)
    assert {"int8.py", "quantization_int8.py"} <= {p.name for p in saved.glob("*.py")}
    ids = sample_ids(tiny_tokenizer)
    torch.save(ids, tmp_path / "ids.pt")
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["hf_models"] = None  # any `import hf_models` now raises ImportError
        import torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(saved)!r}, trust_remote_code=True).eval()
        layer = model.model.layers[0].mlp.down_proj
        assert type(layer).__name__ == "Int8Linear" and "hf_models" not in type(layer).__module__, type(layer)
        assert layer.weight.dtype == torch.int8 and layer.scheme == "llm_int8"
        with torch.no_grad():
            torch.save(model(torch.load({str(tmp_path / "ids.pt")!r})).logits, {str(tmp_path / "remote.pt")!r})
        """
    )
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"), "HOME": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    with torch.no_grad():
        torch.testing.assert_close(torch.load(tmp_path / "remote.pt"), model(ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize("scheme", ["w8a8", "llm_int8"])
def test_quantized_model_generates_with_the_hand_kv_cache_and_runs_in_pipeline(scheme, fp_folder, tiny_tokenizer):
    _, folder = fp_folder
    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=ZooInt8Config(scheme=scheme)).eval()
    ids = sample_ids(tiny_tokenizer)
    cache = GrowingKVCache(num_layers=model.config.num_hidden_layers)
    with_cache = model.generate(ids, max_new_tokens=12, do_sample=False, past_key_values=cache)
    assert cache.get_seq_length() >= ids.shape[1] + 10  # the hand cache did the decoding
    assert torch.equal(with_cache, model.generate(ids, max_new_tokens=12, do_sample=False, use_cache=False))
    text = pipeline("text-generation", model=model, tokenizer=tiny_tokenizer)("ROMEO:\n", max_new_tokens=8, do_sample=False)
    assert text[0]["generated_text"].startswith("ROMEO:\n") and len(text[0]["generated_text"]) > len("ROMEO:\n")


def test_dequantize_gives_back_plain_linears_with_the_dequantized_weights(fp_folder):
    _, folder = fp_folder
    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=ZooInt8Config())
    layer = model.model.layers[0].self_attn.o_proj
    expected = layer.dequantized_weight()
    model = model.dequantize()
    assert type(model.model.layers[0].self_attn.o_proj) is nn.Linear
    torch.testing.assert_close(model.model.layers[0].self_attn.o_proj.weight, expected, rtol=0, atol=0)
    assert "quantization_config" not in model.config.to_dict()


def test_modules_to_not_convert_keeps_layers_in_full_precision(tiny_tokenizer):
    model = quantize(build_tiny_model("zoo_gpt", len(tiny_tokenizer)), modules_to_not_convert=["lm_head", "model.layers.1"])
    assert any(isinstance(m, Int8Linear) for m in model.model.layers[0].modules())
    assert type(model.lm_head) is nn.Linear
    assert not any(isinstance(m, Int8Linear) for m in model.model.layers[1].modules())


def has_linear_layers(model_type: str) -> bool:
    model = build_tiny_model(model_type, 40)
    head = model.get_output_embeddings()
    return any(type(m) is nn.Linear and m is not head for m in model.modules())


# Every registered model with a linear layer besides its head: a new lesson's model joins by registering.
QUANTIZABLE_TYPES = [t for t in sorted(hf_models.MODEL_REGISTRY) if has_linear_layers(t)]


def test_only_the_bigram_table_has_no_linear_layer_to_quantize():
    assert set(hf_models.MODEL_REGISTRY) - set(QUANTIZABLE_TYPES) == {"zoo_bigram"}
    with pytest.raises(ValueError, match=r"found no nn.Linear to convert in BigramForCausalLM"):
        quantize(build_tiny_model("zoo_bigram", 40))


@pytest.mark.parametrize("model_type", QUANTIZABLE_TYPES)
def test_every_zoo_model_loads_quantized_and_generates_the_same_with_and_without_cache(model_type, tiny_tokenizer, tmp_path):
    model = build_tiny_model(model_type, len(tiny_tokenizer))
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=ZooInt8Config(scheme="llm_int8")).eval()
    assert any(isinstance(m, Int8Linear) for m in loaded.modules())
    ids = sample_ids(tiny_tokenizer)
    with torch.no_grad():
        reference = model(ids).logits
        assert (loaded(ids).logits - reference).abs().max() < 0.05 * reference.abs().max()
    with_cache = loaded.generate(ids, max_new_tokens=10, do_sample=False, use_cache=True)
    assert torch.equal(with_cache, loaded.generate(ids, max_new_tokens=10, do_sample=False, use_cache=False))


@pytest.mark.parametrize("variant", ["bitsandbytes int8", "bitsandbytes NF4", "hand int8"])
def test_quantization_leaves_moe_experts_in_full_precision(variant, tmp_path):
    """An MoE's experts are 3-D weights (E, out, in), not nn.Linear: bitsandbytes' int8 and NF4, like the hand int8,
    replace nn.Linear layers only. The attention is quantized and the experts (and the router) are the fp32 tensors
    saved, bit for bit; lesson 9's statement names them (``hf_models.recipe_support.expert_weights`` finds them).
    Widths of 64: bitsandbytes' CPU NF4 needs in_features >= 64."""
    import bitsandbytes as bnb
    from transformers import BitsAndBytesConfig

    from hf_models.recipe_support import expert_weights

    fp32 = build_tiny_model("zoo_moe", 97, hidden_size=64, intermediate_size=64)
    fp32.save_pretrained(tmp_path)
    config, quantized_type = {
        "bitsandbytes int8": (dict(quantization_config=BitsAndBytesConfig(load_in_8bit=True), device_map="cpu"), bnb.nn.Linear8bitLt),
        "bitsandbytes NF4": (dict(quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
                                  device_map="cpu"), bnb.nn.Linear4bit),
        "hand int8": (dict(quantization_config=ZooInt8Config()), Int8Linear),
    }[variant]
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, **config).eval()
    assert isinstance(loaded.model.layers[0].self_attn.q_proj, quantized_type)
    names = expert_weights(loaded)
    assert names == [f"model.layers.{i}.mlp.experts.{p}" for i in range(2) for p in ("gate_up_proj", "down_proj")]
    reference = dict(fp32.named_parameters())
    for name in names + ["model.layers.0.mlp.router.weight"]:
        parameter = loaded.get_parameter(name)
        assert type(parameter) is nn.Parameter and parameter.dtype == torch.float32
        assert torch.equal(parameter, reference[name])
    with torch.no_grad():
        assert torch.isfinite(loaded(input_ids=torch.tensor([[1, 2, 3]])).logits).all()


# ----------------------------------------------------------------------------- bad input


def test_bad_settings_name_the_field():
    with pytest.raises(ValueError, match=r"scheme must be one of \['weight_only', 'llm_int8', 'w8a8'\], got 'int4'"):
        ZooInt8Config(scheme="int4")
    with pytest.raises(ValueError, match=r"threshold must be a number > 0.*got 0"):
        ZooInt8Config(scheme="llm_int8", threshold=0)
    with pytest.raises(ValueError, match=r"threshold must be a number > 0.*got -1.0"):
        Int8Linear(4, 4, scheme="llm_int8", threshold=-1.0)
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['bits'\]"):
        ZooInt8Config(bits=4)
    with pytest.raises(ValueError, match=r"modules_to_not_convert must be a list of module names, got 'lm_head'"):
        ZooInt8Config(modules_to_not_convert="lm_head")
    with pytest.raises(ValueError, match=r"scheme must be one of"):
        quantize(nn.Sequential(nn.Linear(4, 4)), scheme="fp8")
    with pytest.raises(ValueError, match=r"found no nn.Linear to convert"):
        quantize(nn.Sequential(nn.Embedding(4, 4)))


# ----------------------------------------------------------------------------- on a GPU


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 24])  # decoding (padded to 17 rows for cuBLASLt) and prefill
def test_w8a8_on_cuda_runs_the_int8_gemm_and_matches_the_cpu(rows):
    generator = torch.Generator().manual_seed(7)
    linear = _linear(torch.randn(256, 512, generator=generator), torch.randn(256, generator=generator))
    x = torch.randn(rows, 512, generator=generator)
    cpu_layer = Int8Linear.from_linear(linear, "w8a8")
    gpu_layer = Int8Linear.from_linear(linear.cuda(), "w8a8")
    x_codes, _ = absmax_quantize(x)
    exact = (x_codes.long() @ cpu_layer.weight.long().T).to(torch.int32)
    assert torch.equal(int8_matmul(x_codes.cuda(), gpu_layer.weight).cpu(), exact)
    torch.testing.assert_close(gpu_layer(x.cuda()).cpu(), cpu_layer(x), rtol=1e-5, atol=1e-4)
