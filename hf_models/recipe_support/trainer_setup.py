"""Training a lesson's model with ``Trainer``: the decoder lessons' shared budget, the ``Trainer``
set-up, and the train-then-measure step every recipe runs.

``Trainer`` is the loop a reader already knows from transformers, and it brings Accelerate
(``accelerate launch`` runs any recipe on several processes unchanged). Its periodic evaluation
reports bits per byte through the same metric module as the final, whole-split measure
(``hf_models.evaluation``), so the two numbers are comparable. Lesson 7 opens the loop that
``Trainer`` hides, in ``hf_models/training/loop.py``.

**Several processes.** Under ``accelerate launch --num_processes N`` each process holds a full
copy of the model, takes its own share of every global batch and averages gradients with the
others before the step (DDP), so all copies stay equal. A global batch holds the same examples
at any ``N``: ``Trainer``'s random sampler becomes accelerate's ``SeedableRandomSampler``, one
permutation drawn from ``--seed`` that every process shares, and the per-device batches cut from
it are dealt to the processes in turn (process ``r`` takes batches ``r, r + N, ...``). So
``N`` processes at per-device batch ``B`` see, step for step, what one process sees at ``N x B``,
and lose the same (tests/test_distributed.py). For random windows the dataset itself is already
a seeded random draw of exactly ``max_steps`` global batches.

**Checkpoints.** ``--save_strategy steps --save_steps K`` writes ``checkpoint-<step>`` folders
in ``--output_dir``, and ``--resume_from_checkpoint <folder>`` (or ``true``: the latest one)
continues from one, with the optimizer, scheduler, RNG states and the position in the data.
``parse_lesson_args`` has already checked that the checkpoint reads back whole and was saved with
this run's global batch (each checkpoint records it: :class:`RecordBatchLayout`).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from datasets import Dataset
from transformers import (
    PreTrainedTokenizerFast,
    Trainer,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
    default_data_collator,
)
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..evaluation import evaluate_splits, trainer_metric_functions
from ..tokenization import check_tokenizer_matches_model
from ..benchmarking import MachineDescription, ThroughputCallback, bf16_autocast_pays
from ..files import batch_layout, write_batch_layout
from .arguments import DataArguments, checkpoint_to_resume, global_batch_size, recipe_argv
from .lesson_data import LessonData

# The decoder lessons' budget and optimisation, in one place because lessons 4 and 5 are compared
# at the same budget: 1000 steps of 16 x 128 tokens (about five minutes here), and nanoGPT's
# optimiser: AdamW (0.9, 0.99), weight decay 0.1 on matrices, linear warm-up then cosine decay to
# 1e-4, gradient clipping at 1. The peak is 2e-3, twice nanoGPT's, because nanoGPT runs 2000
# steps; the nanoGPT comparison passes --max_steps 2000 --learning_rate 1e-3.
DECODER_TRAINING_DEFAULTS = dict(
    block_size=128,
    max_steps=1000,
    per_device_train_batch_size=16,
    eval_steps=250,
    logging_steps=100,
    learning_rate=2e-3,
    lr_scheduler_type="cosine_with_min_lr",
    lr_scheduler_kwargs='{"min_lr": 1e-4}',
    warmup_steps=100,
    weight_decay=0.1,
    adam_beta2=0.99,
    max_grad_norm=1.0,
)


def choose_bf16(training_args: TrainingArguments, machine: MachineDescription | None = None, argv: list[str] | None = None) -> str:
    """Set ``training_args.bf16`` where the command line left it open ("auto"), and say which and why.

    ``--bf16 true|false`` (or ``--no_bf16``) on the command line wins. Otherwise bf16 autocast is
    chosen on a GPU that supports it, and on a CPU only where :func:`bf16_autocast_pays` measures bf16
    matmuls clearly faster than fp32: without AVX-512 BF16 or AMX, torch emulates them, and autocast
    makes training many times slower. Returns the line the recipe prints (and can record).
    """
    argv = (recipe_argv() or sys.argv[1:]) if argv is None else argv
    if any(a in ("--bf16", "--no_bf16") or a.startswith("--bf16=") for a in argv):
        why = "set on the command line"
    elif torch.cuda.is_available():
        training_args.bf16 = torch.cuda.is_bf16_supported()
        why = f"auto: {torch.cuda.get_device_name()} {'supports' if training_args.bf16 else 'lacks'} bf16"
    else:
        training_args.bf16, measured = bf16_autocast_pays(machine)
        why = f"auto: {measured}"
    line = f"precision: {'bf16 autocast' if training_args.bf16 else 'fp32'} ({why})"
    print(line)
    return line


def build_trainer(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerFast,
    train_dataset: Dataset,
    eval_dataset: Dataset,
    training_args: TrainingArguments,
    byte_lengths: torch.LongTensor,
    max_eval_blocks: int = 64,
) -> tuple[Trainer, ThroughputCallback]:
    """A ``Trainer`` whose evaluation reports bits per byte, plus a callback that times the steps.

    ``train_dataset`` holds packed blocks (``pack_for_causal_lm``) or random windows
    (``RandomWindows``); the periodic evaluation uses the first ``max_eval_blocks`` of ``eval_dataset``.
    """
    check_tokenizer_matches_model(tokenizer, model)
    block_size = len(train_dataset[0]["input_ids"])
    throughput = ThroughputCallback(global_batch_size(training_args) * block_size)
    preprocess_logits_for_metrics, compute_metrics = trainer_metric_functions(byte_lengths)
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset.select(range(min(max_eval_blocks, len(eval_dataset)))),
        processing_class=tokenizer,
        data_collator=default_data_collator,
        compute_metrics=compute_metrics,
        preprocess_logits_for_metrics=preprocess_logits_for_metrics,
        callbacks=[throughput, RecordBatchLayout()],
    )
    return trainer, throughput


class RecordBatchLayout(TrainerCallback):
    """Write ``batch_layout.json`` into every checkpoint ``Trainer`` saves.

    ``Trainer`` records the per-device batch but neither the accumulation nor the number of
    processes, and resumes under any of them; with the layout recorded, ``parse_lesson_args``
    refuses a resume whose global batch differs (``hf_models.files.checkpoints``).
    """

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
            write_batch_layout(folder, batch_layout(args.per_device_train_batch_size, args.gradient_accumulation_steps, args.world_size))


def train_and_evaluate(
    model: torch.nn.Module, data: LessonData, training_args: TrainingArguments, data_args: DataArguments
) -> tuple[Trainer, dict]:
    """Train with ``Trainer``, then measure the whole held-out splits.

    Returns the trainer and the results: per-split metrics, training throughput and a ``training``
    summary for the model card.
    """
    trainer, throughput = build_trainer(
        model, data.tokenizer, data.train_dataset, data.eval_dataset, training_args, data.byte_lengths, data_args.max_eval_blocks
    )
    trainer.train(resume_from_checkpoint=checkpoint_to_resume(training_args.resume_from_checkpoint))
    results = evaluate_splits(model, data.tokenizer, data.corpus, data.byte_lengths, data_args.block_size, data_args.max_eval_tokens)
    args = training_args
    results.update(
        train_tokens_per_second=throughput.tokens_per_second,
        train_steps=trainer.state.global_step,
        parameters=model.num_parameters(),
        training={
            "parameters": f"{model.num_parameters():,}",
            "steps": trainer.state.global_step,
            "batch": f"{global_batch_size(args)} x {data_args.block_size} tokens",
            "optimizer": f"AdamW (betas {args.adam_beta1}, {args.adam_beta2}), lr {args.learning_rate}, warm-up "
            f"{args.warmup_steps} steps, {args.lr_scheduler_type} schedule, weight decay {args.weight_decay}, clip {args.max_grad_norm}",
            "training throughput": f"{throughput.tokens_per_second:,.0f} tokens/s on {args.world_size} process(es), {args.device.type}",
        },
    )
    return trainer, results
