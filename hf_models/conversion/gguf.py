"""Export to GGUF, the file format of llama.cpp and the tools built on it (ollama, LM Studio, llamafile).

A GGUF file is one self-describing blob: key/value metadata (architecture, sizes, the tokenizer's
vocabulary and merges) followed by the tensors, each in its own type (f32, f16 or a block
quantization such as ``Q8_0``). llama.cpp's own ``convert_hf_to_gguf.py`` refuses a newly trained
tokenizer: it recognises a pre-tokenizer by the ids a tokenizer gives on a test string, which a new
vocabulary never matches. The zoo's byte-level BPE splits text with GPT-2's regex, which llama.cpp
calls ``gpt-2``; this writer declares it so, and writes the rest with the ``gguf`` package
(``GGUFWriter``), going through the zoo's own exports (:func:`~.llama.modern_to_llama`,
:func:`~.mixtral.moe_to_mixtral`), which are proven equal to transformers' models.

Two layout rules of llama.cpp's ``llama`` architecture:

* **Rotary halves.** HF's Llama (and the zoo) rotates the two *halves* of each head,
  ``(x[:d/2], x[d/2:])``; llama.cpp rotates *adjacent pairs* ``(x0, x1), (x2, x3)``. Permuting
  the rows of ``q_proj`` and ``k_proj`` within each head (:func:`rotary_rows_to_pairs`) makes
  the same attention scores come out of the other convention.
* **Experts stacked.** A mixture-of-experts layer stores its experts as one 3-D tensor per
  projection (``ffn_gate_exps``: experts x intermediate x width) and the router as
  ``ffn_gate_inp``: Mixtral is ``llama`` with ``expert_count`` set.

``Q8_0`` is lesson 9's absmax int8 done block-wise: every 32 consecutive weights of a row share
one fp16 scale ``max|w| / 127`` (the zoo's ``int8.py`` uses one scale per output row). Smaller
blocks follow local outliers better; the scale costs 0.5 bits per weight (8.5 in all).

From the command line, a saved folder (lesson 5's, 10's or 12's) becomes one file::

    python -m hf_models.conversion.gguf runs/05_modern_gpt/modern-gpt-shakespeare --outtype q8_0 -o model.gguf
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ..modeling_configurable import ConfigurableDecoderForCausalLM
from ..modeling_modern import ModernDecoderForCausalLM
from ..modeling_moe import MoEDecoderForCausalLM
from .configurable import to_dedicated
from .llama import modern_to_llama
from .mixtral import moe_to_mixtral

__all__ = ["FILE_TYPES", "PRE_TOKENIZER", "export_folder", "export_gguf", "main", "measure_llama_cpp", "rotary_rows_to_pairs"]

PRE_TOKENIZER = "gpt-2"
"""llama.cpp's name for GPT-2's byte-level split regex, the zoo BPE's pre-tokenizer."""

FILE_TYPES = ("f32", "f16", "q8_0")
EXPORTABLE_TYPES = ("zoo_modern", "zoo_moe", "zoo_configurable")
"""The saved model types the export takes (a configurable decoder must be a modern or MoE preset)."""
Q8_0_BLOCK = 32


def rotary_rows_to_pairs(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Reorder a q/k projection's rows from rotate-halves (HF) to rotate-adjacent-pairs (llama.cpp).

    Within each head, row ``i < d/2`` goes to ``2i`` and row ``d/2 + i`` to ``2i + 1``.
    """
    out, width = weight.shape
    head_dim = out // num_heads
    # (heads, 2 halves, d/2, width) -> (heads, d/2, 2, width): the halves interleave.
    return weight.reshape(num_heads, 2, head_dim // 2, width).transpose(1, 2).reshape(out, width)


def _hf_model(model: torch.nn.Module):
    if isinstance(model, ConfigurableDecoderForCausalLM):
        model = to_dedicated(model)  # a modern or MoE preset (else the error names what differs)
    if isinstance(model, MoEDecoderForCausalLM):
        return moe_to_mixtral(model)
    if isinstance(model, ModernDecoderForCausalLM):
        return modern_to_llama(model)
    raise ValueError(
        f"export_gguf writes llama.cpp's 'llama' architecture, which takes the modern decoder (zoo_modern) and the "
        f"mixture-of-experts decoder (zoo_moe); got {type(model).__name__} ({getattr(model.config, 'model_type', '?')})."
    )


def _llama_cpp_tensors(hf, config) -> dict[str, torch.Tensor]:
    """The HF Llama/Mixtral state dict under llama.cpp's tensor names and layout (fp32)."""
    state = {k: v.detach().float().cpu() for k, v in hf.state_dict().items()}
    tensors = {"token_embd.weight": state["model.embed_tokens.weight"], "output_norm.weight": state["model.norm.weight"]}
    if not config.tie_word_embeddings:
        tensors["output.weight"] = state["lm_head.weight"]
    for i in range(config.num_hidden_layers):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        tensors[b + "attn_norm.weight"] = state[p + "input_layernorm.weight"]
        tensors[b + "ffn_norm.weight"] = state[p + "post_attention_layernorm.weight"]
        tensors[b + "attn_q.weight"] = rotary_rows_to_pairs(state[p + "self_attn.q_proj.weight"], config.num_attention_heads)
        tensors[b + "attn_k.weight"] = rotary_rows_to_pairs(state[p + "self_attn.k_proj.weight"], config.num_key_value_heads)
        tensors[b + "attn_v.weight"] = state[p + "self_attn.v_proj.weight"]
        tensors[b + "attn_output.weight"] = state[p + "self_attn.o_proj.weight"]
        if p + "mlp.gate.weight" in state:  # Mixtral: router + experts fused as (experts, 2 * intermediate, width)
            gate, up = state[p + "mlp.experts.gate_up_proj"].chunk(2, dim=1)
            tensors[b + "ffn_gate_inp.weight"] = state[p + "mlp.gate.weight"]
            tensors[b + "ffn_gate_exps.weight"] = gate.contiguous()
            tensors[b + "ffn_up_exps.weight"] = up.contiguous()
            tensors[b + "ffn_down_exps.weight"] = state[p + "mlp.experts.down_proj"]
        else:
            for name in ("gate", "up", "down"):
                tensors[b + f"ffn_{name}.weight"] = state[p + f"mlp.{name}_proj.weight"]
    return tensors


def _vocabulary(tokenizer) -> tuple[list[str], list[int], list[str]]:
    """Tokens in id order, their llama.cpp types, and the merges as ``"left right"`` strings."""
    import gguf

    vocab = tokenizer.get_vocab()
    if sorted(vocab.values()) != list(range(len(vocab))):
        raise ValueError("the tokenizer's ids are not 0..n-1 without gaps; llama.cpp needs a dense vocabulary.")
    tokens = [None] * len(vocab)
    for token, index in vocab.items():
        tokens[index] = token
    special = set(tokenizer.all_special_tokens)
    types = [int(gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL) for t in tokens]
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    if model.get("type") != "BPE":
        raise ValueError(f"GGUF's gpt2 tokenizer model needs a byte-level BPE; this tokenizer is {model.get('type')!r}.")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return tokens, types, merges


def export_gguf(model: torch.nn.Module, tokenizer, path: str | os.PathLike, file_type: str = "f32") -> Path:
    """Write ``model`` and ``tokenizer`` as one GGUF file for llama.cpp.

    Args:
        model: a zoo modern decoder or MoE decoder.
        tokenizer: its byte-level BPE tokenizer (saved alongside it by every decoder lesson).
        path: the ``.gguf`` file to write.
        file_type: ``"f32"``, ``"f16"`` (matrices in fp16) or ``"q8_0"`` (matrices block-wise int8);
            norms are always f32, as llama.cpp's converter keeps them.
    """
    import gguf

    if file_type not in FILE_TYPES:
        raise ValueError(f"file_type must be one of {FILE_TYPES}, got {file_type!r}.")
    hf = _hf_model(model)
    config = hf.config
    if len(tokenizer) != config.vocab_size:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens and the model's vocab_size is {config.vocab_size}; they must match.")
    tokens, types, merges = _vocabulary(tokenizer)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.add_name(getattr(model, "name_or_path", "") or type(model).__name__)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(float(config.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    if getattr(config, "num_local_experts", None):
        writer.add_expert_count(config.num_local_experts)
        writer.add_expert_used_count(config.num_experts_per_tok)
    writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[file_type])
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(PRE_TOKENIZER)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for name in ("bos", "eos", "unk", "pad"):
        token_id = getattr(tokenizer, f"{name}_token_id")
        if token_id is not None:
            getattr(writer, f"add_{name}_token_id")(token_id)
    writer.add_add_bos_token(False)  # the zoo's models never saw a BOS token in training

    for name, tensor in _llama_cpp_tensors(hf, config).items():
        data = tensor.numpy()
        if data.ndim == 1 or file_type == "f32":
            writer.add_tensor(name, data.astype(np.float32))
        elif file_type == "f16":
            writer.add_tensor(name, data.astype(np.float16))
        elif data.shape[-1] % Q8_0_BLOCK:  # rows that do not split into blocks stay fp16, as llama.cpp does
            writer.add_tensor(name, data.astype(np.float16))
        else:
            writer.add_tensor(name, gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0), raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def export_folder(folder: str | os.PathLike, output: str | os.PathLike | None = None, file_type: str = "f32",
                  overwrite: bool = False) -> Path:
    """Export a saved zoo folder (model + tokenizer) to one GGUF file; what ``python -m`` runs.

    ``output`` defaults to ``<folder>/model-<file_type>.gguf``. Every input is checked before
    the model is loaded, and the file is written under a temporary name and renamed, so an
    error never leaves a half-written ``.gguf`` (nor replaces an existing one unless ``overwrite``).

    Raises:
        FileNotFoundError: ``folder`` is not a folder, or holds no ``config.json``.
        FileExistsError: ``output`` exists and ``overwrite`` is False.
        ValueError: ``file_type`` or the folder's model type is not one the export takes.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder = Path(folder)
    if file_type not in FILE_TYPES:
        raise ValueError(f"outtype {file_type!r} is not supported; choose one of {', '.join(FILE_TYPES)}.")
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder; pass a model folder saved by a recipe (save_pretrained).")
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} holds no config.json, so no saved model; pass a folder saved by a recipe.")
    output = Path(output) if output is not None else folder / f"model-{file_type}.gguf"
    if output.exists() and not overwrite:
        raise FileExistsError(f"{output} exists; pass --overwrite to replace it, or another -o.")
    model_type = AutoConfig.from_pretrained(folder).model_type
    if model_type not in EXPORTABLE_TYPES:
        raise ValueError(f"{folder} holds a {model_type!r} model; the GGUF export writes llama.cpp's 'llama' "
                         f"architecture and takes {', '.join(EXPORTABLE_TYPES)}.")
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    output.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=output.parent, prefix=f".{output.name}.", suffix=".tmp")
    os.close(handle)
    try:
        export_gguf(model, tokenizer, tmp, file_type=file_type)
        os.replace(tmp, output)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return output


def main(argv: list[str] | None = None) -> None:
    """``python -m hf_models.conversion.gguf FOLDER --outtype q8_0 -o model.gguf``."""
    parser = argparse.ArgumentParser(prog="python -m hf_models.conversion.gguf", description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", help="a saved zoo_modern, zoo_moe or zoo_configurable folder (model + tokenizer)")
    parser.add_argument("--outtype", choices=FILE_TYPES, default="f32",
                        help="tensor type of the matrices (norms stay f32): f32, f16 or q8_0 (block-wise int8)")
    parser.add_argument("-o", "--outfile", default=None, help="the .gguf file to write (default: FOLDER/model-OUTTYPE.gguf)")
    parser.add_argument("--overwrite", action="store_true", help="replace the output file if it exists")
    args = parser.parse_args(argv)
    try:
        path = export_folder(args.folder, args.outfile, args.outtype, overwrite=args.overwrite)
    except (FileNotFoundError, FileExistsError, ValueError) as error:
        parser.error(str(error))
    print(f"wrote {path} ({path.stat().st_size / 2**20:.2f} MiB, {args.outtype})")


def llama_cpp_greedy(llm, ids: list[int], max_new_tokens: int, stop_at_eos: bool = True) -> list[int]:
    """Greedy decoding of ``ids`` in llama.cpp (a ``llama_cpp.Llama``): the new token ids, at most ``max_new_tokens``,
    ending before an EOS unless ``stop_at_eos`` is false (a benchmark that wants every prompt to decode as long)."""
    out = []
    if max_new_tokens < 1:
        return out
    for token in llm.generate(ids, temp=0.0, top_k=1, reset=True):
        if stop_at_eos and token == llm.token_eos():
            break
        out.append(token)
        if len(out) == max_new_tokens:
            break  # before asking for one more: llama.cpp would run a forward to produce it
    return out


def measure_llama_cpp(gguf_path: str | os.PathLike, texts: list[str], prompts: list[str], max_new_tokens: int) -> dict:
    """Bits per byte, greedy tokens and tokens/s of a GGUF file in llama.cpp (through llama-cpp-python).

    Returns ``file_mb``, ``bits_per_byte`` (over ``texts``: summed next-token loss in bits over
    their UTF-8 bytes, each text scored on its own from its first token), ``tokens_per_second``
    (batch 1 greedy decoding) and ``greedy_ids`` (the generated ids per prompt, prompt excluded).

    Raises:
        ImportError: llama-cpp-python is not installed (an optional, compiled dependency).
    """
    try:
        from llama_cpp import Llama
    except ImportError as error:
        raise ImportError("measuring in llama.cpp needs llama-cpp-python: pip install llama-cpp-python") from error

    path = Path(gguf_path)
    llm = Llama(model_path=str(path), n_ctx=0, logits_all=True, verbose=False, n_threads=torch.get_num_threads())
    context = int(llm.metadata["llama.context_length"])  # the trained context (llama.cpp may allocate more)
    bits, num_bytes = 0.0, 0
    for text in texts:
        stream = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
        for start in range(0, len(stream) - 1, context):  # non-overlapping windows of the trained context
            ids = stream[start : start + context]
            if len(ids) < 2:
                continue
            llm.reset()
            llm.eval(ids)
            logits = np.asarray(llm.scores[: len(ids) - 1], dtype=np.float64)
            log_probs = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
            bits += -log_probs[np.arange(len(ids) - 1), ids[1:]].sum() / math.log(2)
            num_bytes += len(llm.detokenize(ids[1:]))  # the bytes the scored tokens spell
    greedy, generated, seconds = [], 0, 0.0
    for prompt in prompts:
        ids = llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=False)
        llm.reset()
        start = time.perf_counter()
        out = llama_cpp_greedy(llm, ids, max_new_tokens)
        seconds += time.perf_counter() - start
        generated += len(out)
        greedy.append(out)
    return dict(file_mb=path.stat().st_size / 2**20, bits_per_byte=bits / max(num_bytes, 1),
                tokens_per_second=generated / seconds if seconds else float("nan"), greedy_ids=greedy)


if __name__ == "__main__":
    main()
