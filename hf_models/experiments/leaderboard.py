"""The zoo's leaderboard: every lesson's ``results.json`` -> the README's lesson table and a plot of bits per byte by lesson.

The README's numbers are generated from runs, never typed: ``make lessons`` runs every recipe with
its defaults and then this script, which rewrites the table between the markers
``<!-- leaderboard:start -->`` and ``<!-- leaderboard:end -->`` in ``README.md`` and saves
``docs/figures/leaderboard.png``. A lesson with no run yet keeps its row, with dashes, so the table
always lists the whole curriculum. ::

    python -m hf_models.experiments.leaderboard                 # runs/ -> README.md + docs/figures/leaderboard.png
    python -m hf_models.experiments.leaderboard --check         # exit 1 if README.md is not what runs/ gives
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

START, END = "<!-- leaderboard:start -->", "<!-- leaderboard:end -->"


@dataclass(frozen=True)
class Lesson:
    number: int
    title: str
    run: str  # runs/<run> and recipes/<run>.py
    teaches: str
    note: str = ""  # what the number means, where it is not plain language modelling


LESSONS = (
    Lesson(1, "bigram", "01_bigram", "a logits table; gradient descent finds the counting solution"),
    Lesson(2, "BPE + n-gram MLP", "02_ngram_mlp", "hand-written byte-level BPE; Bengio et al. 2003"),
    Lesson(3, "GRU", "03_gru", "recurrence; hand-written GRU cells = `torch.nn.GRU`"),
    Lesson(4, "GPT decoder", "04_gpt", "attention; = `GPT2LMHeadModel`; nanoGPT parity"),
    Lesson(5, "modern decoder", "05_modern_gpt", "RMSNorm, SwiGLU, RoPE, GQA; = `LlamaForCausalLM`"),
    Lesson(6, "KV cache", "06_kv_cache", "hand-written growing and static caches vs `DynamicCache` / `StaticCache`",
           "generation speed only; see *KV cache*"),
    Lesson(7, "training engineering", "07_training", "the loop `Trainer` hides; warm-up, cosine, accumulation, bf16, resume, DDP"),
    Lesson(8, "LoRA SFT", "08_lora_sft", "hand LoRA = peft; instruction data, chat template; trl `SFTTrainer`",
           "fine-tuned for a task: free text gets worse; the task table is in its section"),
    Lesson(9, "INT8 quantization", "09_quantization", "weight-only, LLM.int8(), W8A8 by hand; bitsandbytes; GGUF",
           "lesson 5's model, hand int8 weight-only; no training"),
    Lesson(10, "mixture of experts", "10_moe", "top-k router, grouped dispatch, balancing loss; = `MixtralForCausalLM`"),
    Lesson(11, "DPO", "11_dpo", "hand DPO loss = trl `DPOTrainer`; preference pairs",
           "aligned for a preference: free text gets worse; accuracy in its section"),
    Lesson(12, "ablations", "12_ablations", "configurable decoder; grids of configs x seeds; noise-aware tables",
           "best cell of the default grid (1M parameters, 0.6M tokens: a budget for comparing cells, not for a model), "
           "mean over seeds; validation only, since cells are chosen on it"),
)


def lesson_row(lesson: Lesson, results: dict | None) -> dict:
    """The numbers of one lesson's row: held-out metrics, parameters and training tokens/s (None where the run has none)."""
    row = dict(lesson=lesson, validation=None, test=None, parameters=None, tokens_per_second=None)
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


def saved_parameters(folder: str | None) -> int | None:
    """Parameters of a saved model folder, read from its safetensors header (tied weights are stored once)."""
    path = Path(folder or "") / "model.safetensors"
    if not folder or not path.is_file():
        return None
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as weights:
        return sum(math.prod(weights.get_slice(name).get_shape()) for name in weights.keys())


def read_rows(runs: Path) -> list[dict]:
    rows = []
    for lesson in LESSONS:
        path = runs / lesson.run / "results.json"
        results = json.loads(path.read_text()) if path.is_file() else None
        row = lesson_row(lesson, results)
        if results is not None and row["parameters"] is None:
            row["parameters"] = saved_parameters(results.get("model_folder"))
        rows.append(row)
    return rows


def _number(value, fmt: str) -> str:
    return "—" if value is None else format(value, fmt)


def markdown_table(rows: list[dict]) -> str:
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
        lines.append(
            f"| {lesson.number} | {lesson.title}{marker} | `recipes/{lesson.run}.py` | {lesson.teaches} | "
            f"{_number(row['parameters'], ',')} | {_number(row['tokens_per_second'], ',.0f')} | "
            f"{_number(validation.get('bits_per_byte'), '.4f')} | {_number(test.get('bits_per_byte'), '.4f')} | "
            f"{_number(test.get('loss'), '.4f')} | {_number(test.get('perplexity'), '.2f')} |"
        )
    lines.append("")
    lines += [f"⁽{i}⁾ {note}.  " for i, note in enumerate(notes, 1)]
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


def replace_between_markers(text: str, table: str, source: str) -> str:
    if text.count(START) != 1 or text.count(END) != 1 or text.index(START) > text.index(END):
        raise ValueError(f"{source} must hold exactly one {START} ... {END} pair for the lesson table.")
    head, rest = text.split(START)
    _, tail = rest.split(END)
    return f"{head}{START}\n{table}{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write the README's lesson table and plot from runs/*/results.json.")
    parser.add_argument("--runs", default="runs", help="the folder the recipes wrote (runs/<lesson>/results.json)")
    parser.add_argument("--readme", default="README.md")
    parser.add_argument("--plot", default="docs/figures/leaderboard.png")
    parser.add_argument("--check", action="store_true", help="only check that the README's table is what the runs give")
    args = parser.parse_args(argv)
    rows = read_rows(Path(args.runs))
    readme = Path(args.readme)
    text = readme.read_text()
    updated = replace_between_markers(text, markdown_table(rows), str(readme))
    if args.check:
        if updated != text:
            print(f"{readme}'s lesson table differs from what {args.runs}/ gives: run python -m hf_models.experiments.leaderboard")
            return 1
        return 0
    readme.write_text(updated)
    plot(rows, Path(args.plot))
    ran = [r["lesson"].number for r in rows if r["validation"] or r["test"]]
    print(f"{readme}: lesson table from {len(ran)} runs (lessons {ran}); plot {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
