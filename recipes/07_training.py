# %% [markdown]
# # Lesson 7: training engineering. The loop ``Trainer`` runs for us, written out, and what each trick buys.
#
# Explained, with its measured numbers and how it scales to frontier models:
# [docs/lessons/07_training.md](../docs/lessons/07_training.md).
#
# Lessons 1-6 trained with ``Trainer``. This lesson opens it: ``hf_models/training/loop.py`` is the
# same loop written by hand on Accelerate (warm-up and cosine decay, gradient accumulation with the
# loss normalised over the whole batch's tokens, mixed precision, gradient clipping, evaluation,
# checkpoints that resume bit for bit). The recipe does three things, top to bottom:
#
# 1. **The hand loop is the Trainer.** Lesson 4's GPT, same data in the same order, same init, same
#    optimizer and schedule, trained twice: with the hand-written loop and with ``Trainer``. The two
#    loss curves agree to 1e-4 at every logged step (one plot), and the hand loop, having less to
#    do, is at least as fast (tokens/s side by side).
# 2. **What each trick buys.** At one token budget, a run per row: constant learning rate without
#    warm-up; warm-up + cosine; a 4x larger batch through gradient accumulation; bf16 autocast;
#    activation checkpointing. Columns: validation bits per byte, tokens/s, activation memory.
#    (bf16 is only faster where the CPU has bf16 matrix instructions: the table shows what it does
#    on this one, next to the measured fp32 and bf16 matmul peaks.)
# 3. **The GPT beats the GRU.** In the README's lesson table lesson 4's GPT (2.246 test bits per byte
#    in five CPU minutes) loses to lesson 3's GRU (2.178). With this lesson's tricks only (schedule,
#    learning rate, batch, precision) the same architecture trains in at most five minutes here to a
#    lower test bits per byte; that model is this lesson's saved model, card and results.
#
# ``--fsdp full_shard`` shards the hand loop's model over the launched processes with FSDP2
# (torch's ``fully_shard``: each process keeps half the weights, gradients and AdamW state), on CPUs
# over gloo as on GPUs. It is ``Trainer``'s own flag with the same meaning; since accelerate cannot
# shard ``Trainer`` on CPUs, part 1 is skipped there (``--skip_comparison true``, asked for by name).
# Part 3 prints the memory each process holds next to one process's.
#
# Run:
#     python recipes/07_training.py                       # ~10 minutes on 2 CPU cores
#     python recipes/07_training.py --skip_comparison --skip_tricks   # only the tuned GPT (~5 minutes)
#     accelerate launch --multi_gpu --num_processes 2 recipes/07_training.py   # 2 CPU processes, gloo DDP
#     torchrun --nproc_per_node 2 recipes/07_training.py --fsdp full_shard --skip_comparison true   # 2 processes, FSDP2

# %%
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt
from transformers import TrainingArguments, default_data_collator, set_seed

from hf_models import GPTConfig, GPTForCausalLM
from hf_models.benchmarking import describe_machine
from hf_models.benchmarking.memory import activation_bytes
from hf_models.data import RandomWindows, split_token_ids
from hf_models.recipe_support import (
    DECODER_TRAINING_DEFAULTS,
    DecoderArguments,
    build_trainer,
    choose_bf16,
    evaluate_splits,
    finish_lesson,
    global_batch_size,
    parse_lesson_args,
    prepare_lesson_data,
    show,
)
from hf_models.training.loop import TrainingLoop, check_fsdp_args

GRU_TEST_BITS_PER_BYTE = 2.178  # lesson 3's result in the README's lesson table: the bar to beat
CURVE_TOLERANCE = 1e-4  # hand loop vs Trainer, per logged step (nats)
# transformers 5.24 renamed the flag (the old name still works on the command line, not in dataclasses.replace).
CHECKPOINTING = next(
    (name for name in ("activation_checkpointing", "gradient_checkpointing") if name in {f.name for f in dataclasses.fields(TrainingArguments)})
)


@dataclass
class TrainingLessonArguments(DecoderArguments):
    bias: bool = field(default=False, metadata={"help": "Biases in Linear and LayerNorm layers (lesson 4: False)."})
    hidden_act: str = field(default="gelu", metadata={"help": "gelu or gelu_new (lesson 4: gelu)."})
    compare_steps: int = field(default=150, metadata={"help": "Steps of the hand loop vs Trainer comparison."})
    tricks_steps: int = field(default=200, metadata={"help": "Steps of batch 16 per row of the tricks table (the token budget)."})
    skip_comparison: bool = field(default=False, metadata={"help": "Skip part 1 (hand loop vs Trainer)."})
    skip_tricks: bool = field(default=False, metadata={"help": "Skip part 2 (the tricks table)."})


# The tuned recipe of part 3 (see the README's lesson 7 section for what each change gained):
# lesson 4's architecture, data and optimizer, with the schedule, rate, batch and precision this
# lesson found. Every value can be overridden from the command line.
TUNED_TRAINING = dict(
    DECODER_TRAINING_DEFAULTS,
    max_steps=2400,  # bf16 autocast trains ~1.8x the tokens/s here: 2.4x lesson 4's steps in under 5 minutes
    learning_rate=2e-3,
    warmup_steps=100,
    lr_scheduler_kwargs='{"min_lr": 1e-4}',
    eval_steps=600,  # precision: choose_bf16 (bf16 autocast where this CPU measures it faster, or --bf16)
)


def check_fsdp(args: TrainingLessonArguments, training_args: TrainingArguments) -> None:
    """``--fsdp`` shards the hand loop's runs (parts 2 and 3); part 1 runs ``Trainer``, which accelerate
    shards only on accelerators. Refused before any work, naming the flags."""
    check_fsdp_args(training_args)
    if training_args.use_cpu and not args.skip_comparison:
        raise ValueError(
            "--fsdp on CPUs shards the hand loop only: part 1 would also train Trainer with --fsdp, which accelerate 1.15 "
            "does not shard on CPUs. Add --skip_comparison true (parts 2 and 3 then run sharded), or drop --fsdp."
        )


def print_memory(memory: dict[str, dict[str, int]], processes: int) -> None:
    """Parameters, gradients and optimizer state: what each process holds, next to one process holding all."""
    print(f"\nmemory per process, {processes} process(es) (the largest), against one process holding everything:")
    print(f"  {'':<18}{'one process':>14}{'each process':>14}")
    for part, held in memory.items():
        print(f"  {part:<18}{held['one_process'] / 2**20:>10.2f} MiB{held['per_process'] / 2**20:>10.2f} MiB")


def plot(results: dict, path: Path) -> None:
    """Left: hand loop vs Trainer loss curves. Right: training loss of each trick's run."""
    panels = [key for key in ("hand_loop_vs_trainer", "tricks") if key in results]
    if not panels:
        return
    figure, axes = plt.subplots(1, len(panels), figsize=(6.4 * len(panels), 4.4), squeeze=False)
    for ax, key in zip(axes[0], panels):
        if key == "hand_loop_vs_trainer":
            compare = results[key]
            ax.plot(compare["steps"], compare["trainer"], "o-", label="Trainer", markersize=4)
            ax.plot(compare["steps"], compare["hand_loop"], "x--", label="hand-written loop", markersize=6)
            ax.set_title(f"same data, init and optimizer: largest gap {compare['max_abs_difference']:.1e} nats")
            ax.set_xlabel("optimizer step")
        else:
            budget = results[key]["token_budget"]
            for name, row in results[key]["rows"].items():
                steps = sorted(int(s) for s in row["losses"])
                tokens = [s * budget / max(steps) / 1e6 for s in steps]
                ax.plot(tokens, [row["losses"][s] for s in steps], label=f"{name} ({row['validation_bits_per_byte']:.3f} bpb)")
            ax.set_title("what each trick buys at one token budget")
            ax.set_xlabel("training tokens (millions)")
        ax.set_ylabel("training loss (nats/token)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)

# %%
args, data_args, lesson_args, training_args = parse_lesson_args(
    TrainingLessonArguments,
    defaults=dict(output_dir="runs/07_training", model_name="gpt-shakespeare-tuned", **TUNED_TRAINING),
    check_fsdp=check_fsdp,  # the hand loop shards itself: --fsdp is allowed on CPUs here (see check_fsdp)
)
output_dir = Path(training_args.output_dir)
machine = describe_machine()
precision = choose_bf16(training_args, machine)  # --bf16 wins; else bf16 only where measured faster here
machine = machine.to_dict()

# %% [markdown]
# ## 1. Data: lesson 4's corpus, BPE tokenizer and random training windows.

# %%
data = prepare_lesson_data(data_args, training_args, args.tokenizer, args.vocab_size, args.sampling,
                           sample_prompt=lesson_args.sample_prompt)  # the context is --block_size
train_ids = split_token_ids(data.corpus["train"], data.tokenizer)

def windows(steps: int, batch: int) -> RandomWindows:
    """nanoGPT's random windows for ``steps`` optimizer steps of ``batch`` sequences, drawn from the seed."""
    return RandomWindows(train_ids, data_args.block_size, steps * batch, training_args.seed)

# %% [markdown]
# ## 2. The model: lesson 4's GPT, built afresh (same seed, same init) for every run.

# %%
config = GPTConfig(
    vocab_size=len(data.tokenizer), max_position_embeddings=data_args.block_size, hidden_size=args.hidden_size,
    num_hidden_layers=args.num_hidden_layers, num_attention_heads=args.num_attention_heads, bias=args.bias,
    hidden_act=args.hidden_act, dropout=args.dropout, eos_token_id=data.tokenizer.eos_token_id,
)

def new_gpt() -> GPTForCausalLM:
    set_seed(training_args.seed)
    return GPTForCausalLM(config)

def settings(name: str, **changes) -> TrainingArguments:
    """``training_args`` with ``changes``, writing under ``output_dir/name``, nothing saved."""
    base = dict(output_dir=str(output_dir / name), save_strategy="no", eval_strategy="no", report_to="none",
                train_sampling_strategy="sequential", logging_first_step=False)
    return dataclasses.replace(training_args, **{**base, **changes})

global_batch = global_batch_size(training_args)  # sequences per optimizer step, over every process
results: dict = {"machine": machine}

# %% [markdown]
# ## 3. Part 1: the hand loop against Trainer, same everything.

# %%
if not args.skip_comparison:
    compare = settings("compare", max_steps=args.compare_steps, logging_steps=10, warmup_steps=10, bf16=False)
    dataset = windows(args.compare_steps, global_batch_size(compare))
    hand = TrainingLoop(new_gpt(), dataset, dataclasses.replace(compare, output_dir=str(output_dir / "compare-hand")), shuffle=False).train()
    trainer_args = dataclasses.replace(compare, output_dir=str(output_dir / "compare-trainer"))
    trainer, throughput = build_trainer(new_gpt(), data.tokenizer, dataset, data.eval_dataset, trainer_args, data.byte_lengths)
    trainer.train()
    theirs = {log["step"]: log["loss"] for log in trainer.state.log_history if "loss" in log}
    steps = sorted(set(hand.losses) & set(theirs))
    worst = max(abs(hand.losses[s] - theirs[s]) for s in steps)
    results["hand_loop_vs_trainer"] = dict(
        steps=steps, hand_loop=[hand.losses[s] for s in steps], trainer=[theirs[s] for s in steps],
        max_abs_difference=worst, tolerance=CURVE_TOLERANCE, within_tolerance=worst <= CURVE_TOLERANCE,
        hand_loop_tokens_per_second=hand.tokens_per_second, trainer_tokens_per_second=throughput.tokens_per_second,
        throughput_ratio=hand.tokens_per_second / throughput.tokens_per_second,
    )
    print(f"\nhand loop vs Trainer over {len(steps)} logged steps: largest loss difference {worst:.2e} nats "
          f"(tolerance {CURVE_TOLERANCE:g}); tokens/s {hand.tokens_per_second:,.0f} vs {throughput.tokens_per_second:,.0f} "
          f"= {results['hand_loop_vs_trainer']['throughput_ratio']:.2f}x")

# %% [markdown]
# ## 4. Part 2: what each trick buys, at one token budget.

# %%
if not args.skip_tricks:
    n = args.tricks_steps
    rows = {
        "constant lr, no warm-up": dict(warmup_steps=0, lr_scheduler_kwargs={"min_lr": training_args.learning_rate}, bf16=False),
        "warm-up + cosine": dict(warmup_steps=max(1, n // 10), bf16=False),
        "4x batch (accumulation)": dict(max_steps=n // 4, gradient_accumulation_steps=4, warmup_steps=max(1, n // 40), bf16=False),
        "bf16 autocast": dict(warmup_steps=max(1, n // 10), bf16=True),
        "activation checkpointing": {"warmup_steps": max(1, n // 10), "bf16": False, CHECKPOINTING: True},
    }
    table = {}
    for name, changes in rows.items():
        run = settings(f"tricks/{len(table)}", **{"max_steps": n, "logging_steps": max(1, n // 20), **changes})
        model = new_gpt()
        first = windows(1, training_args.per_device_train_batch_size)
        batch = default_data_collator([first[i] for i in range(len(first))])
        memory = activation_bytes(model, batch, bf16=run.bf16, checkpointing=getattr(run, CHECKPOINTING))
        loop = TrainingLoop(model, windows(run.max_steps, global_batch_size(run)), run, shuffle=False)
        outcome = loop.train()
        validation = evaluate_splits(model, data.tokenizer, data.corpus, data.byte_lengths, data_args.block_size,
                                     data_args.max_eval_tokens, ("validation",))["validation"]
        table[name] = dict(validation_bits_per_byte=validation["bits_per_byte"], tokens_per_second=outcome.tokens_per_second,
                           activation_mib=memory / 2**20, losses=outcome.losses)
    results["tricks"] = dict(token_budget=n * global_batch * data_args.block_size, rows=table)
    print(f"\nwhat each trick buys, {n} steps x {global_batch} x {data_args.block_size} tokens each "
          f"(fp32 / bf16 matmul peak here: {machine['matmul_peak_gflops']['fp32']:.0f} / {machine['matmul_peak_gflops']['bf16']:.0f} GFLOP/s)")
    print(f"  {'run':<26}{'val bits/byte':>14}{'tokens/s':>10}{'activations':>13}")
    for name, row in table.items():
        print(f"  {name:<26}{row['validation_bits_per_byte']:>14.4f}{row['tokens_per_second']:>10,.0f}{row['activation_mib']:>10.1f} MiB")

# %% [markdown]
# ## 5. Part 3: the tuned GPT, this lesson's model, with the hand loop.

# %%
model = new_gpt()
start = time.perf_counter()
loop = TrainingLoop(model, data.train_dataset, training_args, eval_dataset=data.eval_dataset.select(range(min(64, len(data.eval_dataset)))),
                    byte_lengths=data.byte_lengths, shuffle=False)
outcome = loop.train()
minutes = (time.perf_counter() - start) / 60
# Under --fsdp ``model`` is sharded: every process runs the same blocks, gathering one layer at a time.
held_out = evaluate_splits(model, data.tokenizer, data.corpus, data.byte_lengths, data_args.block_size, data_args.max_eval_tokens)
results.update(held_out)
test_bpb = held_out.get("test", held_out["validation"])["bits_per_byte"]
results.update(
    train_tokens_per_second=outcome.tokens_per_second, train_steps=outcome.steps, train_minutes=minutes,
    parameters=model.num_parameters(), beats_gru=test_bpb < GRU_TEST_BITS_PER_BYTE, gru_test_bits_per_byte=GRU_TEST_BITS_PER_BYTE,
    training={
        "parameters": f"{model.num_parameters():,}",
        "loop": "hf_models.training.loop.TrainingLoop (the hand-written loop of lesson 7)",
        "steps": outcome.steps,
        "batch": f"{global_batch} x {data_args.block_size} tokens",
        "optimizer": f"AdamW (betas {training_args.adam_beta1}, {training_args.adam_beta2}), lr {training_args.learning_rate}, "
        f"warm-up {training_args.warmup_steps} steps, cosine to {training_args.lr_scheduler_kwargs}, weight decay "
        f"{training_args.weight_decay}, clip {training_args.max_grad_norm}",
        "precision": "bf16 autocast" if training_args.bf16 else "fp32",
        "parallelism": f"FSDP2 (fully_shard) over {training_args.world_size} processes" if training_args.fsdp
        else f"DDP over {training_args.world_size} processes" if training_args.world_size > 1 else "one process",
        "training time": f"{minutes:.1f} minutes, {outcome.tokens_per_second:,.0f} tokens/s on {training_args.world_size} process(es)",
    },
    memory_per_process=dict(processes=training_args.world_size, fsdp=bool(training_args.fsdp), bytes=outcome.memory),
)
if training_args.process_index == 0:
    print_memory(outcome.memory, training_args.world_size)
print(f"\ntuned GPT: {outcome.steps} steps in {minutes:.1f} minutes, test bits per byte {test_bpb:.4f} "
      f"(lesson 3's GRU: {GRU_TEST_BITS_PER_BYTE}) -> {'beats' if test_bpb < GRU_TEST_BITS_PER_BYTE else 'does not beat'} the GRU")

# %% [markdown]
# ## 6. Plot, save with card, sample.
#
# The saved folder is an ordinary ``save_pretrained`` folder: under ``--fsdp`` the shards are first
# gathered into one whole model on the main process (``loop.full_model()``, a collective).

# %%
model = loop.full_model()  # None on the other processes, which save nothing
if training_args.process_index == 0:
    plot(results, output_dir / "training.png")
    show(output_dir / "training.png")
finish_lesson(
    model, data.tokenizer, training_args, lesson_args, data_args, results,
    card=dict(
        lesson="7 (training engineering)",
        recipe="recipes/07_training.py",
        summary=f"Lesson 4's GPT ({args.num_hidden_layers} layers, {args.num_attention_heads} heads, width {args.hidden_size}, "
        f"context {data_args.block_size}), trained by the hand-written loop of lesson 7 with a tuned schedule, learning "
        f"rate and precision, in {minutes:.1f} minutes on CPU.",
        tokenizer=data.tokenizer_description,
        extra={"lesson 3's GRU, test bits per byte": GRU_TEST_BITS_PER_BYTE},
        limitations="Minutes of CPU training on a few MB of plays: Shakespeare-shaped text without meaning. "
        f"Context is {data_args.block_size} tokens.",
        tags=["gpt", "decoder", "training-loop"],
    ),
)
