"""Lesson 6: the KV cache. Why generation needs one, what it costs, and how to store it.

Why a KV cache
--------------
A decoder generates one token per forward pass. Without a cache, step ``n`` re-runs the whole
prefix: ``n`` tokens through every layer to produce one new token, so generating ``N`` tokens
costs ``N^2 / 2`` token-forwards. But attention is causal: the key and value of token ``i``
depend only on tokens ``<= i``, so once computed they never change. Keep them, and each step runs
the model on the *one* new token: it computes that token's q/k/v, appends k/v to the cache and
attends over everything cached. Per-step work drops from ``O(n * model)`` to ``O(model + n *
layers * width)``: the no-cache curve in this lesson's plot falls like ``1/n``, the cached ones
stay nearly flat.

What grows
----------
Per layer, a key and a value tensor of shape (B, H_kv, T, D) whose ``T`` grows by one token per
step. How it grows matters. transformers' ``DynamicCache`` does ``torch.cat([old, new])``: every
step allocates a new tensor and copies the whole history, ``n^2 / 2`` slot copies in all. The
zoo's ``GrowingKVCache`` (``hf_models/kv_cache.py``) writes in place into a buffer and doubles it
when full, like a Python list: fewer than ``2n`` copies in all, amortised O(1) per token.

Why a static, preallocated cache exists
---------------------------------------
``StaticKVCache(max_cache_len)`` allocates the whole buffer once, before the first token:

* nothing is ever reallocated or copied while decoding, and memory use is known up front (a
  server admits a request only if its cache fits);
* the tensors keep their shapes and addresses at every step, which is what compiled graphs need:
  ``torch.compile`` traces one graph and CUDA graphs replay one recording of kernel launches,
  and a tensor that changes shape invalidates both. transformers' ``StaticCache`` goes all the
  way: it returns the *whole* ``max_cache_len`` buffer at every step (one shape, the empty tail
  masked), while ``StaticKVCache`` returns the filled prefix (no work on empty slots, but a new
  shape every step, so it is built for eager decoding).

Memory
------
A cache stores, for every token, one key and one value vector per layer and per key/value head::

    bytes = 2 (k and v) x layers x kv_heads x head_dim x tokens x bytes per number   (x batch)

LLaMA-2-7B (32 layers, 32 kv heads of 128, fp16): 0.5 MB per token, 2 GB for one 4k-token
sequence, a seventh of the model's weights for every sequence in the batch. Hence grouped-query
attention: ``H`` query heads share ``H_kv < H`` key/value heads, so the cache shrinks by ``H /
H_kv`` (LLaMA-2-70B: 64 query heads, 8 kv heads, an 8x smaller cache) at almost no loss in
quality. This lesson's models have 2 query heads per kv head: half the cache of multi-head.

What this recipe measures
-------------------------
Greedy generation from a 32-token prompt to 512 tokens, at batch 1 and batch 8, with no cache,
the hand-written growing and static caches, and transformers' ``DynamicCache`` and
``StaticCache``, for two models: (a) lesson 5's trained modern decoder (``--model_folder``,
loaded with its context raised to 512: rotary positions have no table to outgrow) or, if that
folder is missing, a random model of lesson 5's default size; (b) a 6-layer, 6-head, width-384
modern decoder with random weights (nanoGPT's shakespeare-char GPU size; the weights do not change
the timing). A ``StoppingCriteria`` timestamps every step, so one ``generate`` call gives the whole
tokens/s-against-length curve. The cached variants run ``--rounds`` times or more (until each has
run ``--min_seconds``: the cheapest cells are the noisiest), interleaved in rounds of alternating
order so that a noisy machine hits them alike, and the recipe reports medians.

Without a cache, step ``n`` is a forward over the whole ``n``-token sequence, whatever came before:
its cost is a function of ``n`` alone. So by default no-cache generation is not run token by token
(at batch 8 and width 384 that alone takes 5-10 minutes on 2 cores) but timed at
``--no_cache_samples`` lengths from 32 to 511 and interpolated, which gives the same curve and
total in seconds; its predictions there are checked against the cached runs' tokens.
``--no_cache_samples 0`` generates every token instead. The timed no-cache step is the model's
forward and the argmax only, without generate()'s own per-step work, so the speed-ups printed
are, if anything, understated.

Threads: one by default. On a 2-core machine that other jobs also use, 2 OpenMP threads wait for
each other at every op and a decoding step runs 3-30x slower, and noisily (measured while writing
this lesson). On an idle machine try ``--threads 2``.

What to look for. Without a cache tokens/s falls like ``1/n``; with one it stays nearly flat, so
the speed-up grows with the length, and with the batch: a no-cache step at batch 8 is 8 full
forwards, while a cached step at batch 8 costs under twice a step at batch 1 (whose
matrix-vector products are bound by reading the weights, not by arithmetic). Among the caches,
``DynamicCache`` sags at long lengths at batch 8, where its per-step ``torch.cat`` copies megabytes;
transformers' ``StaticCache`` is flat and the slowest until its buffer fills, because it attends
over all ``max_cache_len`` slots from the first step (and generate() builds a full-size mask for
it at every step); the two hand-written caches attend over the filled prefix and copy one token
per step. At batch 1 they and ``DynamicCache`` are within noise of each other: copying one
sequence's cache is cheap next to reading all the weights, which is what a batch-1 step mostly does.

Run:
    python recipes/06_kv_cache.py                                   # ~5 minutes on 2 CPU cores
    python recipes/06_kv_cache.py --batch_sizes 1 --rounds 5        # quicker, batch 1 only
    python recipes/06_kv_cache.py --no_cache_samples 0              # generate without cache token by token
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DynamicCache,
    HfArgumentParser,
    StaticCache,
    StoppingCriteria,
    StoppingCriteriaList,
)

from hf_models import ModernDecoderConfig, ModernDecoderForCausalLM
from hf_models.causal_lm import CACHE_FIELD
from hf_models.kv_cache import GrowingKVCache, StaticKVCache
from hf_models.files import write_json_atomically

PROMPT_TEXT = (
    "ROMEO:\nBut soft, what light through yonder window breaks?\nIt is the east, and Juliet is the sun.\n"
    "Arise, fair sun, and kill the envious moon,\nWho is already sick and pale with grief.\n"
)
# Lesson 5's default model (recipes/05_modern_gpt.py), used with random weights when no trained folder exists.
LESSON5_SIZE = dict(vocab_size=2048, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, hidden_size=192)
WINDOW = 16  # plotted and "at end" speeds: median over this many consecutive steps (robust to a stalled step)


@dataclass
class KVCacheArguments:
    model_folder: str = field(
        default="runs/05_modern_gpt/modern-gpt-shakespeare",
        metadata={"help": "Lesson 5's trained model; a random model of its default size is used if it is missing."},
    )
    output_dir: str = field(default="runs/06_kv_cache", metadata={"help": "Where the plot and results.json go."})
    prompt_tokens: int = field(default=32, metadata={"help": "Prompt length."})
    total_tokens: int = field(default=512, metadata={"help": "Sequence length at the end of generation (prompt + new)."})
    batch_sizes: list[int] = field(default_factory=lambda: [1, 8], metadata={"help": "Batch sizes to time."})
    rounds: int = field(
        default=4, metadata={"help": "Timed runs of each cached variant per model and batch size, at least (even: both orders alike)."}
    )
    min_seconds: float = field(
        default=8.0,
        metadata={"help": "More rounds (up to 3x --rounds) until each cached variant has run this long: cheap cells are noisier."},
    )
    no_cache_samples: int = field(
        default=16,
        metadata={"help": "Time no-cache steps at this many lengths and interpolate; 0: generate every token without cache."},
    )
    threads: int = field(default=1, metadata={"help": "torch threads (0: torch's default). See the module docstring."})
    large_layers: int = field(default=6, metadata={"help": "Layers of the random-weight model (b)."})
    large_heads: int = field(default=6, metadata={"help": "Query heads of model (b)."})
    large_kv_heads: int = field(default=3, metadata={"help": "Key/value heads of model (b) (GQA, 2 query heads per kv head)."})
    large_hidden_size: int = field(default=384, metadata={"help": "Width of model (b)."})
    large_vocab_size: int = field(default=65, metadata={"help": "Vocabulary of model (b) (65: shakespeare-char)."})
    skip_large: bool = field(default=False, metadata={"help": "Only time the lesson model (a)."})
    seed: int = field(default=0, metadata={"help": "Seed for random weights and prompts."})


# ----------------------------------------------------------------------------- the variants

# (name, make_cache). `make_cache(model, max_cache_len)` returns the `past_key_values` to pass to
# generate(), a fresh one per call; `None` as the maker means "no cache at all" (use_cache=False).
CACHES = [
    ("no cache", None),
    ("GrowingKVCache", lambda model, max_len: GrowingKVCache(num_layers=model.config.num_hidden_layers)),  # generate()'s default
    ("StaticKVCache", lambda model, max_len: StaticKVCache(max_cache_len=max_len, num_layers=model.config.num_hidden_layers)),
    ("DynamicCache", lambda model, max_len: DynamicCache(config=model.config)),
    ("StaticCache", lambda model, max_len: StaticCache(config=model.config, max_cache_len=max_len)),
]
HAND_WRITTEN = ("GrowingKVCache", "StaticKVCache")


class StepClock(StoppingCriteria):
    """Never stops generation; records when each step finished. generate() calls its stopping
    criteria once per new token, after appending it, so ``times[i]`` is the time to reach length
    ``prompt + 1 + i`` (the first step includes the prompt's forward)."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.times: list[float] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        self.times.append(time.perf_counter() - self.start)
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def cache_kwargs(model, make_cache, max_cache_len: int) -> dict:
    """generate() arguments for one variant: a fresh cache, or no cache at all."""
    return dict(use_cache=False) if make_cache is None else {CACHE_FIELD: make_cache(model, max_cache_len)}


def timed_generate(model, prompt: torch.LongTensor, total_tokens: int, make_cache) -> tuple[torch.LongTensor, list[float]]:
    """Greedy generation from ``prompt`` (B, P) to (B, total_tokens): the ids and each step's seconds."""
    kwargs = cache_kwargs(model, make_cache, total_tokens)
    clock = StepClock()
    ids = model.generate(
        prompt, max_new_tokens=total_tokens - prompt.shape[1], do_sample=False, stopping_criteria=StoppingCriteriaList([clock]), **kwargs
    )
    if ids.shape[1] != total_tokens:
        raise RuntimeError(f"generation stopped at {ids.shape[1]} tokens, expected {total_tokens} (an EOS?)")
    return ids, np.diff(clock.times, prepend=0.0).tolist()  # elapsed at each step -> duration of each step


def sampled_no_cache(model, reference: torch.LongTensor, prompt_tokens: int, samples: int) -> tuple[list[float], dict]:
    """No-cache step durations at every length, from ``samples`` timed lengths, linearly interpolated.

    The step that produces token ``L`` is a forward over ``reference[:, :L]`` (B, L), then an argmax
    of the last position: the same work whatever the earlier steps were. Returns the durations of
    steps ``prompt .. total-1`` and ``{L: (seconds, prediction matches reference[:, L])}``.
    """
    total = reference.shape[1]
    lengths = sorted({int(round(x)) for x in np.linspace(prompt_tokens, total - 1, samples)})
    measured = {}
    for length in lengths[::-1]:  # longest first: any warm-up effect lands on the cheapest steps
        seconds = []
        while len(seconds) < 3 and sum(seconds) < 0.5:  # short steps are timed 3 times: their noise is larger
            start = time.perf_counter()
            logits = model(reference[:, :length], use_cache=False, logits_to_keep=1).logits  # (B, L) -> (B, 1, V)
            prediction = logits[:, -1].argmax(-1)  # (B,)
            seconds.append(time.perf_counter() - start)
        measured[length] = (statistics.median(seconds), bool(torch.equal(prediction, reference[:, length])))
    durations = np.interp(np.arange(prompt_tokens, total), lengths, [measured[length][0] for length in lengths])
    return durations.tolist(), measured


# ----------------------------------------------------------------------------- the models


def lesson_model(args: KVCacheArguments):
    """(a): lesson 5's trained model with its context raised to ``total_tokens``, else a random one of its size."""
    folder = Path(args.model_folder)
    if (folder / "config.json").exists():
        # Rotary positions are computed, not looked up, so the model accepts a longer context as is
        # (its text past the 128 tokens it was trained on is another matter; speed is what we measure).
        model = AutoModelForCausalLM.from_pretrained(folder, max_position_embeddings=args.total_tokens)
        tokenizer = AutoTokenizer.from_pretrained(folder) if (folder / "tokenizer_config.json").exists() else None
        return f"lesson 5's trained model ({folder})", model, tokenizer
    print(f"\n{folder} does not exist (run recipes/05_modern_gpt.py to train it): timing a randomly initialised "
          f"model of lesson 5's default size instead.")
    torch.manual_seed(args.seed)
    config = ModernDecoderConfig(max_position_embeddings=args.total_tokens, **LESSON5_SIZE)
    return "lesson 5's size, random weights", ModernDecoderForCausalLM(config), None


def large_model(args: KVCacheArguments):
    """(b): nanoGPT's shakespeare-char GPU size, random weights."""
    torch.manual_seed(args.seed)
    config = ModernDecoderConfig(
        vocab_size=args.large_vocab_size,
        max_position_embeddings=args.total_tokens,
        hidden_size=args.large_hidden_size,
        num_hidden_layers=args.large_layers,
        num_attention_heads=args.large_heads,
        num_key_value_heads=args.large_kv_heads,
    )
    return "random weights", ModernDecoderForCausalLM(config), None


def prompts(tokenizer, vocab_size: int, batch_size: int, length: int, seed: int) -> torch.LongTensor:
    """(B, P) prompts: windows of a Shakespeare passage if there is a tokenizer, random ids otherwise."""
    if tokenizer is None:
        return torch.randint(0, vocab_size, (batch_size, length), generator=torch.Generator().manual_seed(seed))
    ids = tokenizer(PROMPT_TEXT)["input_ids"]
    ids = (ids * (1 + (length + batch_size) // len(ids)))[: length + batch_size]  # repeat if the passage is short
    return torch.tensor([ids[row : row + length] for row in range(batch_size)])  # row b starts b tokens in


def kv_cache_bytes(config, tokens: int, kv_heads: int | None = None, bytes_per_number: int = 4) -> int:
    """2 x layers x kv_heads x head_dim x tokens x bytes, for one sequence."""
    kv_heads = config.num_key_value_heads if kv_heads is None else kv_heads
    return 2 * config.num_hidden_layers * kv_heads * config.head_dim * tokens * bytes_per_number


# ----------------------------------------------------------------------------- timing


def time_cell(model, prompt: torch.LongTensor, args: KVCacheArguments) -> dict:
    """Time every variant on one (model, batch): interleaved rounds of alternating order, medians."""
    new_tokens, batch_size = args.total_tokens - prompt.shape[1], prompt.shape[0]
    # generate()'s default cache (the hand-written one config.kv_cache names) gives the reference
    # tokens; that run and a short one of every variant also warm up one-off costs (allocator, lazy
    # init, kernel choice).
    reference = model.generate(prompt, max_new_tokens=new_tokens, do_sample=False)
    for _, make_cache in CACHES:
        model.generate(prompt, max_new_tokens=8, do_sample=False, **cache_kwargs(model, make_cache, args.total_tokens))

    runs = {name: [] for name, _ in CACHES}  # name -> [per-step seconds of one run]
    same_tokens, sampled = {}, None

    def more_rounds(round_index: int) -> bool:
        least_timed = min(sum(map(sum, runs[name])) for name, make_cache in CACHES if make_cache is not None)
        return round_index < args.rounds or (least_timed < args.min_seconds and round_index < 3 * args.rounds)

    round_index = 0
    while more_rounds(round_index):
        order = CACHES if round_index % 2 == 0 else CACHES[::-1]
        for name, make_cache in order:
            if make_cache is None and round_index > 0:
                continue  # the expensive one: once per cell
            if make_cache is None and args.no_cache_samples:
                steps, sampled = sampled_no_cache(model, reference, prompt.shape[1], args.no_cache_samples)
                same_tokens[name] = all(match for _, match in sampled.values())
            else:
                ids, steps = timed_generate(model, prompt, args.total_tokens, make_cache)
                same_tokens[name] = same_tokens.get(name, True) and bool(torch.equal(ids, reference))
            runs[name].append(steps)
        round_index += 1

    cell = {}
    for name, step_runs in runs.items():
        steps = [statistics.median(run[i] for run in step_runs) for i in range(new_tokens)]  # median over rounds, per step
        totals = [sum(run) for run in step_runs]
        cell[name] = dict(
            runs=len(step_runs),
            seconds=statistics.median(totals),
            all_seconds=totals,
            tokens_per_second=batch_size * new_tokens / statistics.median(totals),
            # What one more token costs at length `total_tokens`: the median of the last WINDOW steps.
            tokens_per_second_at_end=batch_size / statistics.median(steps[-WINDOW:]),
            step_seconds=steps,
            same_tokens=same_tokens[name],
        )
    if sampled is not None:
        cell["no cache"]["sampled_lengths"] = sorted(sampled)
    # Hand-written vs DynamicCache, paired by round (they ran seconds apart), then the median.
    for name in HAND_WRITTEN:
        pairs = [sum(dynamic) / sum(ours) for dynamic, ours in zip(runs["DynamicCache"], runs[name])]
        cell[name].update(vs_dynamic_cache=statistics.median(pairs), vs_dynamic_cache_by_round=pairs)
    for name in cell:
        cell[name]["vs_no_cache"] = cell["no cache"]["seconds"] / cell[name]["seconds"]
    return cell


# ----------------------------------------------------------------------------- reporting


def print_cell(title: str, cell: dict) -> None:
    print(f"\n{title}")
    print(f"  {'cache':<16}{'runs':>5}{'seconds':>10}{'tokens/s':>10}{'at end':>9}{'vs none':>9}{'vs Dynamic':>12}  same tokens")
    for name, row in cell.items():
        versus_dynamic = f"{row['vs_dynamic_cache']:.2f}x" if "vs_dynamic_cache" in row else ""
        runs = f"{row['runs']}*" if "sampled_lengths" in row else str(row["runs"])
        print(f"  {name:<16}{runs:>5}{row['seconds']:>10.2f}{row['tokens_per_second']:>10.1f}"
              f"{row['tokens_per_second_at_end']:>9.1f}{row['vs_no_cache']:>8.1f}x{versus_dynamic:>12}  "
              f"{'yes' if row['same_tokens'] else 'NO'}")


def check_targets(results: dict, large_label: str | None) -> list[dict]:
    """The lesson's targets: >= 5x no cache at 6L/384, and >= 0.95x DynamicCache at every size.

    A ratio is only as good as its noise. For "vs DynamicCache" the noise is estimated from the
    per-round ratios: the median of ``n`` of them has a standard error of about ``1.25 * stdev /
    sqrt(n)``, and a value below the target by less than two of those is reported as "within noise"
    rather than as a miss (rerun with more ``--rounds`` to decide it).
    """
    checks = []
    for label, cells in results.items():
        for batch, cell in cells.items():
            if label == large_label:
                checks.append(dict(what=f"GrowingKVCache vs no cache, {label}, batch {batch}", target=5.0,
                                   value=cell["GrowingKVCache"]["vs_no_cache"], noise=0.0))
            for name in HAND_WRITTEN:
                pairs = cell[name]["vs_dynamic_cache_by_round"]
                noise = 2 * 1.25 * statistics.stdev(pairs) / len(pairs) ** 0.5 if len(pairs) > 1 else 0.0
                checks.append(dict(what=f"{name} vs DynamicCache, {label}, batch {batch}", target=0.95,
                                   value=cell[name]["vs_dynamic_cache"], noise=noise, rounds=len(pairs)))
    print("\ntargets (speed ratios of median times; vs DynamicCache: median of the per-round ratios +- 2 standard errors):")
    for check in checks:
        check["met"] = check["value"] >= check["target"]
        verdict = "met" if check["met"] else "within noise" if check["value"] + check["noise"] >= check["target"] else "MISSED"
        noise = f" +- {check['noise']:.2f} ({check['rounds']} rounds)" if "rounds" in check else ""
        print(f"  {check['what']:<48}{check['value']:6.2f}x{noise:<20}  target >= {check['target']}x: {verdict}")
        check["verdict"] = verdict
    return checks


def plot(results: dict, prompt_tokens: int, path: Path) -> None:
    """tokens/s against sequence length: one panel per (model, batch), one line per cache, log y."""
    labels, batches = list(results), list(next(iter(results.values())))
    figure, axes = plt.subplots(len(labels), len(batches), figsize=(6.4 * len(batches), 4.4 * len(labels)), squeeze=False)
    for row, label in enumerate(labels):
        for column, batch in enumerate(batches):
            ax = axes[row][column]
            for name, _ in CACHES:  # the same order, hence the same colours, in every panel
                cell = results[label][batch][name]
                steps = cell["step_seconds"]  # step i brings the sequence to prompt + 1 + i tokens
                if "sampled_lengths" in cell:  # timed at a few lengths: plot those points, joined
                    lengths = cell["sampled_lengths"]
                    rates = [batch / steps[length - prompt_tokens] for length in lengths]
                    ax.plot([length + 1 for length in lengths], rates, "o--", markersize=3, color="black",
                            label=f"{name} (timed at {len(lengths)} lengths)")
                    continue
                # Median over a sliding window of WINDOW steps: one stalled step does not make a spike.
                rates = [batch / statistics.median(steps[i - WINDOW : i]) for i in range(WINDOW, len(steps) + 1)]
                lengths = range(prompt_tokens + WINDOW, prompt_tokens + len(steps) + 1)
                ax.plot(lengths, rates, label=name, linestyle="--" if name == "no cache" else "-")
            ax.set_yscale("log")
            ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))  # 10, 20, 50, 100, ...
            ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))  # 100, not 10^2
            ax.yaxis.set_minor_formatter(NullFormatter())
            ax.set_title(f"{label}, batch {batch}")
            ax.set_xlabel("sequence length (tokens)")
            ax.set_ylabel("generated tokens/s (log scale)")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
    figure.suptitle(f"Greedy decoding speed against sequence length (median of {WINDOW} steps)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main() -> None:
    (args,) = HfArgumentParser(KVCacheArguments).parse_args_into_dataclasses()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    output_dir = Path(args.output_dir)
    no_cache_method = (f"timed at {args.no_cache_samples} lengths and interpolated (marked *)" if args.no_cache_samples
                       else "generated token by token")
    print(f"Greedy generation {args.prompt_tokens} -> {args.total_tokens} tokens at batch sizes {args.batch_sizes}, "
          f"{torch.get_num_threads()} thread(s).\nPer model and batch: one untimed reference run with generate()'s default cache "
          f"and a short warm-up per variant, then each cache timed in rounds of alternating order, at least {args.rounds} "
          f"rounds and until each has run {args.min_seconds:g} s (up to {3 * args.rounds}; medians reported), and no cache once, "
          f"{no_cache_method}.")

    # 1. The models: (a) lesson 5's, (b) 6 layers x 384 with random weights.
    builders = [lesson_model] + ([] if args.skip_large else [large_model])
    results, memory, large_label = {}, {}, None
    start = time.perf_counter()
    for build in builders:
        description, model, tokenizer = build(args)
        model.eval()
        # Generate exactly to total_tokens. (And no pad_token_id: generate() would mask every prompt
        # token that happens to equal it as padding.)
        model.generation_config.eos_token_id = model.generation_config.pad_token_id = None
        config = model.config
        label = f"{config.num_hidden_layers}L/{config.hidden_size}"
        large_label = label if build is large_model else large_label

        # 2. What its cache costs in memory (fp32), and what it would without GQA.
        memory[label] = dict(
            bytes_per_token=kv_cache_bytes(config, 1),
            bytes_per_sequence=kv_cache_bytes(config, args.total_tokens),
            bytes_per_sequence_without_gqa=kv_cache_bytes(config, args.total_tokens, kv_heads=config.num_attention_heads),
        )
        print(f"\n== {label}: {description}: {config.num_hidden_layers} layers, {config.num_attention_heads} query heads, "
              f"{config.num_key_value_heads} kv heads of {config.head_dim}, vocab {config.vocab_size}, "
              f"{model.num_parameters():,} parameters")
        print(f"   KV cache = 2 x {config.num_hidden_layers} layers x {config.num_key_value_heads} kv heads x {config.head_dim} "
              f"x 4 bytes = {memory[label]['bytes_per_token'] / 1024:.1f} KiB per token; "
              f"{memory[label]['bytes_per_sequence'] / 2**20:.2f} MiB per {args.total_tokens}-token sequence "
              f"({memory[label]['bytes_per_sequence_without_gqa'] / 2**20:.2f} MiB with one kv head per query head)")

        # 3. Time every cache at every batch size.
        results[label] = {}
        for batch_size in args.batch_sizes:
            prompt = prompts(tokenizer, config.vocab_size, batch_size, args.prompt_tokens, args.seed)
            results[label][batch_size] = cell = time_cell(model, prompt, args)
            print_cell(f"{label}, batch {batch_size}: {args.prompt_tokens} -> {args.total_tokens} tokens "
                       f"({time.perf_counter() - start:.0f} s so far)", cell)
        if tokenizer is not None:
            sample = model.generate(prompt[:1], max_new_tokens=48, do_sample=False)
            print(f"  sample (greedy, default cache): {tokenizer.decode(sample[0])!r}")

    # 4. Targets, plot, results.
    checks = check_targets(results, large_label)
    output_dir.mkdir(parents=True, exist_ok=True)
    plot(results, args.prompt_tokens, output_dir / "tokens_per_second.png")
    write_json_atomically(output_dir / "results.json", dict(
        arguments=asdict(args),
        threads=torch.get_num_threads(),
        seconds=time.perf_counter() - start,
        kv_cache_memory=memory,
        targets=checks,
        # JSON keys are strings. `step_seconds[i]`: median time of the step that reaches length prompt + 1 + i.
        results={label: {str(batch): cell for batch, cell in cells.items()} for label, cells in results.items()},
    ))
    print(f"\nplot: {output_dir / 'tokens_per_second.png'}\nresults: {output_dir / 'results.json'}\n"
          f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
