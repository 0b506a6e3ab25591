# %% [markdown]
# # Lesson 6: the KV cache. Why generation needs one, what it costs, and how to store it.
#
# Explained, with its measured numbers and how it scales to frontier models:
# [docs/lessons/06_kv_cache.md](../docs/lessons/06_kv_cache.md).
#
# Why a KV cache
# --------------
# A decoder generates one token per forward pass. Without a cache, step ``n`` re-runs the whole
# prefix: ``n`` tokens through every layer to produce one new token, so generating ``N`` tokens
# costs ``N^2 / 2`` token-forwards. But attention is causal: the key and value of token ``i``
# depend only on tokens ``<= i``, so once computed they never change. Keep them, and each step runs
# the model on the *one* new token: it computes that token's q/k/v, appends k/v to the cache and
# attends over everything cached. Per-step work drops from ``O(n * model)`` to ``O(model + n *
# layers * width)``, and the speed-up grows with the length generated.
#
# What grows, and how to store it
# -------------------------------
# Per layer, a key and a value tensor of shape (B, H_kv, T, D) whose ``T`` grows by one token per
# step. transformers' ``DynamicCache`` does ``torch.cat([old, new])``: every step allocates a new
# tensor and copies the whole history, ``n^2 / 2`` slot copies in all. The zoo's ``GrowingKVCache``
# (``hf_models/kv_cache.py``) writes in place into a buffer and doubles it when full, like a Python
# list: fewer than ``2n`` copies in all. ``StaticKVCache`` and transformers' ``StaticCache``
# allocate the whole buffer once, before the first token: nothing is reallocated while decoding,
# memory use is known up front (a server admits a request only if its cache fits), and the tensors
# keep their shapes and addresses, which is what ``torch.compile`` and CUDA graphs need.
# Both keep their fill level in a tensor and, under ``torch.compile``, return the *whole* buffer at
# every step (one shape, the empty tail masked). Run eagerly, ``StaticKVCache`` returns the filled
# prefix, as ``GrowingKVCache`` does (no work on empty slots), where ``StaticCache`` still attends
# over the whole buffer.
#
# Compiling the decoding step
# ---------------------------
# At lesson 5's size a decoding step is about a hundred small ops, each a few microseconds of
# arithmetic and more of Python and dispatch: the per-token cost is overhead, not FLOPs. A static
# cache gives every step the same shapes, so ``torch.compile`` can trace the step *once* into one
# fused program and replay it for every token: ``generate(..., cache_implementation="static",
# compile_config=CompileConfig(...))`` does this with ``StaticKVCache`` exactly as transformers does
# it with its ``StaticCache`` (the prompt runs eagerly; one graph serves every new token; a test
# counts the graphs). The first call pays the compilation, seconds, once per model and shape.
#
# Memory
# ------
# A cache stores, for every token, one key and one value vector per layer and per key/value head::
#
#     bytes = 2 (k and v) x layers x kv_heads x head_dim x tokens x bytes per number   (x batch)
#
# LLaMA-2-7B (32 layers, 32 kv heads of 128, fp16): 0.5 MB per token, 2 GB for one 4k-token
# sequence, a seventh of the model's weights for every sequence in the batch. Hence grouped-query
# attention: ``H`` query heads share ``H_kv < H`` key/value heads, so the cache shrinks by ``H /
# H_kv`` (LLaMA-2-70B: 64 query heads, 8 kv heads, an 8x smaller cache). Lesson 5's model has 2
# query heads per kv head: half the cache of multi-head attention.
#
# What this lesson shows
# ----------------------
# 1. Lesson 5's trained model (or, if ``runs/05_modern_gpt`` is missing, a random model of its size)
#    generates the same greedy tokens six ways: with no cache, the hand-written ``GrowingKVCache``
#    and ``StaticKVCache``, transformers' ``DynamicCache`` and ``StaticCache``, and ``StaticKVCache``
#    with the decoding step compiled.
# 2. One timing table: each way timed by the zoo's benchmark timer (``hf_models.benchmarking``), in
#    interleaved rounds so that a noisy machine hits them alike, with each speed-up's noise band.
# 3. The memory formula above, for this model; and one plot of tokens/s.
#
# The full harness (per-step clocks over 512 tokens, a larger model, batch sizes, the targets) is
# ``benchmarks/kv_cache.py``; its measured numbers are in ``benchmarks/README.md``.
#
# Threads: one by default. On a shared 2-core machine, two OpenMP threads wait for each other at
# every op of a decoding step, which makes batch-1 decoding slower and much noisier than one thread.
# On an idle machine try ``--threads 2``.
#
# Run:
#     python recipes/06_kv_cache.py                       # about a minute on 2 CPU cores
#     python recipes/06_kv_cache.py --total_tokens 512    # longer sequences: larger speed-ups

# %%
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt
import torch
from matplotlib.ticker import FuncFormatter
from transformers import HfArgumentParser

from hf_models.benchmarking import describe_machine, quartiles, time_interleaved, use_passive_omp_wait
# The six ways to generate (no cache, GrowingKVCache and StaticKVCache from hf_models/kv_cache.py,
# transformers' DynamicCache and StaticCache, StaticKVCache compiled), lesson 5's model, its prompts and the memory formula
# above: the harness this lesson shares with benchmarks/kv_cache.py.
from hf_models.benchmarking.generation import CACHES, HAND_WRITTEN, LESSON5_FOLDER, greedy, kv_cache_memory, lesson_model, prompts
from hf_models.files import write_json_atomically
from hf_models.conversion import is_stock_checkpoint
from hf_models.recipe_support import recipe_argv, resolve_model_source, show
from hf_models.recipe_support.validation import check_output_dir_writable, lesson5_model_folder


@dataclass
class KVCacheArguments:
    model_folder: str = field(
        default=LESSON5_FOLDER,
        metadata={"help": ("Lesson 5's trained model; a random model of its size is timed if the default folder is missing. "
                           "Or a stock gpt2/llama/qwen2/mixtral checkpoint, a folder or a Hub id, in the zoo's own class.")},
    )
    output_dir: str = field(default="runs/06_kv_cache", metadata={"help": "Where the plot and results.json go."})
    prompt_tokens: int = field(default=32, metadata={"help": "Prompt length."})
    total_tokens: int = field(default=256, metadata={"help": "Sequence length at the end of generation (prompt + new)."})
    batch_size: int = field(default=1, metadata={"help": "Sequences generated together."})
    rounds: int = field(default=10, metadata={"help": "Timed rounds; each runs every variant once, in rotating order."})
    warmup: int = field(default=1, metadata={"help": "Untimed calls of each variant before the rounds."})
    threads: int = field(default=1, metadata={"help": "torch threads (0: torch's default). See the module docstring."})
    seed: int = field(default=0, metadata={"help": "Seed for random weights and prompts."})


# ----------------------------------------------------------------------------- the plot


def plot(tokens_per_second: dict[str, list[float]], title: str, path: Path) -> None:
    """One bar per variant: median tokens/s over the rounds, whiskers at its quartiles; log y."""
    figure, ax = plt.subplots(figsize=(7.5, 4.2))
    labels = []
    for x, (name, rates) in enumerate(tokens_per_second.items()):
        q1, median, q3 = quartiles(rates)
        ax.bar(x, median, color="grey" if name == "no cache" else "tab:blue", yerr=[[median - q1], [q3 - median]], capsize=4)
        labels.append(f"{name}\n{median:.0f} tokens/s")
    ax.set_xticks(range(len(labels)), labels, fontsize=9)
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))  # 600, not 6 x 10^2
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda value, _: ""))
    ax.set_ylabel("generated tokens/s (log scale)")
    ax.set_title(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)

# %%
(args,) = HfArgumentParser(KVCacheArguments).parse_args_into_dataclasses(args=recipe_argv())
if args.threads != 1:
    use_passive_omp_wait()  # more than one OpenMP thread: let waiting threads sleep (see hf_models.benchmarking)
if args.threads:
    torch.set_num_threads(args.threads)
torch.set_grad_enabled(False)
output_dir = Path(args.output_dir)
check_output_dir_writable(args.output_dir)  # before the timing, not after it
new_tokens = args.total_tokens - args.prompt_tokens

# %% [markdown]
# ## 1. Lesson 5's model, and what its cache costs in memory (fp32), with and without GQA.

# %%
if is_stock_checkpoint(args.model_folder):  # converted into the zoo's class once, then read as a zoo folder
    source = resolve_model_source(args.model_folder, "--model_folder", "recipes/05_modern_gpt.py", args.output_dir)
    folder = source.folder
else:
    source, folder = None, lesson5_model_folder(args.model_folder, LESSON5_FOLDER, "--model_folder")  # refuses a folder without a model
description, model, tokenizer = lesson_model(folder, args.total_tokens, args.seed)
if source is not None:
    description = f"{source.description} ({folder})"
config = model.config
memory = kv_cache_memory(config, args.total_tokens)
print(f"{description}: {config.num_hidden_layers} layers, {config.num_attention_heads} query heads, "
      f"{config.num_key_value_heads} kv heads of {config.head_dim}, {model.num_parameters():,} parameters")
print(f"KV cache = 2 x {config.num_hidden_layers} layers x {config.num_key_value_heads} kv heads x {config.head_dim} "
      f"x 4 bytes = {memory['bytes_per_token'] / 1024:.1f} KiB per token; {memory['bytes_per_sequence'] / 2**20:.2f} MiB "
      f"per {args.total_tokens}-token sequence ({memory['bytes_per_sequence_without_gqa'] / 2**20:.2f} MiB with one "
      f"kv head per query head)")

# %% [markdown]
# ## 2. Six ways to generate, one set of tokens: a cache or a compiler changes the cost, never the result.

# %%
prompt = prompts(tokenizer, config.vocab_size, args.batch_size, args.prompt_tokens, args.seed)  # (B, P)
generated = {name: greedy(model, prompt, args.total_tokens, make_kwargs) for name, make_kwargs in CACHES.items()}  # compiles once
reference = generated["no cache"]
same_tokens = {name: bool(torch.equal(ids, reference)) for name, ids in generated.items()}
print(f"\nsame greedy tokens as without a cache ({args.prompt_tokens} -> {args.total_tokens} tokens, batch "
      f"{args.batch_size}): " + ", ".join(f"{name} {'yes' if same else 'NO'}" for name, same in same_tokens.items()))
if tokenizer is not None:
    print(f"sample: {tokenizer.decode(reference[0, : args.prompt_tokens + 48])!r}")

# %% [markdown]
# ## 3. Time them: every round runs each variant once, in rotating order; medians and paired ratios.

# %%
machine = describe_machine()
print(f"\nmachine: {machine.summary()}")
contenders = {
    name: (lambda make_kwargs=make_kwargs: greedy(model, prompt, args.total_tokens, make_kwargs))
    for name, make_kwargs in CACHES.items()
}
timings = time_interleaved(contenders, rounds=args.rounds, warmup=args.warmup)
rows = {}
for name in CACHES:
    rows[name] = dict(
        median_seconds=timings.median_seconds[name],
        tokens_per_second=args.batch_size * new_tokens / timings.median_seconds[name],
        speedup_vs_no_cache=asdict(timings.speedup(name, baseline="no cache")),
        same_tokens=same_tokens[name],
    )
    if name in HAND_WRITTEN:
        rows[name]["speedup_vs_dynamic_cache"] = asdict(timings.speedup(name, baseline="DynamicCache"))
print(f"\n{timings.rounds} rounds, medians; speed-ups are medians of per-round ratios, (q1-q3) their noise band:")
print(f"  {'cache':<24}{'seconds':>9}{'tokens/s':>10}  {'vs no cache':<20}{'vs DynamicCache':<18}same tokens")
for name, row in rows.items():
    versus_dynamic = timings.speedup(name, "DynamicCache").band() if name in HAND_WRITTEN else ""
    print(f"  {name:<24}{row['median_seconds']:>9.3f}{row['tokens_per_second']:>10.1f}  "
          f"{timings.speedup(name, 'no cache').band():<20}{versus_dynamic:<18}{'yes' if row['same_tokens'] else 'NO'}")

# %% [markdown]
# ## 4. One plot, and the results.

# %%
output_dir.mkdir(parents=True, exist_ok=True)
tokens_per_call = args.batch_size * new_tokens
plot({name: [tokens_per_call / s for s in seconds] for name, seconds in timings.seconds.items()},
     f"Greedy generation, {args.prompt_tokens} -> {args.total_tokens} tokens, batch {args.batch_size}, "
     f"{config.num_hidden_layers}L/{config.hidden_size} ({timings.rounds} rounds)",
     output_dir / "tokens_per_second.png")
show(output_dir / "tokens_per_second.png")
write_json_atomically(output_dir / "results.json", dict(
    arguments=asdict(args),
    model=description,
    machine=machine.to_dict(),
    kv_cache_memory=memory,
    results=rows,
    timings=timings.to_dict(),
))
print(f"\nplot: {output_dir / 'tokens_per_second.png'}\nresults: {output_dir / 'results.json'}")
