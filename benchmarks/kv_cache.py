"""Benchmark: the six ways of lesson 6 to generate, timed step by step, at two model sizes and two batches.

Lesson 6 (``recipes/06_kv_cache.py``) shows that no cache, the hand-written ``GrowingKVCache`` and
``StaticKVCache`` (eager, and with the decoding step compiled), and transformers' ``DynamicCache`` and ``StaticCache`` generate the same tokens,
and times whole ``generate()`` calls once. This script is the harness behind the lesson's claims:

* Greedy generation from a 32-token prompt to 512 tokens, at batch 1 and 8, for (a) lesson 5's
  model (its trained folder, with the context raised to 512: rotary positions have no table to
  outgrow; or a random model of its size) and (b) a 6-layer, 6-head, width-384 decoder with random
  weights (nanoGPT's shakespeare-char GPU size; the weights do not change the timing).
* The project's one step clock (``hf_models.benchmarking.StepClock``), passed to ``generate()`` as
  a stopping criterion, times every step, so one ``generate()`` call gives the whole
  tokens/s-against-length curve, not only its total. The six variants, the lesson's model and its
  prompts are lesson 6's harness, ``hf_models.benchmarking.generation``, which the lesson imports too.
* The cached variants are timed by ``hf_models.benchmarking.time_interleaved``: rounds in rotating
  order, more rounds (up to 3x ``--rounds``) until each has run ``--min_seconds``, medians, and
  per-round paired ratios whose quartiles are the noise band of "hand-written vs DynamicCache".
* No cache: step ``n`` is a forward over the whole ``n``-token sequence, whatever came before, so
  its cost is a function of ``n`` alone. By default it is therefore not generated token by token
  (at batch 8 and width 384 it would dominate the run) but timed at
  ``--no_cache_samples`` lengths and interpolated, which gives the same curve and total; its
  predictions at those lengths are checked against the cached runs' tokens. The timed no-cache
  step is the forward and the argmax only, without generate()'s own per-step work, so the
  speed-ups printed are, if anything, understated. ``--no_cache_samples 0`` generates every token.
* Targets: ``GrowingKVCache`` >= 5x no cache on model (b), and each hand-written cache >= 0.95x
  ``DynamicCache`` everywhere. A miss whose paired q3 still reaches the target is reported as
  "within noise" (rerun with more ``--rounds`` to decide it).

What to look for. Without a cache tokens/s falls like ``1/n``; with one it stays nearly flat, so the
speed-up grows with the length and with the batch: a no-cache step at batch 8 is 8 full forwards,
while a cached step at batch 8 costs well under 8 steps at batch 1 (batch-1 steps are matrix-vector
products bound by reading the weights). ``DynamicCache`` sags at long lengths at batch 8, where its
per-step ``torch.cat`` copies megabytes; ``StaticCache`` attends over all ``max_cache_len`` slots
from the first step. Measured numbers are in ``benchmarks/README.md``; each run writes its own to
``benchmarks/results/kv_cache.json`` and a plot to ``kv_cache.png``.

    python benchmarks/kv_cache.py                                 # a few minutes on 2 CPU cores
    python benchmarks/kv_cache.py --batch_sizes 1 --rounds 2 --skip_large
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
from transformers import HfArgumentParser

from hf_models import ModernDecoderConfig, ModernDecoderForCausalLM
from hf_models.benchmarking import InterleavedTimings, prepare_benchmark, time_interleaved
# Lesson 6's harness: the six variants, the model and its prompts. The lesson shows them; this script measures them harder.
from hf_models.benchmarking.generation import (
    CACHES, HAND_WRITTEN, LESSON5_FOLDER, clocked_generate, greedy, kv_cache_memory, lesson_model, prompts,
)
from hf_models.files import write_json_atomically
from hf_models.recipe_support.validation import lesson5_model_folder

REPO = Path(__file__).resolve().parents[1]
WINDOW = 16  # plotted and "at end" speeds: median over this many consecutive steps (robust to a stalled step)
CACHED = [name for name in CACHES if name != "no cache"]


@dataclass
class KVCacheBenchmarkArguments:
    model_folder: str = field(
        default=LESSON5_FOLDER,
        metadata={"help": "Lesson 5's trained model; a random model of its size is timed if the default folder is missing."},
    )
    output_dir: str = field(default=str(REPO / "benchmarks" / "results"), metadata={"help": "Where kv_cache.json and .png go."})
    prompt_tokens: int = field(default=32, metadata={"help": "Prompt length."})
    total_tokens: int = field(default=512, metadata={"help": "Sequence length at the end of generation (prompt + new)."})
    batch_sizes: list[int] = field(default_factory=lambda: [1, 8], metadata={"help": "Batch sizes to time."})
    rounds: int = field(default=3, metadata={"help": "Timed rounds of the cached variants per model and batch size, at least."})
    min_seconds: float = field(
        default=4.0,
        metadata={"help": "More rounds (up to 3x --rounds) until each cached variant has run this long: cheap cells are noisier."},
    )
    no_cache_samples: int = field(
        default=8,
        metadata={"help": "Time no-cache steps at this many lengths and interpolate; 0: generate every token without cache."},
    )
    threads: int = field(default=1, metadata={"help": "torch threads (0: every usable CPU); see recipes/06_kv_cache.py."})
    device: str = field(
        default="cpu",
        metadata={"help": "Where the models generate: cpu, or cuda (the GPU check, utils/gpu_check.py). generate() reads a "
                          "token back every step, so the host-side step clock times the device's work."},
    )
    large_layers: int = field(default=6, metadata={"help": "Layers of the random-weight model (b)."})
    large_heads: int = field(default=6, metadata={"help": "Query heads of model (b)."})
    large_kv_heads: int = field(default=3, metadata={"help": "Key/value heads of model (b) (GQA, 2 query heads per kv head)."})
    large_hidden_size: int = field(default=384, metadata={"help": "Width of model (b)."})
    large_vocab_size: int = field(default=65, metadata={"help": "Vocabulary of model (b) (65: shakespeare-char)."})
    skip_large: bool = field(default=False, metadata={"help": "Only time the lesson model (a)."})
    seed: int = field(default=0, metadata={"help": "Seed for random weights and prompts."})


# ----------------------------------------------------------------------------- no cache, sampled


def sampled_no_cache(model, reference: torch.LongTensor, prompt_tokens: int, samples: int) -> tuple[list[float], dict]:
    """No-cache step durations at every length, from ``samples`` timed lengths, linearly interpolated.

    The step that produces token ``L`` is a forward over ``reference[:, :L]`` (B, L), then an argmax
    of the last position: the same work whatever the earlier steps were. Each length is a contender
    of the shared timer (three rounds, longest first in the first round). Returns the durations of
    steps ``prompt .. total-1`` and ``{L: (median seconds, prediction matches reference[:, L])}``.
    """
    total = reference.shape[1]
    lengths = sorted({int(round(x)) for x in np.linspace(prompt_tokens, total - 1, samples)}, reverse=True)
    matches = {}

    def step(length: int) -> None:
        logits = model(reference[:, :length], use_cache=False, logits_to_keep=1).logits  # (B, L) -> (B, 1, V)
        matches[length] = bool(torch.equal(logits[:, -1].argmax(-1), reference[:, length]))  # (B,) vs (B,)

    timings = time_interleaved({str(length): (lambda length=length: step(length)) for length in lengths}, rounds=3, warmup=0)
    measured = {length: (timings.median_seconds[str(length)], matches[length]) for length in lengths}
    lengths = lengths[::-1]  # np.interp wants increasing x
    durations = np.interp(np.arange(prompt_tokens, total), lengths, [measured[length][0] for length in lengths])
    return durations.tolist(), measured


# ----------------------------------------------------------------------------- the models


def large_model(args: KVCacheBenchmarkArguments):
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
    model = ModernDecoderForCausalLM(config).eval()
    model.generation_config.eos_token_id = model.generation_config.pad_token_id = None  # generate exactly to length
    return "random weights", model, None


# ----------------------------------------------------------------------------- one (model, batch) cell


def time_cell(model, prompt: torch.LongTensor, args: KVCacheBenchmarkArguments) -> tuple[dict, InterleavedTimings]:
    """Time every variant on one (model, batch): the cached ones interleaved, no cache once."""
    new_tokens, batch_size = args.total_tokens - prompt.shape[1], prompt.shape[0]
    reference = greedy(model, prompt, args.total_tokens, CACHES["GrowingKVCache"])  # also a warm-up

    # Each call records (ids, per-step seconds); the timer times the whole call. The first
    # `warmup` records of each variant are the warm-up's and are dropped.
    warmup, records = 1, {name: [] for name in CACHED}
    contenders = {
        name: (lambda name=name: records[name].append(clocked_generate(model, prompt, args.total_tokens, CACHES[name])))
        for name in CACHED
    }
    timings = time_interleaved(contenders, rounds=args.rounds, warmup=warmup, min_seconds=args.min_seconds)
    step_runs = {name: [steps for _, steps in records[name][warmup:]] for name in CACHED}
    same_tokens = {name: all(torch.equal(ids, reference) for ids, _ in records[name]) for name in CACHED}
    seconds = dict(timings.median_seconds)

    sampled = None
    if args.no_cache_samples:
        steps, sampled = sampled_no_cache(model, reference, prompt.shape[1], args.no_cache_samples)
        seconds["no cache"], same_tokens["no cache"] = sum(steps), all(match for _, match in sampled.values())
    else:  # the expensive one: once per cell, token by token
        record = []
        once = time_interleaved({"no cache": lambda: record.append(clocked_generate(model, prompt, args.total_tokens, CACHES["no cache"]))},
                                rounds=1, warmup=0)
        (ids, steps), = record
        seconds["no cache"], same_tokens["no cache"] = once.median_seconds["no cache"], bool(torch.equal(ids, reference))
    step_runs["no cache"] = [steps]

    cell = {}
    for name in CACHES:
        steps = [statistics.median(run[i] for run in step_runs[name]) for i in range(new_tokens)]  # median over rounds, per step
        cell[name] = dict(
            rounds=len(step_runs[name]),
            seconds=seconds[name],
            tokens_per_second=batch_size * new_tokens / seconds[name],
            # What one more token costs at length `total_tokens`: the median of the last WINDOW steps.
            tokens_per_second_at_end=batch_size / statistics.median(steps[-WINDOW:]),
            step_seconds=steps,
            same_tokens=same_tokens[name],
            vs_no_cache=seconds["no cache"] / seconds[name],
        )
    if sampled is not None:
        cell["no cache"]["sampled_lengths"] = sorted(sampled)
    for name in HAND_WRITTEN:
        cell[name]["vs_dynamic_cache"] = asdict(timings.speedup(name, baseline="DynamicCache"))
    return cell, timings


# ----------------------------------------------------------------------------- reporting


def print_cell(title: str, cell: dict) -> None:
    print(f"\n{title}")
    print(f"  {'cache':<24}{'rounds':>7}{'seconds':>10}{'tokens/s':>10}{'at end':>9}{'vs none':>9}  {'vs Dynamic (q1-q3)':<20}same tokens")
    for name, row in cell.items():
        versus = row.get("vs_dynamic_cache")
        versus = f"{versus['median']:.2f} ({versus['q1']:.2f}-{versus['q3']:.2f})" if versus else ""
        rounds = f"{row['rounds']}*" if "sampled_lengths" in row else str(row["rounds"])
        print(f"  {name:<24}{rounds:>7}{row['seconds']:>10.2f}{row['tokens_per_second']:>10.1f}"
              f"{row['tokens_per_second_at_end']:>9.1f}{row['vs_no_cache']:>8.1f}x  {versus:<20}{'yes' if row['same_tokens'] else 'NO'}")


def check_targets(results: dict, large_label: str | None) -> list[dict]:
    """The targets: >= 5x no cache on the large model, and >= 0.95x DynamicCache everywhere.

    "vs DynamicCache" is the median of per-round paired ratios; where it falls short but its q3
    reaches the target, the shortfall is inside the machine's noise and is reported as such.
    """
    checks = []
    for label, cells in results.items():
        for batch, cell in cells.items():
            if label == large_label:
                value = cell["GrowingKVCache"]["vs_no_cache"]
                checks.append(dict(what=f"GrowingKVCache vs no cache, {label}, batch {batch}", target=5.0, value=value, q3=value))
            for name in HAND_WRITTEN:
                ratio = cell[name]["vs_dynamic_cache"]
                checks.append(dict(what=f"{name} vs DynamicCache, {label}, batch {batch}", target=0.95,
                                   value=ratio["median"], q1=ratio["q1"], q3=ratio["q3"]))
    print("\ntargets (vs DynamicCache: median of the per-round ratios, q1-q3 in brackets):")
    for check in checks:
        check["met"] = check["value"] >= check["target"]
        check["verdict"] = "met" if check["met"] else "within noise" if check["q3"] >= check["target"] else "MISSED"
        band = f" ({check['q1']:.2f}-{check['q3']:.2f})" if "q1" in check else ""
        print(f"  {check['what']:<48}{check['value']:6.2f}x{band:<14}  target >= {check['target']}x: {check['verdict']}")
    return checks


def plot(results: dict, prompt_tokens: int, path: Path) -> None:
    """tokens/s against sequence length: one panel per (model, batch), one line per cache, log y."""
    labels, batches = list(results), list(next(iter(results.values())))
    figure, axes = plt.subplots(len(labels), len(batches), figsize=(6.4 * len(batches), 4.4 * len(labels)), squeeze=False)
    for row, label in enumerate(labels):
        for column, batch in enumerate(batches):
            ax = axes[row][column]
            for name in CACHES:  # the same order, hence the same colours, in every panel
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
    (args,) = HfArgumentParser(KVCacheBenchmarkArguments).parse_args_into_dataclasses()
    if args.device not in ("cpu", "cuda") or (args.device == "cuda" and not torch.cuda.is_available()):
        raise SystemExit(f"--device {args.device}: allowed: cpu, or cuda where torch.cuda.is_available() (it is "
                         f"{torch.cuda.is_available()} here)")
    machine = prepare_benchmark(args.threads)  # passive OpenMP waits, pinned threads, the machine printed
    torch.set_grad_enabled(False)
    output_dir = Path(args.output_dir)
    print(f"Greedy generation {args.prompt_tokens} -> {args.total_tokens} tokens at batch sizes {args.batch_sizes}. Per model "
          f"and batch: one untimed reference run, then the cached variants in interleaved rounds (at least {args.rounds}, "
          f"until each has run {args.min_seconds:g} s, up to {3 * args.rounds}; medians), and no cache once, "
          + (f"timed at {args.no_cache_samples} lengths and interpolated (marked *)." if args.no_cache_samples
             else "generated token by token."))

    folder = lesson5_model_folder(args.model_folder, LESSON5_FOLDER, "--model_folder")
    models = [lambda: lesson_model(folder, args.total_tokens, args.seed)]
    models += [] if args.skip_large else [lambda: large_model(args)]
    results, timings, memory, large_label = {}, {}, {}, None
    start = time.perf_counter()
    for index, build in enumerate(models):
        description, model, tokenizer = build()
        model.to(args.device)
        config = model.config
        label = f"{config.num_hidden_layers}L/{config.hidden_size}"
        large_label = label if index == 1 else large_label
        memory[label] = kv_cache_memory(config, args.total_tokens)
        print(f"\n== {label}: {description}: {config.num_hidden_layers} layers, {config.num_attention_heads} query heads, "
              f"{config.num_key_value_heads} kv heads of {config.head_dim}, vocab {config.vocab_size}, "
              f"{model.num_parameters():,} parameters; KV cache {memory[label]['bytes_per_token'] / 1024:.1f} KiB per token (fp32)")
        results[label], timings[label] = {}, {}
        for batch_size in args.batch_sizes:
            prompt = prompts(tokenizer, config.vocab_size, batch_size, args.prompt_tokens, args.seed).to(args.device)  # (B, P)
            results[label][batch_size], cell_timings = time_cell(model, prompt, args)
            timings[label][str(batch_size)] = cell_timings.to_dict()
            print_cell(f"{label}, batch {batch_size}: {args.prompt_tokens} -> {args.total_tokens} tokens "
                       f"({time.perf_counter() - start:.0f} s so far)", results[label][batch_size])

    checks = check_targets(results, large_label)
    output_dir.mkdir(parents=True, exist_ok=True)
    plot(results, args.prompt_tokens, output_dir / "kv_cache.png")
    write_json_atomically(output_dir / "kv_cache.json", dict(
        benchmark="kv_cache",
        arguments=asdict(args),
        machine=machine.to_dict(),
        seconds=time.perf_counter() - start,
        kv_cache_memory=memory,
        targets=checks,
        # JSON keys are strings. `step_seconds[i]`: median time of the step that reaches length prompt + 1 + i.
        results={label: {str(batch): cell for batch, cell in cells.items()} for label, cells in results.items()},
        timings=timings,
    ))
    print(f"\nplot: {output_dir / 'kv_cache.png'}\nresults: {output_dir / 'kv_cache.json'}\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
