"""The zoo's numbers, generated from its runs: the README's lesson table and plot, and each lesson page's blocks.

No number in the README's lesson table or in a lesson page (``docs/lessons/NN_name.md``) is typed: ``make
lessons`` runs every recipe with its defaults and then this script, which reads ``runs/<lesson>/results.json``
and rewrites what lies between markers:

* ``README.md``, between ``<!-- leaderboard:start -->`` and ``<!-- leaderboard:end -->``: the lesson table, one
  row per lesson, its lesson column linking the lesson's page; and ``docs/figures/leaderboard.png``;
* each lesson page, between ``<!-- results:start -->`` and ``<!-- results:end -->``: the lesson's headline
  metrics (bits per byte, loss, perplexity, parameters, tokens/s) and what its recipe measures besides
  (lesson 1's counting gap, lesson 8's task scores, lesson 12's ablation table, ...);
* each lesson page, between ``<!-- scaling:start -->`` and ``<!-- scaling:end -->``: the lesson's CPU model
  beside a frontier model (``hf_models.experiments.scaling``), computed from the saved model's
  ``config.json``, or from the recipe's defaults where no model is saved.

A lesson with no ``results.json`` keeps what is committed: its README row (marked †; a lesson never run
has dashes) and its page's results block. ``--check`` rewrites nothing: it exits 1 when a generated part
differs from what the runs give, and lists the lessons it could not check for want of a run. ::

    python -m hf_models.experiments.leaderboard            # runs/ -> README.md, docs/figures/leaderboard.png, docs/lessons/*.md
    python -m hf_models.experiments.leaderboard --check    # exit 1 if any of them is not what runs/ gives
"""

from __future__ import annotations

import ast
import dataclasses
import json
import math
import os
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

START, END = "<!-- leaderboard:start -->", "<!-- leaderboard:end -->"
RESULTS_START, RESULTS_END = "<!-- results:start -->", "<!-- results:end -->"
SCALING_START, SCALING_END = "<!-- scaling:start -->", "<!-- scaling:end -->"
KEPT = "†"  # marks a README row kept from the committed table: no results.json where the table was generated
REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Lesson:
    number: int
    title: str
    run: str  # runs/<run>/, recipes/<run>.py and docs/lessons/<run>.md
    teaches: str
    note: str = ""  # what the number means, where it is not plain language modelling
    frontier: str = "gpt2-xl"  # the frontier model of its scaling note (a key of scaling.FRONTIER_CONFIGS)
    model_of: str = ""  # the lesson whose model this lesson works on, where it trains none of its own
    compare: tuple[int, ...] = ()  # earlier lessons whose test bits per byte its page sets beside its own


LESSONS = (
    Lesson(1, "bigram", "01_bigram", "a logits table; gradient descent finds the counting solution"),
    Lesson(2, "BPE + n-gram MLP", "02_ngram_mlp", "hand-written byte-level BPE; Bengio et al. 2003", compare=(1,)),
    Lesson(3, "GRU", "03_gru", "recurrence; hand-written GRU cells = `torch.nn.GRU`", compare=(2,)),
    Lesson(4, "GPT decoder", "04_gpt", "attention; = `GPT2LMHeadModel`; nanoGPT parity", compare=(3,)),
    Lesson(5, "modern decoder", "05_modern_gpt", "RMSNorm, SwiGLU, RoPE, GQA; = `LlamaForCausalLM`",
           frontier="llama-2-7b", compare=(4, 3)),
    Lesson(6, "KV cache", "06_kv_cache", "hand-written growing and static caches vs `DynamicCache` / `StaticCache`",
           "generation speed only; see its page", frontier="llama-3-8b", model_of="05_modern_gpt"),
    Lesson(7, "training engineering", "07_training", "the loop `Trainer` hides; warm-up, cosine, accumulation, bf16, resume, DDP, FSDP",
           compare=(4, 3, 5)),
    Lesson(8, "LoRA SFT", "08_lora_sft", "hand LoRA = peft; instruction data, chat template; trl `SFTTrainer`",
           "fine-tuned for a task: free text gets worse; the task scores are on its page", frontier="llama-2-7b", model_of="05_modern_gpt"),
    Lesson(9, "INT8 quantization", "09_quantization", "weight-only, LLM.int8(), W8A8 by hand; bitsandbytes; GGUF",
           "lesson 5's model, hand int8 weight-only; no training", frontier="llama-2-7b", model_of="05_modern_gpt"),
    Lesson(10, "mixture of experts", "10_moe", "top-k router, grouped dispatch, balancing loss; = `MixtralForCausalLM`",
           frontier="mixtral-8x7b"),
    Lesson(11, "DPO", "11_dpo", "hand DPO loss = trl `DPOTrainer`; preference pairs",
           "aligned for a preference: free text gets worse; the preference accuracy is on its page", frontier="llama-2-7b",
           model_of="05_modern_gpt"),
    Lesson(12, "ablations", "12_ablations", "configurable decoder; grids of configs x seeds; noise-aware tables",
           "best cell of the default grid, mean over seeds (a small budget for comparing cells, not for a model); "
           "validation only, since cells are chosen on it", frontier="llama-3-8b"),
)
BY_NUMBER = {lesson.number: lesson for lesson in LESSONS}


# --- the README's lesson table ---------------------------------------------------------------------------------


def lesson_row(lesson: Lesson, results: dict | None) -> dict:
    """The numbers of one lesson's row: held-out metrics, parameters and training tokens/s (None where the run has none)."""
    row = dict(lesson=lesson, validation=None, test=None, parameters=None, tokens_per_second=None, kept=False)
    if results is None:
        return row
    if lesson.run == "09_quantization":  # no training: the held-out numbers of the saved int8 model, per variant
        variant = results.get("results", {}).get("hand int8 weight-only", {})
        row[results.get("split", "test")] = variant.get("held_out")  # parameters: its fp32 model_folder's, as for any run
        return row
    row["validation"], row["test"] = results.get("validation"), results.get("test")
    row["parameters"] = results.get("parameters")
    row["tokens_per_second"] = results.get("train_tokens_per_second")
    if row["tokens_per_second"] is None and isinstance(results.get("tokens_per_second"), dict):
        # The fine-tuning lessons time the hand-written path and the library's side by side: the lesson's is the hand one.
        row["tokens_per_second"] = next((v for k, v in results["tokens_per_second"].items() if k.startswith("hand") and "over" not in k), None)
    return row


def resolve(folder: str | None, runs: Path) -> Path | None:
    """A folder a results.json names: as written when absolute, else relative to where the recipes ran (runs/'s parent)."""
    if not folder:
        return None
    path = Path(folder)
    return path if path.is_absolute() or not (runs.parent / path).exists() else runs.parent / path


def saved_parameters(folder: Path | None) -> int | None:
    """Parameters of a saved model folder, read from its safetensors header (tied weights are stored once)."""
    path = Path(folder or "") / "model.safetensors"
    if not folder or not path.is_file():
        return None
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as weights:
        return sum(math.prod(weights.get_slice(name).get_shape()) for name in weights.keys())


def read_results(runs: Path) -> dict[str, dict | None]:
    """Every lesson's results.json (None where there is none), by run name."""
    results = {}
    for lesson in LESSONS:
        path = runs / lesson.run / "results.json"
        results[lesson.run] = json.loads(path.read_text()) if path.is_file() else None
    return results


def read_rows(runs: Path, results: dict[str, dict | None] | None = None, committed: dict[int, dict] | None = None) -> list[dict]:
    """One row per lesson: from its results.json; without one, the committed table's row (``kept``), else dashes."""
    results = read_results(runs) if results is None else results
    rows = []
    for lesson in LESSONS:
        row = lesson_row(lesson, results[lesson.run])
        if results[lesson.run] is not None and row["parameters"] is None:
            row["parameters"] = saved_parameters(resolve(results[lesson.run].get("model_folder"), runs))
        if results[lesson.run] is None and (committed or {}).get(lesson.number):
            row.update(committed[lesson.number], kept=True)
        rows.append(row)
    return rows


def _number(value, fmt: str) -> str:
    return "—" if value is None else format(value, fmt)


def _parse(cell: str) -> float | None:
    cell = cell.strip()
    return None if cell in ("—", "-", "") else float(cell.replace(",", ""))


def committed_rows(table: str) -> dict[int, dict]:
    """The numbers of each row of a committed lesson table, by lesson number (the last six columns)."""
    rows = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 7 or not cells[0].isdigit():
            continue
        parameters, speed, val_bpb, test_bpb, test_loss, test_ppl = (_parse(c) for c in cells[-6:])
        if all(v is None for v in (parameters, speed, val_bpb, test_bpb)):
            continue  # a row of dashes: nothing to keep
        test = {k: v for k, v in dict(bits_per_byte=test_bpb, loss=test_loss, perplexity=test_ppl).items() if v is not None}
        rows[int(cells[0])] = dict(
            parameters=None if parameters is None else int(parameters), tokens_per_second=speed,
            validation=None if val_bpb is None else {"bits_per_byte": val_bpb}, test=test or None,
        )
    return rows


def markdown_table(rows: list[dict], lessons_link: str = "docs/lessons") -> str:
    lines = [
        "| # | lesson | recipe | what it teaches | parameters | train tokens/s | val bits/byte | test bits/byte | test loss | test perplexity |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    notes = []
    for row in rows:
        lesson = row["lesson"]
        validation, test = row["validation"] or {}, row["test"] or {}
        marker = ""
        if lesson.note:
            notes.append(lesson.note)
            marker = f" ⁽{len(notes)}⁾"
        if row["kept"]:
            marker += f" {KEPT}"
        lines.append(
            f"| {lesson.number} | [{lesson.title}]({lessons_link}/{lesson.run}.md){marker} | [`recipes/{lesson.run}.py`](recipes/{lesson.run}.py) | "
            f"{lesson.teaches} | {_number(row['parameters'], ',')} | {_number(row['tokens_per_second'], ',.0f')} | "
            f"{_number(validation.get('bits_per_byte'), '.4f')} | {_number(test.get('bits_per_byte'), '.4f')} | "
            f"{_number(test.get('loss'), '.4f')} | {_number(test.get('perplexity'), '.2f')} |"
        )
    lines.append("")
    lines += [f"⁽{i}⁾ {note}.  " for i, note in enumerate(notes, 1)]
    if any(row["kept"] for row in rows):
        lines.append(f"{KEPT} no `runs/<lesson>/results.json` where this table was generated: the row is the committed one.  ")
    return "\n".join(lines).rstrip() + "\n"


def plot(rows: list[dict], path: Path) -> Path:
    """Held-out bits per byte by lesson: test where the lesson measured it, else validation (hatched)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = [(r, (r["test"] or r["validation"])["bits_per_byte"], r["test"] is None) for r in rows if r["test"] or r["validation"]]
    figure, ax = plt.subplots(figsize=(8, 0.45 * max(4, len(measured)) + 1))
    labels = [f"{r['lesson'].number}. {r['lesson'].title}" for r, _, _ in measured]
    for y, (row, value, validation_only) in enumerate(measured):
        bar = ax.barh(y, value, color="tab:orange" if validation_only else "tab:blue", hatch="//" if validation_only else None)
        ax.bar_label(bar, labels=[f"{value:.3f}"], fontsize=8, padding=3)
    ax.set_yticks(range(len(measured)), labels, fontsize=8)
    ax.invert_yaxis()  # lesson 1 on top
    ax.set_xlabel("held-out bits per byte (lower is better)")
    ax.set_title("The zoo by lesson: test plays (blue), validation only (orange, hatched)", fontsize=10)
    if measured:
        ax.set_xlim(min(v for _, v, _ in measured) * 0.85, max(v for _, v, _ in measured) * 1.06)
    ax.grid(True, axis="x", alpha=0.3)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def between(text: str, start: str, end: str, source: str) -> str:
    """What lies between the one ``start`` ... ``end`` pair of ``text`` (the block's committed content)."""
    if text.count(start) != 1 or text.count(end) != 1 or text.index(start) > text.index(end):
        raise ValueError(f"{source} must hold exactly one {start} ... {end} pair.")
    return text.split(start)[1].split(end)[0].removeprefix("\n")


def replace_between_markers(text: str, content: str, source: str, start: str = START, end: str = END) -> str:
    """``text`` with the block between its one ``start`` ... ``end`` pair replaced by ``content``."""
    between(text, start, end, source)
    head, rest = text.split(start)
    _, tail = rest.split(end)
    return f"{head}{start}\n{content}{end}{tail}"


# --- the lesson pages' results blocks ----------------------------------------------------------------------------


def _f(value, fmt: str) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, fmt)


def _band(ratio: dict | None, fmt: str = ".2f") -> str:
    """A paired ratio from the benchmark timer: median (q1–q3)."""
    if not ratio:
        return "—"
    return f"{ratio['median']:{fmt}}× ({ratio['q1']:{fmt}}–{ratio['q3']:{fmt}})"


def _mib(n: float) -> str:
    return f"{n / 2**20:.3f}"


def headline(results: dict, row: dict) -> list[str]:
    """The held-out metrics every language-modelling lesson writes, and its size and speed (as in its table row)."""
    splits = [s for s in ("validation", "test") if isinstance(results.get(s), dict)]
    lines = []
    if splits:
        lines += ["| held-out split | bits per byte | loss (nats per token) | perplexity | tokens scored |", "|---|---:|---:|---:|---:|"]
        for split in splits:
            m = results[split]
            lines.append(f"| {split} | {_f(m.get('bits_per_byte'), '.4f')} | {_f(m.get('loss'), '.4f')} | "
                         f"{_f(m.get('perplexity'), '.2f')} | {_f(m.get('tokens'), ',.0f')} |")
        lines.append("")
    facts = []
    if row["parameters"] and splits:
        facts.append(f"{row['parameters']:,} parameters")
    if results.get("train_steps"):
        facts.append(f"{results['train_steps']:,} training steps")
    if row["tokens_per_second"]:
        facts.append(f"{row['tokens_per_second']:,.0f} training tokens/s")
    batch = (results.get("training") or {}).get("batch")
    if batch:
        facts.append(f"batches of {batch}")
    limit = (results.get("data") or {}).get("max_eval_tokens")
    if limit and splits:
        facts.append(f"held-out splits scored on their first {limit:,} tokens")
    if facts:
        sentence = "; ".join(facts)
        lines += [sentence[0].upper() + sentence[1:] + ".", ""]
    return lines


def beside(lesson: Lesson, results: dict, rows: dict[int, dict]) -> list[str]:
    """This lesson's test bits per byte beside earlier lessons' (from the lesson table's rows)."""
    if not lesson.compare:
        return []
    ours = (results.get("test") or {}).get("bits_per_byte")
    lines = ["| beside | parameters | test bits per byte | this lesson minus it | this lesson is |", "|---|---:|---:|---:|---|",
             f"| this lesson | {_f(rows[lesson.number]['parameters'], ',')} | {_f(ours, '.4f')} | — | — |"]
    kept = False
    for number in lesson.compare:
        row = rows[number]
        theirs = (row["test"] or {}).get("bits_per_byte")
        delta = "—" if ours is None or theirs is None else f"{ours - theirs:+.4f}"
        verdict = "—" if ours is None or theirs is None else "better" if ours < theirs else "worse" if ours > theirs else "level"
        mark = f" {KEPT}" if row["kept"] else ""
        kept |= row["kept"]
        lines.append(f"| lesson {number} ({BY_NUMBER[number].title}){mark} | {_f(row['parameters'], ',')} | {_f(theirs, '.4f')} | "
                     f"{delta} | {verdict} |")
    if kept:
        lines += ["", f"{KEPT} from the README's committed row: that lesson had no `results.json` where this page was generated."]
    return lines + [""]


def bigram_details(results: dict) -> list[str]:
    learned = (results.get("validation") or {}).get("loss")
    counted = results.get("counted_validation_loss")
    if counted is None or learned is None:
        return []
    return ["| validation loss (nats per character) | |", "|---|---:|",
            f"| learned by AdamW | {learned:.4f} |", f"| counted, add-one smoothing | {counted:.4f} |",
            f"| learned minus counted | {learned - counted:+.4f} |", ""]


def ngram_details(results: dict) -> list[str]:
    seconds = results.get("bpe_training_seconds")
    return [f"The hand-written BPE trainer learned the vocabulary in {seconds:.1f} s.", ""] if seconds is not None else []


def kv_cache_details(results: dict) -> list[str]:
    a, rows = results.get("arguments", {}), results.get("results", {})
    lines = [f"Greedy decoding of {a.get('total_tokens', '?')} tokens from a {a.get('prompt_tokens', '?')}-token prompt, batch "
             f"{a.get('batch_size', '?')}, {a.get('threads', '?')} thread(s), {a.get('rounds', '?')} interleaved rounds; "
             "speed-ups are paired ratios, median (q1–q3).", "",
             "| generation | tokens/s | speed-up over no cache | speed-up over `DynamicCache` | same tokens as no cache |",
             "|---|---:|---:|---:|:---:|"]
    for name, row in sorted(rows.items(), key=lambda item: item[0] != "no cache"):
        label = name if name == "no cache" else ", ".join([f"`{name.split(', ')[0]}`", *name.split(", ")[1:]])  # `StaticKVCache`, compiled
        lines.append(f"| {label} | {row['tokens_per_second']:,.0f} | {_band(row.get('speedup_vs_no_cache'))} | "
                     f"{_band(row.get('speedup_vs_dynamic_cache'))} | {'yes' if row.get('same_tokens') else 'no'} |")
    memory = results.get("kv_cache_memory")
    if memory:
        lines += ["", f"KV cache of this model in fp32: {memory['bytes_per_token']:,} bytes per token, {memory['bytes_per_sequence']:,} "
                  f"for one {a.get('total_tokens', '?')}-token sequence; without grouped-query attention "
                  f"{memory['bytes_per_sequence_without_gqa']:,}."]
    return lines + [""]


def training_details(results: dict) -> list[str]:
    lines = []
    compare = results.get("hand_loop_vs_trainer")
    if compare:
        lines += [f"**The hand loop against `Trainer`** ({len(compare['steps'])} logged steps, same data, init, optimizer and schedule): "
                  f"largest loss difference {compare['max_abs_difference']:.1e} nats (tolerance {compare['tolerance']:g}); "
                  f"{compare['hand_loop_tokens_per_second']:,.0f} against {compare['trainer_tokens_per_second']:,.0f} tokens/s, "
                  f"{compare['throughput_ratio']:.2f}× in one run.", ""]
    tricks = results.get("tricks")
    if tricks:
        peaks = (results.get("machine") or {}).get("matmul_peak_gflops") or {}
        peak = f"; this CPU's measured matmul peaks: {peaks['fp32']:.0f} GFLOP/s fp32, {peaks['bf16']:.0f} bf16" if peaks else ""
        lines += [f"**What each trick buys**, at {tricks['token_budget']:,} training tokens per run{peak}:", "",
                  "| run | validation bits per byte | tokens/s | activations saved for backward (MiB) |", "|---|---:|---:|---:|"]
        for name, row in sorted(tricks["rows"].items(), key=lambda item: _order(item[0], TRICKS)):
            lines.append(f"| {name} | {row['validation_bits_per_byte']:.4f} | {row['tokens_per_second']:,.0f} | {row['activation_mib']:.1f} |")
        lines.append("")
    if results.get("train_minutes") is not None:
        lines += [f"**The tuned GPT** (this lesson's saved model) trained {results.get('train_steps', 0):,} steps in "
                  f"{results['train_minutes']:.1f} minutes."]
        if results.get("beats_gru") is not None:
            lines[-1] += (f" It {'beats' if results['beats_gru'] else 'does not beat'} the recipe's reference for lesson 3's GRU, "
                          f"{results['gru_test_bits_per_byte']} test bits per byte.")
        lines.append("")
    return lines


def table_details(results: dict) -> list[str]:
    """Lessons 8 and 11 write their comparison table into results.json themselves."""
    return [results["table"], ""] if results.get("table") else []


def lora_details(results: dict) -> list[str]:
    lines = table_details(results)
    speed = results.get("tokens_per_second") or {}
    if "hand_over_trl" in speed:
        lines += [f"Training tokens/s, hand-written path over trl + peft: {speed['hand_over_trl']:.2f}× (two runs, one after the other).", ""]
    return lines


# results.json files are written with sorted keys: the tables put their rows back in the recipes' order.
VARIANTS = ("fp32", "bf16", "hand int8 weight-only", "hand LLM.int8()", "hand W8A8", "bitsandbytes int8", "bitsandbytes NF4")
TRICKS = ("constant lr, no warm-up", "warm-up + cosine", "4x batch (accumulation)", "bf16 autocast", "activation checkpointing")


def _order(name: str, order: tuple[str, ...]) -> tuple[int, str]:
    """``name``'s place in a recipe's ``order``; names it does not list come last, alphabetically."""
    return (order.index(name) if name in order else len(order), name)


def _variant_order(name: str) -> tuple[int, str]:
    return _order(name, VARIANTS)


def quantization_details(results: dict) -> list[str]:
    variants = results.get("results", {})
    fp32 = variants.get("fp32")
    if not fp32:
        return []
    lines = ["| variant | linear weights MiB (× fp32) | model MiB | perplexity (change) | bits per byte (change) | "
             "speed, batch 1 | speed, batch 8 | greedy tokens = fp32 |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, v in sorted(variants.items(), key=lambda item: _variant_order(item[0])):
        lines.append(
            f"| {name} | {_mib(v['linear_weight_bytes'])} ({v['linear_weight_bytes'] / fp32['linear_weight_bytes']:.2f}) | "
            f"{_mib(v['model_bytes'])} | {v['perplexity']:.3f} ({v['perplexity'] / fp32['perplexity'] - 1:+.2%}) | "
            f"{v['bits_per_byte']:.4f} ({v['bits_per_byte'] - fp32['bits_per_byte']:+.4f}) | {_band(v.get('speed_vs_fp32_batch1'))} | "
            f"{_band(v.get('speed_vs_fp32_batch8'))} | {v['greedy_agreement']:.1%} |"
        )
    a = results.get("arguments", {})
    lines += ["", f"Speed: fp32's time over the variant's for {a.get('new_tokens', '?')} greedy tokens, median (q1–q3) of "
              f"{a.get('rounds', '?')} interleaved rounds, {a.get('threads', '?')} thread(s); above 1 is faster than fp32. Greedy "
              f"agreement over {a.get('prompts', '?')} held-out prompts.", ""]
    llama = results.get("llama_cpp_q8_0")
    if isinstance(llama, dict):
        lines += ["llama.cpp Q8_0 (GGUF): " + ", ".join(f"{k.replace('_', ' ')} {v:,.4g}" if isinstance(v, (int, float)) else f"{k.replace('_', ' ')} {v}"
                                                   for k, v in llama.items()) + ".", ""]
    elif llama:
        lines += [f"llama.cpp Q8_0: not measured in this run ({llama.rstrip('.')}).", ""]
    layer = results.get("single_layer_speed_vs_fp32")
    if layer:
        tokens = sorted(layer, key=int)
        names = sorted(layer[tokens[0]], key=_variant_order)
        lines += [f"Int8 *compute*: one {a.get('layer_width', '?')} × {a.get('layer_width', '?')} linear layer, speed against fp32 "
                  f"(median, q1–q3):", "", "| variant | " + " | ".join(f"{t} token{'s' * (t != '1')}" for t in tokens) + " |",
                  "|---|" + "---:|" * len(tokens)]
        lines += [f"| {name} | " + " | ".join(_band(layer[t].get(name)) for t in tokens) + " |" for name in names]
        lines.append("")
    outliers = results.get("outliers") or {}
    worst = max((outliers.get("layers") or {}).items(), key=lambda kv: kv[1]["max_abs_activation"], default=None)
    injected = outliers.get("injected")
    if worst or injected:
        lines += ["The outliers: relative error of the layer's output with int8 activations.", "",
                  "| layer input | largest abs activation | features ≥ threshold | per-token absmax int8 | LLM.int8() |",
                  "|---|---:|---:|---:|---:|"]
        if worst:
            name, o = worst
            lines.append(f"| `{name}` (this model's largest) | {o['max_abs_activation']:.1f} | {o['outlier_features']} | "
                         f"{o['absmax_int8']:.4f} | {o['llm_int8']:.4f} |")
        if injected:
            lines.append(f"| `{injected['layer']}` with {len(injected['features'])} features scaled up, as in a large model | "
                         f"{injected['max_abs_activation']:.1f} | {injected['outlier_features']} | {injected['absmax_int8']:.4f} | "
                         f"{injected['llm_int8']:.4f} |")
        lines.append("")
    return lines


def moe_details(results: dict) -> list[str]:
    runs = results.get("runs")
    if not runs:
        return []
    lines = ["| run | parameters | active per token | val bits/byte | test bits/byte | training tokens/s | busiest expert / fair share, per layer |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for name, r in sorted(runs.items(), key=lambda item: item[0] != "dense"):
        load = ", ".join(f"{x:.2f}" for x in r["final_imbalance"]) if r.get("final_imbalance") else "—"
        lines.append(f"| {name} | {r['parameters']:,} | {r['active_parameters']:,} | {r['validation']['bits_per_byte']:.4f} | "
                     f"{r['test']['bits_per_byte']:.4f} | {r['train_tokens_per_second']:,.0f} | {load} |")
    lines.append("")
    moe, dense = runs.get("MoE + balancing loss", {}).get("losses"), runs.get("dense", {}).get("losses")
    if moe and dense:
        steps = sorted(int(step) for step in set(moe) & set(dense))
        ahead = [step for step in steps if moe[str(step)] < dense[str(step)]]
        lines += [f"Training loss, MoE + balancing loss against dense: lower at {len(ahead)} of {len(steps)} logged steps"
                  + (f", the last at step {ahead[-1]}." if ahead else "."), ""]
    if results.get("token_budget"):
        lines += [f"Each run trained on the same {results['token_budget']:,} tokens in the same order."]
        if results.get("moe_beats_dense") is not None:
            lines[-1] += (f" At this budget the MoE {'beats' if results['moe_beats_dense'] else 'does not beat'} the dense model "
                          "of equal active parameters.")
        lines.append("")
    timing = results.get("training_step_timing")
    if timing:
        speed = timing["tokens_per_second"]
        kernel = f"; transformers' Mixtral ran its experts with `{timing['mixtral_experts_implementation']}`" \
            if timing.get("mixtral_experts_implementation") else ""
        lines += [f"One training step ({timing.get('precision', '')}{kernel}), interleaved: " +
                  ", ".join(f"{name} {value:,.0f} tokens/s" for name, value in speed.items()) +
                  f"; MoE over Mixtral {_band(timing['moe_vs_mixtral'])}, MoE over dense {_band(timing['moe_vs_dense'])}.", ""]
    return lines


def dpo_details(results: dict) -> list[str]:
    lines = table_details(results)
    step, settings = results.get("interleaved_step"), results.get("settings") or {}
    if settings:
        lines += [f"{settings['steps']} steps × {settings['pairs_per_step']} pairs, β {settings['beta']}, label smoothing "
                  f"{settings['label_smoothing']}.", ""]
    if results.get("curves_max_margin_difference") is not None:
        lines += [f"Held-out reward-margin curves of the two trainers: largest difference {results['curves_max_margin_difference']:.1e}.", ""]
    if step:
        lines += [f"One optimizer step of each, interleaved: hand loop over `DPOTrainer` {_band(step['hand_over_trl'])} tokens/s.", ""]
    return lines


def ablation_details(results: dict, run_folder: Path) -> list[str]:
    lines = []
    if results.get("question"):
        lines += [f"The grid (`{Path(results.get('grid', '')).name}`) asks: *{results['question']}* Seeds {results.get('seeds')}; "
                  f"{results.get('token_budget', 0):,} training tokens per cell; validation only, mean over seeds.", ""]
    table = run_folder / "results.md"  # the recipe's own table of its rows (hf_models.experiments.ablation.write_tables)
    if table.is_file():
        lines += [table.read_text().strip(), ""]
    rows = results.get("rows") or []
    if rows:
        def named(selected: list[dict]) -> str:
            return ", ".join(f"{r['cell']} ({'lower' if r['delta_bpb'] < 0 else 'higher'})" for r in selected) or "none"

        beyond = [r for r in rows[1:] if r.get("beyond_noise")]
        within = [r["cell"] for r in rows[1:] if not r.get("beyond_noise")]
        lines += [f"Against the baseline ({rows[0]['cell']}), larger than the seed noise: {named(beyond)}; within it: "
                  f"{', '.join(within) or 'none'}.", ""]
    if results.get("best_cell"):
        lines += [f"Best cell: {results['best_cell']} (its mean is the headline above).", ""]
    return lines


DETAILS: dict[str, Callable[[dict], list[str]]] = {
    "01_bigram": bigram_details, "02_ngram_mlp": ngram_details, "06_kv_cache": kv_cache_details, "07_training": training_details,
    "08_lora_sft": lora_details, "09_quantization": quantization_details, "10_moe": moe_details, "11_dpo": dpo_details,
}


def results_block(lesson: Lesson, results: dict, runs: Path, rows: dict[int, dict]) -> str:
    """The generated part of a lesson page: its run's numbers, as Markdown."""
    source = runs / lesson.run / "results.json"
    lines = [f"*Generated from `{source}` by `python -m hf_models.experiments.leaderboard`; edits here are overwritten.*", ""]
    lines += headline(results, rows[lesson.number])
    if lesson.run == "12_ablations":
        lines += ablation_details(results, runs / lesson.run)
    elif lesson.run in DETAILS:
        lines += DETAILS[lesson.run](results)
    lines += beside(lesson, results, rows)
    return "\n".join(lines).rstrip() + "\n"


# --- the lesson pages' scaling blocks -------------------------------------------------------------------------


def recipe_defaults(recipe: Path) -> tuple[Any, dict]:
    """The lesson arguments a recipe runs with by default (its own dataclass) and its ``parse_lesson_args`` defaults.

    Read from the recipe's source, not by running it: its imports, its dataclass definitions and its upper-case
    constants are executed, then the arguments of its ``parse_lesson_args(...)`` call are evaluated. So the
    numbers are the ones ``python recipes/<lesson>.py --help`` shows.
    """
    tree = ast.parse(recipe.read_text(), str(recipe))
    module = types.ModuleType(f"_recipe_defaults_{recipe.stem}")  # dataclasses look their module up in sys.modules
    module.__file__ = str(recipe)
    namespace = module.__dict__
    sys.modules[module.__name__] = module
    try:
        for node in tree.body:
            constant = isinstance(node, ast.Assign) and all(isinstance(t, ast.Name) and t.id.isupper() for t in node.targets)
            if isinstance(node, (ast.Import, ast.ImportFrom, ast.ClassDef)) or constant:
                exec(compile(ast.Module([node], type_ignores=[]), str(recipe), "exec"), namespace)
    finally:
        del sys.modules[module.__name__]
    call = next((n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "parse_lesson_args"), None)
    if call is None:
        raise ValueError(f"{recipe} has no parse_lesson_args(...) call to read its defaults from.")
    arguments = eval(compile(ast.Expression(call.args[0]), str(recipe), "eval"), namespace)()
    defaults = next((k.value for k in call.keywords if k.arg == "defaults"), None)
    try:
        defaults = {} if defaults is None else eval(compile(ast.Expression(defaults), str(recipe), "eval"), namespace)
    except NameError:  # defaults built from something read at run time (lesson 12's grid): the constants alone
        defaults = {}
    return arguments, defaults


def default_model(lesson: Lesson, recipes: Path) -> tuple[Any, str]:
    """The model config a lesson's recipe builds with its defaults, and the model's name, without running the recipe.

    The fields of the recipe's arguments that the config class takes, plus what the recipe's code sets:
    decoders take their context from ``block_size``, the MoE its experts' width. The vocabulary is the
    BPE's ``vocab_size``; lesson 1's character vocabulary depends on the corpus, so its config keeps the
    class default. Lesson 12's model is the last cell of its default grid (all the changes together).
    """
    import inspect

    import hf_models

    arguments, defaults = recipe_defaults(recipes / f"{lesson.run}.py")
    if lesson.run == "12_ablations":
        from hf_models.experiments.grid import load_grid

        grid = load_grid(arguments.grid)
        cell = list(grid.cells)[-1]
        return grid.cell_config(cell, vocab_size=arguments.vocab_size, max_position_embeddings=grid.training.get("block_size", 128)), cell
    classes = {"01_bigram": "BigramConfig", "02_ngram_mlp": "NGramMLPConfig", "03_gru": "GRULMConfig", "04_gpt": "GPTConfig",
               "05_modern_gpt": "ModernDecoderConfig", "07_training": "GPTConfig", "10_moe": "MoEDecoderConfig"}
    config_class = getattr(hf_models, classes[lesson.run])
    accepted = inspect.signature(config_class.__init__).parameters
    fields = {k: v for k, v in dataclasses.asdict(arguments).items() if k in accepted}
    if "num_attention_heads" in accepted:
        fields["max_position_embeddings"] = defaults.get("block_size", 128)
    if hasattr(arguments, "expert_intermediate_size"):
        fields["intermediate_size"] = arguments.expert_intermediate_size
    return config_class(**fields), defaults.get("model_name") or lesson.run


def model_source(lesson: Lesson, results: dict[str, dict | None], runs: Path) -> tuple[str, Path | None]:
    """The run whose model a lesson's scaling note describes, and that model's saved folder (None: not saved here)."""
    run = lesson.model_of or lesson.run
    own = results.get(lesson.run) or {}
    folder = own.get("model_folder") or (own.get("arguments") or {}).get("model_folder")
    if folder is None and lesson.model_of:
        folder = (results.get(lesson.model_of) or {}).get("model_folder")
    path = resolve(folder, runs)
    return run, path if path is not None and (path / "config.json").is_file() else None


def best_cell_settings(run_folder: Path, results: dict | None) -> tuple[Path, dict] | None:
    """Lesson 12's best cell's recorded settings (its model config among them), from its first seed's folder."""
    from hf_models.experiments.ablation import CELL_FILE, cell_folder

    if not results or not results.get("best_cell") or not results.get("seeds"):
        return None
    path = cell_folder(run_folder, results["best_cell"], results["seeds"][0]) / CELL_FILE
    return (path, json.loads(path.read_text())) if path.is_file() else None


def scaling_block(lesson: Lesson, results: dict[str, dict | None], runs: Path, recipes: Path) -> str:
    """The lesson's CPU model beside its frontier model, computed from the model's config."""
    from transformers import AutoConfig

    import hf_models  # noqa: F401  (registers the zoo's model types with AutoConfig)
    from hf_models.experiments.scaling import scaling_note

    run, folder = model_source(lesson, results, runs)
    cell = best_cell_settings(runs / lesson.run, results.get(lesson.run)) if lesson.run == "12_ablations" else None
    if cell is not None:  # lesson 12 saves no model: its best cell's config, as the cell's folder recorded it
        path, settings = cell
        model = dict(settings["model"])
        config, name = AutoConfig.for_model(model.pop("model_type"), **model), settings["cell"]
        source = f"`{path}`, the best cell's settings"
    elif folder is not None:
        config, name = AutoConfig.from_pretrained(folder), folder.name
        source = f"`{folder / 'config.json'}`"
    else:
        config, name = default_model(BY_NUMBER[int(run[:2])], recipes)
        source = f"the defaults of `recipes/{run}.py` (no saved model here)"
    lines = [f"*Computed by `hf_models.experiments.scaling` from {source}; edits here are overwritten.*", "",
             scaling_note(config, lesson.frontier, name=name).rstrip(), ""]
    return "\n".join(lines)


# --- the command -------------------------------------------------------------------------------------------------


@dataclass
class LeaderboardArguments:
    runs: str = field(default="runs", metadata={"help": "The folder the recipes wrote (runs/<lesson>/results.json)."})
    readme: str = field(default="README.md", metadata={"help": "The README whose lesson table is rewritten, between its markers."})
    plot: str = field(default="docs/figures/leaderboard.png", metadata={"help": "Where the plot of bits per byte by lesson goes."})
    lessons_dir: str | None = field(
        default=None, metadata={"help": "The lesson pages (docs/lessons/NN_name.md) whose blocks are rewritten; default: "
                                "docs/lessons next to the README, skipped if that folder does not exist."})
    recipes: str = field(default=str(REPO / "recipes"), metadata={"help": "The recipes, read for their default model configs."})
    check: bool = field(default=False, metadata={"help": "Rewrite nothing; exit 1 if the README or a lesson page is not what the runs give."})


def update_pages(lessons_dir: Path, runs: Path, recipes: Path, results: dict[str, dict | None], rows: list[dict]) -> tuple[dict[Path, str], list[str]]:
    """Each lesson page with its blocks filled in, and the problems met (a block that could not be computed is kept)."""
    by_number = {row["lesson"].number: row for row in rows}
    pages, problems = {}, []
    for lesson in LESSONS:
        page = lessons_dir / f"{lesson.run}.md"
        if not page.is_file():
            problems.append(f"{page}: missing (every lesson has a page with a results block and a scaling block)")
            continue
        text = page.read_text()
        if results[lesson.run] is not None:
            try:
                block = results_block(lesson, results[lesson.run], runs, by_number)
            except (KeyError, TypeError, ValueError) as error:
                problems.append(f"{page}: results block kept: {runs / lesson.run / 'results.json'} lacks {error!r}")
            else:
                text = replace_between_markers(text, block, str(page), RESULTS_START, RESULTS_END)
        else:
            between(text, RESULTS_START, RESULTS_END, str(page))
        try:
            block = scaling_block(lesson, results, runs, recipes)
        except Exception as error:  # a recipe or config mid-change must not stop the other pages: say so, keep the block
            problems.append(f"{page}: scaling block kept: {type(error).__name__}: {error}")
        else:
            text = replace_between_markers(text, block, str(page), SCALING_START, SCALING_END)
        pages[page] = text
    return pages, problems


def main(argv: list[str] | None = None) -> int:
    from transformers import HfArgumentParser

    parser = HfArgumentParser(LeaderboardArguments, description="Write the README's lesson table and plot, and the lesson pages' "
                              "numbers, from runs/*/results.json.")
    (args,) = parser.parse_args_into_dataclasses(args=argv)
    runs, readme = Path(args.runs), Path(args.readme)
    results = read_results(runs)
    text = readme.read_text()
    committed = committed_rows(between(text, START, END, str(readme)))
    rows = read_rows(runs, results, committed)
    lessons_dir = Path(args.lessons_dir) if args.lessons_dir else readme.parent / "docs" / "lessons"
    link = os.path.relpath(lessons_dir, readme.parent) if args.lessons_dir else "docs/lessons"
    updated = {readme: replace_between_markers(text, markdown_table(rows, Path(link).as_posix()), str(readme))}
    problems = []
    if lessons_dir.is_dir() or args.lessons_dir:
        pages, problems = update_pages(lessons_dir, runs, Path(args.recipes), results, rows)
        updated.update(pages)
    missing = [lesson.number for lesson in LESSONS if results[lesson.run] is None]
    if missing:
        print(f"not from a run here: lessons {missing} have no {runs}/<lesson>/results.json; their README rows and page "
              "results blocks are kept as committed")
    for problem in problems:
        print(problem)
    if args.check:
        stale = [str(path) for path, new in updated.items() if path.read_text() != new]
        for path in stale:
            print(f"{path} differs from what {runs}/ gives: run python -m hf_models.experiments.leaderboard")
        return 1 if stale or problems else 0
    for path, new in updated.items():
        if path.read_text() != new:
            path.write_text(new)
    plot(rows, Path(args.plot))
    ran = [r["lesson"].number for r in rows if (r["validation"] or r["test"]) and not r["kept"]]
    print(f"{readme}: lesson table from {len(ran)} runs (lessons {ran}); plot {args.plot}; "
          f"{len(updated) - 1} lesson pages in {lessons_dir}" if len(updated) > 1 else f"{readme}: lesson table; plot {args.plot}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
