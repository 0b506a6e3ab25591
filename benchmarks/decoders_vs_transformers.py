"""Benchmark: the zoo's hand-written decoders against their transformers twins, on CPU.

Each zoo decoder is built at a given size and converted to its transformers twin, so both sides
compute the same function with the same weights (the script checks the logits match):

* ``GPTForCausalLM``            vs ``GPT2LMHeadModel``   (``hf_models.conversion.gpt_to_gpt2``)
* ``ModernDecoderForCausalLM``  vs ``LlamaForCausalLM``  (``hf_models.conversion.modern_to_llama``),
  grouped-query attention with ``num_key_value_heads = heads / 2`` on both sides.

Why: the zoo writes its decoders by hand for teaching, but they should not be a slower way to
train or to generate than the library they convert to. Target: ours >= 0.95x the twin's tokens/s
with SDPA attention, for training and for generation.

What is measured, all in one run, each zoo model next to its twin:

1. training tokens/s -- forward + backward + ``AdamW.step()`` + ``zero_grad()`` on a (batch, context)
   batch with ``labels=input_ids``; attention "eager" and "sdpa"; in float32 and under
   ``torch.autocast("cpu", dtype=torch.bfloat16)`` (forward under autocast, backward outside);
2. generation tokens/s -- greedy ``generate()`` from a 32-token prompt to ``--new_tokens`` new
   tokens, batch 1, sdpa, float32, each model with its default cache (ours: the zoo's
   ``GrowingKVCache``; the twin: transformers' ``DynamicCache``); prefill included;
3. peak memory of one training step, see "Memory" below;
4. model FLOPs utilisation (MFU), see "FLOPs" below.

Timing. ``hf_models.benchmarking.time_interleaved``: after untimed warm-up calls, each round times
one call of ours and one of the twin's, the order flipping every round (A B, B A, ...), and the
table reports tokens/s of the median calls. The ratio ours / twin is the number to read; absolute
tokens/s move with the machine's load. Each round times the two back to back, so ``twin_time /
ours_time`` of one round is a paired estimate of the ratio, and the table shows the quartiles of
these per-round ratios as the ratio's noise band.

Threads. The script runs with ``OMP_WAIT_POLICY=PASSIVE`` unless the environment sets it
(``hf_models.benchmarking.use_passive_omp_wait`` says why: on a shared machine libgomp's spin-wait
penalises each model by its number of small ops rather than its work). Export
``OMP_WAIT_POLICY=ACTIVE`` to measure the default on an idle machine.

FLOPs (PaLM, Chowdhery et al. 2022, appendix B). Training FLOPs per token =
``6 * N + 12 * L * T * C``, with ``N`` the non-embedding parameters (every parameter except the
token and position tables; the tied LM head is therefore not counted, as in PaLM), ``L`` layers,
``T`` context, ``C`` width; the second term is the attention score and weighted-sum matmuls, with
no discount for causal masking. MFU = achieved FLOP/s / the peak of a 2048 x 2048 matmul
(``hf_models.benchmarking.matmul_peak_flops``; float32 for the fp32 rows, bfloat16 for the autocast
rows): probed at start and again before every training cell, MFU divides by the best probe of the
run, so that a probe taken while another process held a core cannot push MFU over 100%.

Memory. Each (model, attention, precision) cell runs in a fresh process (forked from a
``forkserver`` that has only imported the libraries) with glibc's mmap threshold pinned to 64 KiB,
so every tensor of more than 64 KiB is its own mapping and freeing it returns the pages to the
OS: the resident set size (RSS) then follows the bytes live. The process builds the model, runs one
untimed step (AdamW state now exists), reads ``VmRSS``, resets the kernel's RSS high-water mark
(``echo 5 > /proc/self/clear_refs``), runs one more step and reads ``VmHWM``. The difference is
the step's peak: activations saved for backward, gradients, the optimizer's temporaries and
autocast's bfloat16 weight copies -- not the weights and AdamW moments, which are live before and
after. (Where ``clear_refs`` is not writable, it falls back to the whole process's high-water mark
from ``resource.getrusage``, and says so.)

Outputs: a table on stdout, and under ``benchmarks/results/`` (git-ignored) the raw numbers as JSON
(with the machine description) and a bar plot of tokens/s per cell. Measured numbers are in
``benchmarks/README.md``::

    python benchmarks/decoders_vs_transformers.py                # 6 layers / 6 heads / 384, context 256, batch 8
    python benchmarks/decoders_vs_transformers.py --size small   # nanoGPT's CPU size: 4 / 4 / 128, context 64, batch 12
"""

from __future__ import annotations

import datetime
import gc
import multiprocessing
import os
import resource
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import matplotlib
import matplotlib.patches

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
import torch  # noqa: E402
from torch import nn  # noqa: E402
from transformers import HfArgumentParser  # noqa: E402

import hf_models  # noqa: E402
from hf_models.benchmarking import (  # noqa: E402
    InterleavedTimings,
    matmul_peak_flops,
    prepare_benchmark,
    quartiles,
    time_interleaved,
)
from hf_models.conversion import gpt_to_gpt2, modern_to_llama  # noqa: E402
from hf_models.files import write_json_atomically  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"
TARGET_RATIO = 0.95
MODELS = ("gpt", "modern")
ATTENTIONS = ("eager", "sdpa")
PRECISIONS = {"fp32": None, "bf16-autocast": torch.bfloat16}
SIDES = ("ours", "twin")


@dataclass(frozen=True)
class Size:
    layers: int
    heads: int
    hidden: int
    context: int
    batch: int
    rounds: int  # timed training steps per side and cell


SIZES = {
    "default": Size(layers=6, heads=6, hidden=384, context=256, batch=8, rounds=8),
    "small": Size(layers=4, heads=4, hidden=128, context=64, batch=12, rounds=20),
}


@dataclass
class DecodersBenchmarkArguments:
    threads: int = field(default=0, metadata={"help": "CPU threads for both sides (0: every usable CPU)."})
    size: str = field(
        default="default",
        metadata={"help": "default: 6L/6H/384, context 256, batch 8; small (nanoGPT's CPU size): 4L/4H/128, context 64, batch 12.",
                  "choices": sorted(SIZES)},
    )
    vocab_size: int = field(default=2048, metadata={"help": "Vocabulary size (a BPE-size vocabulary)."})
    rounds: int | None = field(default=None, metadata={"help": "Timed training steps per side and cell (default: the size's)."})
    warmup_steps: int = field(default=2, metadata={"help": "Untimed training steps per side and cell."})
    prompt_tokens: int = field(default=32, metadata={"help": "Prompt length for generation."})
    new_tokens: int | None = field(default=None, metadata={"help": "Tokens to generate (default: context - prompt)."})
    generation_rounds: int = field(default=5, metadata={"help": "Timed generate() calls per side."})
    skip_memory: bool = field(default=False, metadata={"help": "Skip the per-cell memory processes."})
    output_dir: str = field(default=str(RESULTS_DIR), metadata={"help": "Where the JSON and PNG go."})


# --- models -----------------------------------------------------------------------------------


def build_pair(name: str, size: Size, vocab_size: int, seed: int = 0) -> tuple[str, nn.Module, nn.Module]:
    """``(label, ours, twin)``: a freshly initialised zoo decoder and its converted transformers twin."""
    torch.manual_seed(seed)
    common = dict(
        vocab_size=vocab_size,
        max_position_embeddings=size.context,
        hidden_size=size.hidden,
        num_hidden_layers=size.layers,
        num_attention_heads=size.heads,
    )
    if name == "gpt":
        ours = hf_models.GPTForCausalLM(hf_models.GPTConfig(**common, bias=True, hidden_act="gelu_new"))
        return "GPT vs GPT2LMHeadModel", ours, gpt_to_gpt2(ours)
    ours = hf_models.ModernDecoderForCausalLM(hf_models.ModernDecoderConfig(**common, num_key_value_heads=size.heads // 2))
    return "Modern vs LlamaForCausalLM", ours, modern_to_llama(ours)


def set_attention(model: nn.Module, attention: str) -> None:
    model.config._attn_implementation = attention


def non_embedding_params(model: nn.Module) -> int:
    """Parameters outside ``nn.Embedding`` tables (a head tied to the token table is not counted)."""
    tables = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    return sum(p.numel() for p in model.parameters() if id(p) not in tables)


def training_flops_per_token(model: nn.Module, size: Size) -> int:
    """PaLM appendix B: ``6 N + 12 L T C`` (N non-embedding parameters)."""
    return 6 * non_embedding_params(model) + 12 * size.layers * size.context * size.hidden


def check_same_function(ours: nn.Module, twin: nn.Module, input_ids: torch.Tensor) -> float:
    """Max |logits difference| of the converted pair, in eval mode."""
    ours.eval()
    twin.eval()
    with torch.no_grad():
        return (ours(input_ids).logits - twin(input_ids).logits).abs().max().item()


# --- what one timed call does -----------------------------------------------------------------


def training_step(model: nn.Module, optimizer: torch.optim.Optimizer, input_ids: torch.Tensor, dtype) -> None:
    with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        loss = model(input_ids=input_ids, labels=input_ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def make_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=1e-4)


def greedy_generate(model: nn.Module, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    output = model.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=0,
    )
    assert output.shape[1] == prompt.shape[1] + new_tokens, "generation stopped early"
    return output


# --- summarising one interleaved comparison ---------------------------------------------------


def summarise(timings: InterleavedTimings, tokens: int) -> dict:
    """tokens/s from the median call of each side, their ratio, and the per-round paired ratios' quartiles."""
    tokens_per_s = {side: tokens / seconds for side, seconds in timings.median_seconds.items()}
    paired = timings.speedup("ours", baseline="twin")
    return {
        "tokens_per_call": tokens,
        "seconds": timings.seconds,
        "tokens_per_s": tokens_per_s,
        "ratio": tokens_per_s["ours"] / tokens_per_s["twin"],
        "paired_ratio_quartiles": [paired.q1, paired.median, paired.q3],
    }


# --- memory, one fresh process per cell -------------------------------------------------------


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def measure_step_memory(job: tuple) -> dict:
    """Runs in a fresh process: the RSS high-water mark of one training step above the RSS before it."""
    name, side, attention, precision, size, vocab_size = job
    _, ours, twin = build_pair(name, size, vocab_size)
    model = ours if side == "ours" else twin
    del ours, twin
    set_attention(model, attention)
    model.train()
    optimizer = make_optimizer(model)
    input_ids = torch.randint(0, vocab_size, (size.batch, size.context))
    training_step(model, optimizer, input_ids, PRECISIONS[precision])  # untimed: AdamW state, caches
    gc.collect()
    before_kib = _status_kib("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        method = "VmHWM after clear_refs"
    except OSError:
        method = "getrusage ru_maxrss (whole process; clear_refs not writable)"
    training_step(model, optimizer, input_ids, PRECISIONS[precision])
    if method.startswith("VmHWM"):
        peak_kib = _status_kib("VmHWM")
    else:
        peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"step_peak_mib": (peak_kib - before_kib) / 1024, "rss_before_mib": before_kib / 1024, "method": method}


def measure_all_step_memory(jobs: list[tuple]) -> list[dict]:
    # Pinning the mmap threshold also stops glibc from raising it dynamically, which would keep
    # freed tensors in the heap and hide them from RSS. The forkserver reads it when it starts.
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(64 * 1024)
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["torch", "transformers", "hf_models", "hf_models.conversion"])
    with ProcessPoolExecutor(max_workers=1, mp_context=context, max_tasks_per_child=1) as pool:
        return list(pool.map(measure_step_memory, jobs))


# --- reporting --------------------------------------------------------------------------------


def paired_band(row: dict) -> str:
    q1, _, q3 = row["paired_ratio_quartiles"]
    return f"{q1:.2f}-{q3:.2f}"


def print_tables(result: dict) -> None:
    size = result["size"]
    print(
        f"\n{result['size_name']} size: {size['layers']} layers / {size['heads']} heads / width {size['hidden']}, "
        f"context {size['context']}, batch {size['batch']}, vocab {result['vocab_size']}; "
        f"{result['machine']['torch_threads']} threads, OMP_WAIT_POLICY={result['machine']['omp_wait_policy']}"
    )
    print(f"load average (1 min) at start / end: {result['load_average'][0]:.1f} / {result['load_average'][1]:.1f}")
    print(
        f"matmul peak (2048^2, best probe of the run): fp32 {result['peak_flops']['fp32'] / 1e9:.0f} GFLOP/s, "
        f"bf16 {result['peak_flops']['bf16-autocast'] / 1e9:.0f} GFLOP/s; "
        f"at start: {result['peak_flops_at_start']['fp32'] / 1e9:.0f} / {result['peak_flops_at_start']['bf16-autocast'] / 1e9:.0f}"
    )
    header = (
        f"{'training step':<28} {'attn':<5} {'precision':<13} {'ours tok/s':>10} {'twin tok/s':>10} {'ratio':>6} "
        f"{'':>4} {'paired q1-q3':>12} {'MFU ours':>8} {'MFU twin':>8} {'mem ours':>9} {'mem twin':>9}"
    )
    print("\n" + header + "\n" + "-" * len(header))
    for row in result["training"]:
        target = "ok" if row["ratio"] >= TARGET_RATIO else "MISS"
        if row["attention"] != "sdpa":
            target = target.lower() if target == "ok" else "miss"  # the target is set for sdpa only
        memory = {side: f"{mib:.0f} MiB" for side, mib in row.get("step_peak_mib", {}).items()}
        print(
            f"{row['label']:<28} {row['attention']:<5} {row['precision']:<13} {row['tokens_per_s']['ours']:>10.0f} "
            f"{row['tokens_per_s']['twin']:>10.0f} {row['ratio']:>6.2f} {target:>4} {paired_band(row):>12} {row['mfu']['ours']:>8.1%} "
            f"{row['mfu']['twin']:>8.1%} {memory.get('ours', '-'):>9} {memory.get('twin', '-'):>9}"
        )
    header = f"{'generation (greedy, sdpa)':<28} {'prompt+new':<19} {'ours tok/s':>10} {'twin tok/s':>10} {'ratio':>6} {'':>4} {'paired q1-q3':>12} same tokens"
    print("\n" + header + "\n" + "-" * len(header))
    for row in result["generation"]:
        target = "ok" if row["ratio"] >= TARGET_RATIO else "MISS"
        print(
            f"{row['label']:<28} {row['prompt_tokens']:>4} + {row['new_tokens']:<12} {row['tokens_per_s']['ours']:>10.1f} "
            f"{row['tokens_per_s']['twin']:>10.1f} {row['ratio']:>6.2f} {target:>4} {paired_band(row):>12} {row['same_tokens']}"
        )
    print(
        f"\nratio = ours / twin tokens/s, medians of interleaved calls; target >= {TARGET_RATIO} with sdpa "
        f"(eager rows: lower-case, for information);\n"
        f"paired q1-q3: quartiles of the per-round ratios (ours and twin timed back to back), the ratio's noise."
    )
    print(f"MFU: {result['flops_formula']}, over the matmul peak above.")
    if result["training"] and "step_peak_mib" in result["training"][0]:
        print(f"mem: {result['memory_method']}")


def plot(result: dict, path: Path) -> None:
    training, generation = result["training"], result["generation"]
    fig, (ax_train, ax_gen) = plt.subplots(
        1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [max(len(training), 1), max(len(generation), 1) + 0.5]}
    )
    colours = {"ours": "#1f77b4", "twin": "#ff7f0e"}
    for ax, rows, labeller, title in (
        (ax_train, training, lambda r: f"{r['model']}\n{r['attention']}\n{r['precision']}", "training step tokens/s"),
        (ax_gen, generation, lambda r: r["model"], "greedy generation tokens/s (batch 1, sdpa)"),
    ):
        for i, row in enumerate(rows):
            top = 0.0
            for offset, side in ((-0.2, "ours"), (0.2, "twin")):
                per_call = [row["tokens_per_call"] / s for s in row["seconds"][side]]
                q1, _, q3 = quartiles(per_call)
                median = row["tokens_per_s"][side]
                ax.bar(i + offset, median, width=0.4, color=colours[side],
                       yerr=[[max(median - q1, 0)], [max(q3 - median, 0)]], capsize=3, error_kw={"elinewidth": 0.8})
                top = max(top, median, q3)
            ax.text(i, top * 1.02, f"{row['ratio']:.2f}x", ha="center", va="bottom", fontsize=9,
                    color="black" if row["ratio"] >= TARGET_RATIO else "red")
        ax.set_xticks(range(len(rows)), [labeller(r) for r in rows], fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.set_ylabel("tokens/s (median, bars: quartiles)")
        ax.set_ylim(0, ax.get_ylim()[1] * 1.2)
    ax_train.legend(handles=[matplotlib.patches.Patch(color=colours["ours"], label="ours (hf_models)"),
                             matplotlib.patches.Patch(color=colours["twin"], label="twin (transformers)")],
                    fontsize=8, loc="upper left", ncols=2)
    size = result["size"]
    fig.suptitle(
        f"hf_models decoders vs transformers twins, {size['layers']}L/{size['heads']}H/{size['hidden']}, context "
        f"{size['context']}, batch {size['batch']} -- {result['machine']['cpu']}, {result['machine']['torch_threads']} threads, "
        f"{result['date']}\nnumbers: ours / twin tokens/s (red: below the {TARGET_RATIO} target)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- the run ----------------------------------------------------------------------------------


def main() -> None:
    (args,) = HfArgumentParser(DecodersBenchmarkArguments).parse_args_into_dataclasses()
    if min(args.rounds or 2, args.generation_rounds) < 2:
        raise SystemExit("--rounds and --generation_rounds must be at least 2 (the table reports quartiles)")
    machine = prepare_benchmark(args.threads)  # passive OpenMP waits, pinned threads, the machine printed
    output_dir = Path(args.output_dir)

    size = SIZES[args.size]
    rounds = args.rounds or size.rounds
    new_tokens = args.new_tokens or size.context - args.prompt_tokens
    started = time.perf_counter()
    result = {
        "benchmark": "decoders_vs_transformers",
        "date": datetime.date.today().isoformat(),
        "size_name": args.size,
        "size": asdict(size),
        "vocab_size": args.vocab_size,
        "rounds": rounds,
        "warmup_steps": args.warmup_steps,
        "machine": None,  # below, with the first matmul peak probe
        "flops_formula": "6 * N_non_embedding + 12 * layers * context * hidden FLOPs per trained token (PaLM app. B)",
        "target_ratio": TARGET_RATIO,
        "load_average": [os.getloadavg()[0]],
    }
    # Peak probes: at start, and before every training cell; MFU divides by the best one, so a probe
    # that ran while another process held a core does not inflate MFU.
    result["machine"] = machine.to_dict()
    peak_probes = {"fp32": [machine.matmul_peak_gflops["fp32"] * 1e9], "bf16-autocast": [machine.matmul_peak_gflops["bf16"] * 1e9]}
    result["peak_flops_at_start"] = {precision: probes[0] for precision, probes in peak_probes.items()}

    generator = torch.Generator().manual_seed(0)
    batch = torch.randint(0, args.vocab_size, (size.batch, size.context), generator=generator)
    prompt = torch.randint(0, args.vocab_size, (1, args.prompt_tokens), generator=generator)
    pairs = [build_pair(name, size, args.vocab_size) for name in MODELS]

    result["pairs"], result["generation"], result["training"] = [], [], []
    for name, (label, ours, twin) in zip(MODELS, pairs):
        models = {"ours": ours, "twin": twin}
        info = {"model": name, "label": label, "classes": {s: type(m).__name__ for s, m in models.items()}}
        info["parameters"] = {s: sum(p.numel() for p in m.parameters()) for s, m in models.items()}
        info["non_embedding_parameters"] = {s: non_embedding_params(m) for s, m in models.items()}
        info["flops_per_token"] = training_flops_per_token(ours, size)
        for attention in ATTENTIONS:
            for model in models.values():
                set_attention(model, attention)
            info[f"max_abs_logit_diff_{attention}"] = check_same_function(ours, twin, batch[:2])
        result["pairs"].append(info)
        print(f"{label}: {info['parameters']['ours']:,} parameters, logits match to {info['max_abs_logit_diff_sdpa']:.1e}", flush=True)

        # Generation first, on the freshly converted weights, so both sides decode the same tokens.
        for model in models.values():
            set_attention(model, "sdpa")
            model.eval()
        with torch.no_grad():
            outputs = {side: greedy_generate(m, prompt, new_tokens) for side, m in models.items()}  # also the warm-up
            calls = {side: (lambda m=m: greedy_generate(m, prompt, new_tokens)) for side, m in models.items()}
            row = summarise(time_interleaved(calls, rounds=args.generation_rounds, warmup=0), new_tokens)
        row.update(model=name, label=label, prompt_tokens=args.prompt_tokens, new_tokens=new_tokens,
                   same_tokens=bool(torch.equal(outputs["ours"], outputs["twin"])))
        result["generation"].append(row)
        print(f"  generation: ours {row['tokens_per_s']['ours']:.1f} tok/s, twin {row['tokens_per_s']['twin']:.1f} tok/s", flush=True)

        for attention in ATTENTIONS:
            for precision, dtype in PRECISIONS.items():
                peak_probes[precision].append(matmul_peak_flops(dtype or torch.float32))
                calls = {}
                for side, model in models.items():
                    set_attention(model, attention)
                    model.train()
                    optimizer = make_optimizer(model)
                    calls[side] = lambda m=model, o=optimizer: training_step(m, o, batch, dtype)
                row = summarise(time_interleaved(calls, rounds=rounds, warmup=args.warmup_steps), size.batch * size.context)
                row.update(model=name, label=label, attention=attention, precision=precision)
                row["flops_per_s"] = {side: tps * info["flops_per_token"] for side, tps in row["tokens_per_s"].items()}
                result["training"].append(row)
                print(
                    f"  train {attention:<5} {precision:<13}: ours {row['tokens_per_s']['ours']:.0f} tok/s, "
                    f"twin {row['tokens_per_s']['twin']:.0f} tok/s ({time.perf_counter() - started:.0f} s)",
                    flush=True,
                )
    result["peak_flops_probes"] = peak_probes
    result["peak_flops"] = {precision: max(probes) for precision, probes in peak_probes.items()}
    for row in result["training"]:
        row["mfu"] = {side: flops / result["peak_flops"][row["precision"]] for side, flops in row["flops_per_s"].items()}
    del pairs, models, ours, twin, calls
    gc.collect()

    if not args.skip_memory:
        print("measuring step memory, one process per cell ...", flush=True)
        jobs = [(r["model"], side, r["attention"], r["precision"], size, args.vocab_size) for r in result["training"] for side in SIDES]
        measurements = iter(measure_all_step_memory(jobs))
        for row in result["training"]:
            row["step_peak_mib"] = {}
            for side in SIDES:
                measured = next(measurements)
                row["step_peak_mib"][side] = measured["step_peak_mib"]
                row.setdefault("rss_before_step_mib", {})[side] = measured["rss_before_mib"]
                method = measured["method"]
        result["memory_method"] = (
            f"peak RSS of one training step above the RSS just before it ({method}); fresh forkserver process "
            f"per cell, glibc mmap threshold 64 KiB, after one untimed step"
        )

    result["total_seconds"] = time.perf_counter() - started
    result["load_average"].append(os.getloadavg()[0])
    print_tables(result)
    stem = f"decoders_vs_transformers_{args.size}_v{args.vocab_size}"
    write_json_atomically(output_dir / f"{stem}.json", result)
    plot(result, output_dir / f"{stem}.png")
    print(f"\nwrote {output_dir / stem}.json and .png in {result['total_seconds']:.0f} s")


if __name__ == "__main__":
    main()
