# %% [markdown]
# # Lesson 12: controlled experiments on the configurable decoder
#
# Explained, with its measured numbers and how it scales to frontier models:
# [docs/lessons/12_ablations.md](../docs/lessons/12_ablations.md).
#
# Lessons 4 and 5 compared GPT-2's blocks with LLaMA's and found LLaMA's better by 0.12 bits per byte.
# But lesson 5 changed five things at once (RoPE, RMSNorm, SwiGLU, grouped-query attention, no
# biases), and one run per model cannot tell a real gain from the luck of one initialisation. This
# lesson is the research engineer's answer: **change one thing at a time, run every change with
# several seeds, and call a difference real only when it is larger than the spread between seeds.**
#
# The tools:
#
# * the **configurable decoder** (`hf_models/modeling_configurable.py`), where every block of lessons
#   4-10 is a config field, built from the very modules those lessons wrote (its presets *are* the GPT,
#   modern and MoE decoders, logit for logit);
# * a **grid file** (`recipes/grids/*.yaml`): the question, the seeds, the shared model and token
#   budget, and one line per cell;
# * lesson 7's **hand-written loop**, so every cell trains with the same optimizer, schedule and data
#   order, resumes bit for bit, and runs under `accelerate launch` unchanged.
#
# The default grid asks: **which of RoPE, RMSNorm, SwiGLU, GQA and QK-norm buys most over GPT-2's
# blocks at this size?** Each cell adds one of them to a bias-free GPT-2 (4 layers, width 128); the
# last adds all five. Every cell sees the same number of tokens.
#
# Run (about 20 minutes on 2 CPU cores):
#
#     python recipes/12_ablations.py                                   # the default grid
#     python recipes/12_ablations.py --grid my_grid.yaml --output_dir runs/my_grid
#     accelerate launch --config_file recipes/configs/multi_cpu.yaml recipes/12_ablations.py
#
# Kill it at any point and run the same command again: finished cells are read back, the cell that
# was running continues from its last checkpoint. Outputs in `runs/12_ablations/`: `results.md` and
# `results.csv` (mean ± std over seeds), `curves.png`, `results.json`, and one folder per cell and seed
# with its `metrics.jsonl` and TensorBoard run (`tensorboard --logdir runs/12_ablations/cells`).

# %%
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from hf_models.benchmarking import describe_machine
from hf_models.data import split_token_ids
from hf_models.experiments import CellData, load_grid, plot_curves, run_cell, summarise, write_tables
from hf_models.experiments.ablation import check_cell_args
from hf_models.files import write_json_atomically
from hf_models.recipe_support import global_batch_size, parse_lesson_args, prepare_lesson_data, recipe_argv, show

DEFAULT_GRID = Path(__file__).resolve().parent / "grids" / "modern_blocks.yaml" if "__file__" in globals() \
    else Path("recipes/grids/modern_blocks.yaml")


@dataclass
class AblationArguments:
    grid: str = field(default=str(DEFAULT_GRID), metadata={"help": "The grid file (YAML or JSON); see recipes/grids/."})
    tokenizer: str = field(default="bpe", metadata={"help": "char or bpe (the lessons' 2048-token BPE by default)."})
    vocab_size: int = field(default=2048, metadata={"help": "BPE vocabulary size."})
    sampling: str = field(default="random_windows", metadata={"help": "Fixed: every cell draws nanoGPT's random windows from its seed."})


# Settings of every grid unless its `training` section says otherwise (the command line overrides both).
ABLATION_DEFAULTS = dict(
    output_dir="runs/12_ablations", block_size=128, max_steps=300, per_device_train_batch_size=16, learning_rate=2e-3,
    warmup_steps=30, lr_scheduler_kwargs='{"min_lr": 1e-4}', weight_decay=0.1, adam_beta2=0.99, max_grad_norm=1.0,
    eval_steps=50, logging_steps=25, max_eval_blocks=32, disable_tqdm=True,
)

# %% [markdown]
# ## 1. The grid
#
# The grid file is read and checked before anything trains: every cell must build, and a cell may
# only change model fields, never the token budget. Its `training` section becomes the defaults of
# the usual flags, so `--max_steps 100` on the command line still wins.

# %%
argv = recipe_argv()
words = sys.argv[1:] if argv is None else argv
grid_path = next((words[i + 1] for i, w in enumerate(words[:-1]) if w == "--grid"), None) or \
    next((w.split("=", 1)[1] for w in words if w.startswith("--grid=")), str(DEFAULT_GRID))
grid = load_grid(grid_path)
args, data_args, lesson_args, training_args = parse_lesson_args(AblationArguments, defaults={**ABLATION_DEFAULTS, **grid.training})
check_cell_args(training_args)
if args.sampling != "random_windows":
    raise ValueError(f"--sampling must be random_windows for an ablation (each cell draws its windows from its seed), got {args.sampling!r}.")
output_dir = Path(training_args.output_dir)
print(f"grid {grid.path}: {len(grid.cells)} cells x {len(grid.seeds)} seeds; question: {grid.question}")
for name, changes in grid.cells.items():
    print(f"  {name:<24}{changes or '(baseline)'}")

# %% [markdown]
# ## 2. Data
#
# Lesson 4's corpus and BPE tokenizer. Every cell trains on random windows drawn from its seed, so
# two cells with the same seed read exactly the same tokens in the same order, and evaluates on the
# same validation blocks during training and on the whole validation split at the end. The test
# split is not touched: choosing among cells is a decision made on validation data.

# %%
data = prepare_lesson_data(data_args, training_args, args.tokenizer, args.vocab_size, sampling="blocks")
cell_data = CellData(
    train_ids=split_token_ids(data.corpus["train"], data.tokenizer),
    eval_dataset=data.eval_dataset.select(range(min(data_args.max_eval_blocks, len(data.eval_dataset)))),
    corpus=data.corpus, tokenizer=data.tokenizer, byte_lengths=data.byte_lengths, block_size=data_args.block_size,
    max_eval_tokens=data_args.max_eval_tokens,
)
global_batch = global_batch_size(training_args)
print(f"token budget per cell: {training_args.max_steps} steps x {global_batch} x {data_args.block_size} = "
      f"{training_args.max_steps * global_batch * data_args.block_size:,} tokens")

# %% [markdown]
# ## 3. Every cell, every seed
#
# One run per (cell, seed), each in its own folder. A finished run is read back, not re-run; a
# half-finished one resumes from its last checkpoint.

# %%
results: dict[str, list[dict]] = {}
for cell in grid.cells:
    for seed in grid.seeds:
        result = run_cell(grid, cell, seed, cell_data, training_args, output_dir)
        results.setdefault(cell, []).append(result)
        resumed = f", resumed from step {result['resumed_from_step']}" if result.get("resumed_from_step") else ""
        print(f"  {cell:<24} seed {seed}: validation bits per byte {result['validation']['bits_per_byte']:.4f}, "
              f"{result['tokens_per_second']:,.0f} tokens/s{resumed}")

# %% [markdown]
# ## 4. Over seeds: what is larger than the noise?
#
# Each row is the mean ± standard deviation over seeds. A difference from the baseline (the first
# cell) is marked *beyond seed noise* when it exceeds two standard errors of the difference of the
# two means: with three seeds, a rough bar, but one that a single run per cell cannot clear at all.

# %%
rows = summarise(grid, results)
csv_path, md_path = write_tables(rows, output_dir)
print(md_path.read_text())
best = min(rows, key=lambda row: row["bpb_mean"])
base = rows[0]
print(f"best cell: {best['cell']} ({best['bpb_mean']:.4f}); of the single changes, the largest gain over '{base['cell']}':")
single = [row for row in rows[1:] if len(row["changes"]) == 1]
for row in sorted(single, key=lambda row: row["delta_bpb"]):
    print(f"  {row['cell']:<24}{row['delta_bpb']:+.4f} bits per byte ({row['delta_standard_errors']:.1f} standard errors"
          f"{', beyond seed noise' if row['beyond_noise'] else ''})")

# %% [markdown]
# ## 5. The curves
#
# Validation bits per byte during training, mean over seeds with a band from the lowest to the
# highest seed. Overlapping bands are the picture of "not larger than the noise".

# %%
if training_args.process_index == 0:
    curves = plot_curves(grid, results, output_dir / "curves.png")
    show(curves)
    seed_means = [r["validation"] for r in results[best["cell"]]]
    summary = {key: sum(v[key] for v in seed_means) / len(seed_means) for key in ("loss", "perplexity", "bits_per_byte", "tokens", "bytes")}
    write_json_atomically(output_dir / "results.json", dict(
        grid=str(grid.path), question=grid.question, seeds=grid.seeds, machine=describe_machine().to_dict(),
        token_budget=training_args.max_steps * global_batch * data_args.block_size, rows=rows, best_cell=best["cell"],
        # The leaderboard's row for this lesson: the best cell, mean over seeds (validation only; no test split is used).
        validation=summary, parameters=best["parameters"], train_tokens_per_second=best["tokens_per_second_mean"],
        model=f"configurable decoder, best cell '{best['cell']}'",
    ))
    print(f"saved {md_path}, {csv_path}, {curves} and {output_dir / 'results.json'}")
