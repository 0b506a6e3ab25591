"""GGUF export for llama.cpp: metadata and every tensor read back with gguf's own reader."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from hf_models.conversion.gguf import PRE_TOKENIZER, export_gguf, main, rotary_rows_to_pairs
from hf_models.tokenization import ByteLevelBPE
from tests.helpers import TINY_TEXT, build_tiny_model, save_tiny_model

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bpe_tokenizer():
    return ByteLevelBPE.train([TINY_TEXT * 4], vocab_size=256 + 40 + 1, min_frequency=1).to_fast_tokenizer()


def read(path) -> tuple[dict, dict[str, gguf.ReaderTensor]]:
    reader = gguf.GGUFReader(str(path))
    fields = {name: field.contents() for name, field in reader.fields.items()}
    return fields, {t.name: t for t in reader.tensors}


def dense(tensor: gguf.ReaderTensor) -> np.ndarray:
    """A tensor as float32 in its numpy (torch) shape, dequantized where it is quantized."""
    shape = tuple(int(d) for d in reversed(tensor.shape))  # GGUF lists dimensions innermost first
    return gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(shape).astype(np.float32)


def hand_q8_0(weights: np.ndarray) -> np.ndarray:
    """Lesson 9's absmax int8 (codes = round(w * 127 / max|w|), halves away from zero) per block of 32; the scale is stored in fp16."""
    blocks = weights.reshape(-1, 32)
    absmax = np.abs(blocks).max(axis=1, keepdims=True)
    scaled = np.divide(blocks * 127, absmax, out=np.zeros_like(blocks), where=absmax > 0)
    codes = np.sign(scaled) * np.floor(np.abs(scaled) + 0.5)
    return (codes * (absmax / 127).astype(np.float16).astype(np.float32)).reshape(weights.shape)


def expected_tensors(model) -> dict[str, np.ndarray]:
    """The zoo weights under llama.cpp's names, computed from the zoo model directly (not the export's path)."""
    config, state = model.config, {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    out = {"token_embd.weight": state["model.embed_tokens.weight"], "output_norm.weight": state["model.norm.weight"]}
    for i in range(config.num_hidden_layers):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        out[b + "attn_norm.weight"] = state[p + "input_layernorm.weight"]
        out[b + "ffn_norm.weight"] = state[p + "post_attention_layernorm.weight"]
        for ours, theirs, heads in (("q_proj", "attn_q", config.num_attention_heads), ("k_proj", "attn_k", config.num_key_value_heads)):
            out[b + f"{theirs}.weight"] = rotary_rows_to_pairs(torch.from_numpy(state[p + f"self_attn.{ours}.weight"]), heads).numpy()
        out[b + "attn_v.weight"] = state[p + "self_attn.v_proj.weight"]
        out[b + "attn_output.weight"] = state[p + "self_attn.o_proj.weight"]
        if config.model_type == "zoo_moe":
            out[b + "ffn_gate_inp.weight"] = state[p + "mlp.router.weight"] if p + "mlp.router.weight" in state else state[p + "mlp.gate.weight"]
            gate_up = state[p + "mlp.experts.gate_up_proj"]  # (E, 2I, C), gate rows first
            out[b + "ffn_gate_exps.weight"], out[b + "ffn_up_exps.weight"] = np.split(gate_up, 2, axis=1)
            out[b + "ffn_down_exps.weight"] = state[p + "mlp.experts.down_proj"]
        else:
            for name in ("gate", "up", "down"):
                out[b + f"ffn_{name}.weight"] = state[p + f"mlp.{name}_proj.weight"]
    return out


def test_rotary_permutation_turns_halves_into_pairs():
    head_dim, heads = 8, 2
    rows = torch.arange(head_dim * heads, dtype=torch.float32)[:, None]
    permuted = rotary_rows_to_pairs(rows, heads)[:, 0].tolist()
    assert permuted[:head_dim] == [0, 4, 1, 5, 2, 6, 3, 7]  # (x_i, x_{i+d/2}) become neighbours
    assert permuted[head_dim:] == [8, 12, 9, 13, 10, 14, 11, 15]


@pytest.mark.parametrize("model_type", ["zoo_modern", "zoo_moe"])
def test_gguf_metadata_and_f32_tensors_equal_the_model(model_type, bpe_tokenizer, tmp_path):
    model = build_tiny_model(model_type, len(bpe_tokenizer), eos_token_id=bpe_tokenizer.eos_token_id)
    fields, tensors = read(export_gguf(model, bpe_tokenizer, tmp_path / "m.gguf", file_type="f32"))
    config = model.config
    assert fields["general.architecture"] == "llama" and fields["tokenizer.ggml.pre"] == PRE_TOKENIZER
    assert fields["tokenizer.ggml.model"] == "gpt2"
    assert fields["llama.block_count"] == config.num_hidden_layers and fields["llama.embedding_length"] == config.hidden_size
    assert fields["llama.attention.head_count"] == config.num_attention_heads
    assert fields["llama.attention.head_count_kv"] == config.num_key_value_heads
    assert fields["llama.context_length"] == config.max_position_embeddings
    assert fields["tokenizer.ggml.eos_token_id"] == bpe_tokenizer.eos_token_id
    vocab = bpe_tokenizer.get_vocab()
    assert fields["tokenizer.ggml.tokens"] == sorted(vocab, key=vocab.get)
    assert len(fields["tokenizer.ggml.merges"]) == len(vocab) - 256 - 1  # byte alphabet + merges + <|endoftext|>
    if model_type == "zoo_moe":
        assert fields["llama.expert_count"] == config.num_local_experts
        assert fields["llama.expert_used_count"] == config.num_experts_per_tok
    expected = expected_tensors(model)
    assert set(tensors) == set(expected)  # tied embeddings: no separate output.weight
    for name, weights in expected.items():
        np.testing.assert_array_equal(dense(tensors[name]), weights, err_msg=name)


def test_f16_and_q8_0_tensors(bpe_tokenizer, tmp_path):
    model = build_tiny_model("zoo_modern", len(bpe_tokenizer))
    expected = expected_tensors(model)
    _, f16 = read(export_gguf(model, bpe_tokenizer, tmp_path / "f16.gguf", file_type="f16"))
    fields, q8 = read(export_gguf(model, bpe_tokenizer, tmp_path / "q8.gguf", file_type="q8_0"))
    assert fields["general.file_type"] == int(gguf.LlamaFileType.MOSTLY_Q8_0)
    for name, weights in expected.items():
        if weights.ndim == 1:
            assert q8[name].tensor_type == gguf.GGMLQuantizationType.F32
            continue
        np.testing.assert_array_equal(dense(f16[name]), weights.astype(np.float16).astype(np.float32), err_msg=name)
        assert q8[name].tensor_type == gguf.GGMLQuantizationType.Q8_0
        got = dense(q8[name])
        # Within half a step of each block's scale (plus the scale's own fp16 rounding, up to 127 codes x 2^-11 of a
        # step), and equal to the hand block-wise absmax int8.
        step = np.abs(weights.reshape(-1, 32)).max(axis=1, keepdims=True) / 127
        assert (np.abs(got - weights).reshape(-1, 32) <= step * (0.5 + 127 * 2**-11) + 1e-7).all(), name
        np.testing.assert_allclose(got, hand_q8_0(weights), atol=1e-6, rtol=0, err_msg=name)


def test_bad_export_input_is_named(bpe_tokenizer, tmp_path):
    with pytest.raises(ValueError, match=r"file_type must be one of \('f32', 'f16', 'q8_0'\), got 'q4_k'"):
        export_gguf(build_tiny_model("zoo_modern", len(bpe_tokenizer)), bpe_tokenizer, tmp_path / "x.gguf", file_type="q4_k")
    with pytest.raises(ValueError, match=r"takes the modern decoder .* got GPTForCausalLM \(zoo_gpt\)"):
        export_gguf(build_tiny_model("zoo_gpt", len(bpe_tokenizer)), bpe_tokenizer, tmp_path / "x.gguf")
    with pytest.raises(ValueError, match="the tokenizer has .* tokens and the model's vocab_size is 500"):
        export_gguf(build_tiny_model("zoo_modern", 500), bpe_tokenizer, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


# ----------------------------------------------------------------------------- the command line


def test_command_line_exports_a_saved_folder(bpe_tokenizer, tmp_path):
    """``python -m hf_models.conversion.gguf FOLDER --outtype q8_0 -o FILE`` in a fresh process; the file reads back."""
    folder, out = tmp_path / "modern", tmp_path / "out" / "model.gguf"
    model = save_tiny_model("zoo_modern", bpe_tokenizer, folder)
    command = [sys.executable, "-m", "hf_models.conversion.gguf", str(folder), "--outtype", "q8_0", "-o", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr
    assert f"wrote {out}" in done.stdout
    fields, tensors = read(out)
    assert fields["general.architecture"] == "llama" and fields["general.file_type"] == int(gguf.LlamaFileType.MOSTLY_Q8_0)
    assert fields["tokenizer.ggml.tokens"] == [bpe_tokenizer.convert_ids_to_tokens(i) for i in range(len(bpe_tokenizer))]
    assert tensors["blk.0.attn_q.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0
    np.testing.assert_array_equal(dense(tensors["output_norm.weight"]), expected_tensors(model)["output_norm.weight"])
    assert not [p for p in out.parent.iterdir() if p.name.endswith(".tmp")]  # no temporary file left behind


def test_command_line_errors_are_named(bpe_tokenizer, tmp_path, capsys):
    folder = tmp_path / "modern"
    save_tiny_model("zoo_modern", bpe_tokenizer, folder)
    save_tiny_model("zoo_gpt", bpe_tokenizer, tmp_path / "gpt")
    (tmp_path / "empty").mkdir()
    existing = tmp_path / "existing.gguf"
    existing.write_bytes(b"keep me")
    cases = {
        (str(tmp_path / "missing"),): "is not a folder",
        (str(tmp_path / "empty"),): "holds no config.json",
        (str(folder), "--outtype", "q4_k"): "invalid choice: 'q4_k' \\(choose from '?f32'?, '?f16'?, '?q8_0'?\\)",
        (str(tmp_path / "gpt"), "-o", str(tmp_path / "gpt.gguf")): "holds a 'zoo_gpt' model; .* takes zoo_modern, zoo_moe, zoo_configurable",
        (str(folder), "-o", str(existing)): "exists; pass --overwrite",
    }
    for argv, message in cases.items():
        with pytest.raises(SystemExit) as exit_info:
            main(list(argv))
        assert exit_info.value.code == 2, argv
        assert re.search(message, capsys.readouterr().err), argv
    assert existing.read_bytes() == b"keep me" and not (tmp_path / "gpt.gguf").exists()
    main([str(folder), "-o", str(existing), "--overwrite"])  # the flag replaces it
    assert read(existing)[0]["general.file_type"] == int(gguf.LlamaFileType.ALL_F32)


# ----------------------------------------------------------------------------- benchmarks/gguf_llama_cpp.py


def load_llama_cpp_benchmark():
    spec = importlib.util.spec_from_file_location("gguf_llama_cpp_benchmark", REPO / "benchmarks" / "gguf_llama_cpp.py")
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # (dataclasses look their module up there)
    spec.loader.exec_module(module)
    return module


def crashing_worker(connection, *args) -> None:
    """Stands in for llama.cpp dying inside its C code, as llama-cpp-python 0.3.36 did on Q8_0 files."""
    os.kill(os.getpid(), signal.SIGSEGV)


def test_a_crash_inside_llama_cpp_ends_its_child_not_the_benchmark():
    child = load_llama_cpp_benchmark().LlamaCppChild(Path("unused.gguf"), 1, [[1, 2]], 4, worker=crashing_worker)
    assert child.crash == f"llama.cpp crashed (signal {int(signal.SIGSEGV)})"
    assert child.check is None and child.decode() is None  # the row is reported, the timing loop goes on
    child.close()


def test_the_llama_cpp_benchmark_decodes_the_same_tokens_eager_and_compiled(bpe_tokenizer, tmp_path):
    """Zoo and LlamaForCausalLM, eager and compiled, in one interleaved run: the same greedy tokens, a
    ratio per row, the targets judged; without llama-cpp-python its rows say how to install it."""
    save_tiny_model("zoo_modern", bpe_tokenizer, tmp_path / "model", initializer_range=0.3)
    command = [sys.executable, str(REPO / "benchmarks" / "gguf_llama_cpp.py"), "--model", str(tmp_path / "model"),
               "--rounds", "1", "--new_tokens", "5", "--output_dir", str(tmp_path / "out")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    results = json.loads((tmp_path / "out" / "gguf_llama_cpp.json").read_text())
    rows = results["rows"]
    torch_rows = ["zoo eager", "zoo compiled", "LlamaForCausalLM eager", "LlamaForCausalLM compiled"]
    assert set(torch_rows) <= set(rows)
    tokens = 4 * 5
    for name in torch_rows:
        assert rows[name]["greedy_tokens_equal"] == f"{tokens}/{tokens}", name
        assert rows[name]["tokens_per_second"] > 0
    assert rows["zoo compiled"]["vs_twin_same_mode"]["median"] > 0
    assert [target["what"] for target in results["targets"]][-2:] == [
        "zoo eager vs LlamaForCausalLM eager", "zoo compiled vs LlamaForCausalLM compiled"]
    if importlib.util.find_spec("llama_cpp") is None:
        for name in ("llama.cpp f32", "llama.cpp q8_0"):
            assert "pip install llama-cpp-python" in results["not_measured"][name]
            assert "pip install llama-cpp-python" in result.stdout
    else:  # measured, or its crash named in its row
        for name in ("llama.cpp f32", "llama.cpp q8_0"):
            assert name in rows or "llama.cpp" in results["not_measured"][name]
        if "llama.cpp f32" in rows:
            assert rows["llama.cpp f32"]["same_ids"] and rows["llama.cpp f32"]["max_abs_logit_difference"] < 1e-3
