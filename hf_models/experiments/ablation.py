"""Run an ablation grid cell by cell, resumably and reproducibly, and summarise it over seeds.

A cell is one (config, seed) training run at the grid's token budget, on lesson 7's hand-written
loop (``TrainingLoop``), in its own folder ``<output_dir>/cells/<cell>/seed-<seed>/``:

* ``cell.json``: everything that decides the run (model config, training settings, data). A folder
  whose ``cell.json`` differs from what the grid now asks for is refused, never silently mixed in.
* ``checkpoint-<step>/``: the loop's pickle-free checkpoints, every ``eval_steps``. A run killed
  mid-cell restarts from the latest one, bit for bit (model, AdamW, schedule, data position, RNGs).
* ``metrics.jsonl`` and ``tensorboard/`` (when installed): the curves, one TensorBoard run per cell.
* ``result.json``, written last and atomically: the cell is done. A rerun skips it and deletes
  its checkpoints.

Reproducibility: on a CPU, the same config and seed give a bitwise identical loss curve. The seed
decides the initial weights and the training windows (``RandomWindows``), the loop consumes no
other randomness, and torch's CPU kernels are deterministic for a fixed thread count.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
import statistics
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from accelerate import PartialState
from transformers import TrainingArguments, default_data_collator, set_seed

from ..benchmarking.memory import training_step_bytes
from ..data import RandomWindows
from ..evaluation import evaluate_splits
from ..files import write_json_atomically
from ..modeling_configurable import ConfigurableDecoderForCausalLM
from ..recipe_support.arguments import global_batch_size
from ..training.loop import TrainingLoop, latest_checkpoint, read_metrics
from .grid import Grid, slug

CELL_FILE, RESULT_FILE = "cell.json", "result.json"
# A difference counts as "beyond seed noise" when it exceeds this many standard errors of the
# difference of two means (Welch); with 3 seeds per cell it is a rough bar, not a significance test.
NOISE_STANDARD_ERRORS = 2.0


@dataclass
class CellData:
    """What every cell shares: the training token stream, the periodic-evaluation blocks and the held-out corpus."""

    train_ids: torch.LongTensor
    eval_dataset: object
    corpus: object
    tokenizer: object
    byte_lengths: torch.LongTensor
    block_size: int
    max_eval_tokens: int | None


def cell_folder(output_dir: Path, cell: str, seed: int) -> Path:
    return Path(output_dir) / "cells" / slug(cell) / f"seed-{seed}"


def cell_settings(cell: str, seed: int, config, args: TrainingArguments, data: CellData) -> dict:
    """Everything that decides a cell's curve, as JSON: two runs with equal settings give equal curves."""
    keys = ("max_steps", "per_device_train_batch_size", "gradient_accumulation_steps", "learning_rate", "warmup_steps",
            "lr_scheduler_kwargs", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "max_grad_norm", "bf16",
            "eval_steps", "logging_steps")
    training = {k: getattr(args, k) for k in keys}
    training["lr_scheduler_kwargs"] = dict(training["lr_scheduler_kwargs"] or {})
    return dict(
        cell=cell, seed=seed, model={k: v for k, v in config.to_diff_dict().items() if k != "transformers_version"}, training=training,
        block_size=data.block_size, world_size=args.world_size, train_tokens=int(data.train_ids.numel()),
        vocab_size=config.vocab_size,
    )


def check_cell_args(args: TrainingArguments) -> None:
    """Refuse settings a resumable, comparable cell cannot run with, naming the flag.

    Checkpoints are taken at every evaluation, and a run resumed from one must log the same losses as
    one never stopped, so the logging period has to divide the evaluation period.
    """
    eval_steps, logging_steps = args.eval_steps, args.logging_steps
    if not isinstance(eval_steps, int) or isinstance(eval_steps, bool) or eval_steps <= 0:
        raise ValueError(f"--eval_steps must be a positive number of steps for an ablation (its curves and checkpoints), got {eval_steps!r}.")
    if not isinstance(logging_steps, int) or logging_steps <= 0 or eval_steps % logging_steps:
        raise ValueError(
            f"--eval_steps {eval_steps} must be a multiple of --logging_steps {logging_steps}: cells checkpoint at every "
            f"evaluation, and a resumed cell logs the same losses as an uninterrupted one only from a logging boundary."
        )


def run_cell(grid: Grid, cell: str, seed: int, data: CellData, args: TrainingArguments, output_dir: Path) -> dict:
    """Train (or resume, or skip) one cell and return its result (see the module docstring)."""
    check_cell_args(args)
    state = PartialState()
    folder = cell_folder(output_dir, cell, seed)
    config = grid.cell_config(cell, vocab_size=len(data.tokenizer), max_position_embeddings=data.block_size,
                              eos_token_id=data.tokenizer.eos_token_id)
    run_args = replace(args, output_dir=str(folder), seed=seed, save_strategy="steps", save_steps=args.eval_steps,
                       eval_strategy="no", report_to="none")
    settings = cell_settings(cell, seed, config, run_args, data)
    settings_file = folder / CELL_FILE
    if settings_file.exists():
        recorded = json.loads(settings_file.read_text())
        if recorded != json.loads(json.dumps(settings)):
            changed = sorted(k for k in settings if json.dumps(recorded.get(k), sort_keys=True) != json.dumps(settings[k], sort_keys=True))
            raise ValueError(
                f"{folder} holds cell {cell!r}, seed {seed}, run with other settings (different: {changed}). "
                f"Delete that folder to re-run it, or pass another --output_dir."
            )
        if (folder / RESULT_FILE).exists():
            if state.is_main_process:
                remove_checkpoints(folder)
            return json.loads((folder / RESULT_FILE).read_text())
    elif state.is_main_process:
        write_json_atomically(settings_file, settings)
    state.wait_for_everyone()

    set_seed(seed)
    model = ConfigurableDecoderForCausalLM(config)
    global_batch = global_batch_size(args)
    windows = RandomWindows(data.train_ids, data.block_size, args.max_steps * global_batch, seed)
    first = default_data_collator([windows[i] for i in range(args.per_device_train_batch_size)])  # the loop's first micro-batch
    memory = training_step_bytes(model, first, bf16=args.bf16)
    loop = TrainingLoop(model, windows, run_args, eval_dataset=data.eval_dataset, byte_lengths=data.byte_lengths, shuffle=False)
    checkpoint = latest_checkpoint(folder)
    if checkpoint is None and state.is_main_process:
        # Killed before its first checkpoint: start clean, not after the dead run's records.
        (folder / "metrics.jsonl").unlink(missing_ok=True)
        shutil.rmtree(folder / "tensorboard", ignore_errors=True)
    state.wait_for_everyone()
    outcome = loop.train(resume_from_checkpoint=checkpoint)
    model = loop.accelerator.unwrap_model(loop.model)
    validation = evaluate_splits(model, data.tokenizer, data.corpus, data.byte_lengths, data.block_size, data.max_eval_tokens,
                                 ("validation",))["validation"]
    records = read_metrics(folder)
    result = dict(
        cell=cell, seed=seed, validation=validation, parameters=model.num_parameters(),
        tokens_per_second=outcome.tokens_per_second, memory_bytes=memory, resumed_from_step=int(checkpoint.name.split("-")[-1]) if checkpoint else None,
        train_tokens=args.max_steps * global_batch * data.block_size,
        curve={"step": [r["step"] for r in records if "eval_bits_per_byte" in r],
               "eval_bits_per_byte": [r["eval_bits_per_byte"] for r in records if "eval_bits_per_byte" in r]},
        losses={"step": [r["step"] for r in records if "loss" in r], "loss": [r["loss"] for r in records if "loss" in r]},
    )
    if state.is_main_process:
        write_json_atomically(folder / RESULT_FILE, result)
        remove_checkpoints(folder)
    state.wait_for_everyone()
    return result


def remove_checkpoints(folder: Path) -> None:
    for checkpoint in folder.glob("checkpoint-*"):
        shutil.rmtree(checkpoint, ignore_errors=True)


# ----------------------------------------------------------------------------- over seeds


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(grid: Grid, results: dict[str, list[dict]]) -> list[dict]:
    """One row per cell: mean and std over seeds, and the difference from the baseline against the seed noise."""
    rows = []
    for cell, runs in results.items():
        bpb = [r["validation"]["bits_per_byte"] for r in runs]
        speed = [r["tokens_per_second"] for r in runs]
        memory = [r["memory_bytes"]["total"] / 2**20 for r in runs]
        row = dict(cell=cell, changes=grid.cells[cell], seeds=len(runs), parameters=runs[0]["parameters"])
        row["bpb_mean"], row["bpb_std"] = mean_std(bpb)
        row["tokens_per_second_mean"], row["tokens_per_second_std"] = mean_std(speed)
        row["memory_mib_mean"], row["memory_mib_std"] = mean_std(memory)
        rows.append(row)
    base = rows[0]
    for row in rows:
        row["delta_bpb"] = row["bpb_mean"] - base["bpb_mean"]
        standard_error = math.sqrt(row["bpb_std"] ** 2 / row["seeds"] + base["bpb_std"] ** 2 / base["seeds"])
        row["delta_standard_errors"] = abs(row["delta_bpb"]) / standard_error if standard_error > 0 else math.inf
        row["beyond_noise"] = row is not base and row["seeds"] > 1 and base["seeds"] > 1 and \
            row["delta_standard_errors"] > NOISE_STANDARD_ERRORS
    return rows


def describe_changes(changes: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in changes.items()) or "(baseline)"


def write_tables(rows: list[dict], output_dir: Path) -> tuple[Path, Path]:
    """``results.csv`` (every number) and ``results.md`` (the README's table)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = output_dir / "results.csv", output_dir / "results.md"
    columns = ["cell", "changes", "seeds", "parameters", "bpb_mean", "bpb_std", "delta_bpb", "delta_standard_errors", "beyond_noise",
               "tokens_per_second_mean", "tokens_per_second_std", "memory_mib_mean", "memory_mib_std"]
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({**{k: row[k] for k in columns}, "changes": describe_changes(row["changes"])})
    lines = [
        "| cell | changes from base | val bits/byte (mean ± std) | Δ vs baseline | beyond seed noise | tokens/s | parameters | training memory (MiB) |",
        "|---|---|---:|---:|:---:|---:|---:|---:|",
    ]
    for i, row in enumerate(rows):
        delta = "—" if i == 0 else f"{row['delta_bpb']:+.4f}"
        noise = "—" if i == 0 else ("yes" if row["beyond_noise"] else "no")
        lines.append(
            f"| {row['cell']} | {describe_changes(row['changes'])} | {row['bpb_mean']:.4f} ± {row['bpb_std']:.4f} | {delta} | {noise} | "
            f"{row['tokens_per_second_mean']:,.0f} ± {row['tokens_per_second_std']:,.0f} | {row['parameters']:,} | "
            f"{row['memory_mib_mean']:.1f} |"
        )
    md_path.write_text("\n".join(lines) + "\n")
    return csv_path, md_path


def plot_curves(grid: Grid, results: dict[str, list[dict]], path: Path) -> Path:
    """Validation bits per byte over training tokens, per cell: the mean over seeds with a min-max band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, ax = plt.subplots(figsize=(8, 5))
    for cell, runs in results.items():
        steps = runs[0]["curve"]["step"]
        curves = torch.tensor([r["curve"]["eval_bits_per_byte"] for r in runs])  # (seeds, points)
        tokens_per_step = runs[0]["train_tokens"] / max(1, steps[-1])
        x = [s * tokens_per_step / 1e6 for s in steps]
        (line,) = ax.plot(x, curves.mean(0).tolist(), label=f"{cell} (end: {curves[:, -1].mean():.3f})")
        if len(runs) > 1:
            ax.fill_between(x, curves.min(0).values.tolist(), curves.max(0).values.tolist(), color=line.get_color(), alpha=0.2)
    ax.set_xlabel("training tokens (millions)")
    ax.set_ylabel("validation bits per byte (periodic evaluation blocks)")
    seeds = len(next(iter(results.values())))
    ax.set_title((grid.question or "ablation") + f"\nmean over {seeds} seed(s), band: min to max; the table's numbers are the whole "
                 "validation split", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    # The early points are far above the rest; show where the cells differ.
    finals = [v for runs in results.values() for r in runs for v in r["curve"]["eval_bits_per_byte"][len(r["curve"]["step"]) // 3:]]
    if finals:
        ax.set_ylim(min(finals) - 0.02, max(finals) + 0.02)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


__all__ = ["CellData", "cell_folder", "check_cell_args", "plot_curves", "run_cell", "summarise", "write_tables"]
