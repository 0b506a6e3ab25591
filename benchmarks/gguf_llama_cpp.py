"""A zoo model in llama.cpp: the GGUF export (f32, f16, Q8_0) against transformers on the same prompts.

For each file type: are the tokenizer ids identical, how many greedy tokens agree with transformers,
how far apart are the logits, and how fast does each decode. Needs llama-cpp-python (compiles
llama.cpp for a few minutes: ``pip install llama-cpp-python``); exits 77 (skipped) without it.

    python benchmarks/gguf_llama_cpp.py                                   # lesson 5's model
    python benchmarks/gguf_llama_cpp.py --model runs/10_moe/<folder>      # any modern or MoE decoder folder
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, HfArgumentParser

import hf_models  # noqa: F401  (registers the zoo's model types)
from hf_models.benchmarking import describe_machine, skip_benchmark
from hf_models.conversion.gguf import FILE_TYPES, export_gguf, measure_llama_cpp

PROMPTS = ["ROMEO:\nBut soft, what light", "MACBETH:\nIs this a dagger", "First Citizen:\nBefore we proceed", "JULIET:\nO Romeo"]
TEXT = "MACBETH:\nIs this a dagger which I see before me,\nThe handle toward my hand? Come, let me clutch thee.\n"


@dataclass
class GGUFBenchmarkArguments:
    model: str = field(
        default="runs/05_modern_gpt/modern-gpt-shakespeare",
        metadata={"help": "A saved zoo modern or MoE decoder folder, with its BPE tokenizer (lesson 5's by default)."},
    )
    new_tokens: int = field(default=40, metadata={"help": "Greedy tokens generated per prompt, by each side."})
    threads: int = field(default=1, metadata={"help": "CPU threads, for torch and for llama.cpp alike."})


def main() -> None:
    parser = HfArgumentParser(GGUFBenchmarkArguments, description=__doc__.split("\n\n")[0])
    (args,) = parser.parse_args_into_dataclasses()
    try:
        from llama_cpp import Llama
    except ImportError:
        skip_benchmark("llama-cpp-python is not installed (pip install llama-cpp-python)")
    if not Path(args.model, "config.json").exists():
        skip_benchmark(f"no model at {args.model} (run python recipes/05_modern_gpt.py first, or pass --model)")
    torch.set_num_threads(args.threads)  # measure_llama_cpp gives llama.cpp torch's thread count
    model = AutoModelForCausalLM.from_pretrained(args.model).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    print(describe_machine())

    # transformers' reference: greedy tokens, their time, and the logits of one text.
    reference, seconds = [], 0.0
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        start = time.perf_counter()
        out = model.generate(ids, max_new_tokens=args.new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
        seconds += time.perf_counter() - start
        reference.append(out[0, ids.shape[1] :].tolist())
    hf_speed = sum(map(len, reference)) / seconds
    text_ids = tokenizer(TEXT).input_ids
    with torch.no_grad():
        hf_logits = model(input_ids=torch.tensor([text_ids])).logits[0].numpy()

    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for file_type in FILE_TYPES:
            path = export_gguf(model, tokenizer, Path(folder) / f"model-{file_type}.gguf", file_type=file_type)
            # Greedy decoding and its speed through the zoo's one llama.cpp loop (lesson 9 uses it too);
            # no texts to score: the logits are compared directly below.
            measured = measure_llama_cpp(path, texts=[], prompts=PROMPTS, max_new_tokens=args.new_tokens)
            agree = sum(sum(a == b for a, b in zip(out, expected)) for out, expected in zip(measured["greedy_ids"], reference))
            total = sum(max(len(out), len(expected)) for out, expected in zip(measured["greedy_ids"], reference))
            llm = Llama(model_path=str(path), n_ctx=0, logits_all=True, verbose=False, n_threads=args.threads)
            same_ids = all(llm.tokenize(p.encode(), add_bos=False, special=False) == tokenizer(p).input_ids for p in PROMPTS + [TEXT])
            llm.eval(text_ids)
            gap = float(np.abs(np.asarray(llm.scores[: len(text_ids)]) - hf_logits).max())
            rows.append((file_type, measured["file_mb"], same_ids, f"{agree}/{total}", gap, measured["tokens_per_second"] / hf_speed))

    print(f"\n{args.model}: greedy tokens against transformers over {len(PROMPTS)} prompts x {args.new_tokens}; "
          f"transformers decodes at {hf_speed:,.0f} tokens/s ({args.threads} thread(s))\n")
    print("| GGUF | file MB | tokenizer ids identical | greedy tokens = transformers | max abs logit difference | llama.cpp tokens/s / transformers |")
    print("|---|---:|---|---:|---:|---:|")
    for file_type, size, same_ids, agreement, gap, speed in rows:
        print(f"| {file_type} | {size:.2f} | {'yes' if same_ids else 'NO'} | {agreement} | {gap:.1e} | {speed:.2f}x |")


if __name__ == "__main__":
    main()
