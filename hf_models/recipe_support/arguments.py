"""Command-line arguments every recipe shares, as ``HfArgumentParser`` dataclasses, and their parser.

Each recipe adds its own ``ModelArguments`` dataclass and transformers' ``TrainingArguments``,
and sets its defaults with ``parse_lesson_args(..., defaults={...})``, so ``--help`` shows the
values the lesson actually runs with.

``parse_lesson_args`` also refuses, before any corpus is loaded or any step is taken, the values
that would otherwise fail minutes later with a message naming something the user never typed
(``num_samples``, a bare ``FileExistsError``): each error names the flag, the value and what is
allowed.

**Several processes.** ``accelerate launch --num_processes 2`` (or ``torchrun``) starts one copy
of the recipe per process and tells each its rank through the environment (``WORLD_SIZE``,
``RANK``). On a machine without a GPU, ``TrainingArguments`` joins them into one data-parallel
job only when asked to run on the CPU (``use_cpu``: accelerate then opens a ``gloo`` process
group); otherwise every copy trains its own model and they overwrite each other's output.
``parse_lesson_args`` sets ``use_cpu`` for such a launch and refuses one whose processes did not
join (:func:`check_launch`).
"""

from __future__ import annotations

import builtins
import logging
import os
import shlex
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import HfArgumentParser, TrainingArguments, set_seed

from ..files import batch_layout, check_batch_layout, lock_output_dir, resolve_checkpoint
from .validation import check_model_folder, validate_lesson_args

logger = logging.getLogger(__name__)


@dataclass
class DataArguments:
    dataset: str = field(
        default="shakespeare",
        metadata={
            "help": "A named corpus (shakespeare: 38 plays, offline; wikitext-2; text: local files via "
            "--data_files), a Hub dataset id, or a local dataset folder."
        },
    )
    data_files: list[str] | None = field(default=None, metadata={"help": "Local text files for --dataset text."})
    dataset_path: str | None = field(
        default=None, metadata={"help": "A local copy of a Hub dataset (e.g. wikitext) with the Hub repo's layout."}
    )
    text_column: str = field(default="text", metadata={"help": "The column that holds the text."})
    validation_fraction: float = field(
        default=0.1, metadata={"help": "Held-out fraction for corpora without a validation split."}
    )
    block_size: int = field(default=128, metadata={"help": "Training context: tokens per packed block."})
    max_eval_tokens: int | None = field(
        default=None, metadata={"help": "Evaluate held-out splits on their first N tokens only (default: all)."}
    )
    max_eval_blocks: int = field(
        default=64, metadata={"help": "Validation blocks used by the periodic evaluation during training."}
    )


@dataclass
class LessonArguments:
    model_name: str = field(default="", metadata={"help": "Name of the saved model (folder name and card title)."})
    card_copy: str | None = field(
        default=None,
        metadata={
            "help": "Also write the model card to this path. Unset by default: a run writes only under --output_dir "
            "(`make cards` copies the cards of finished runs into model_cards/)."
        },
    )
    sample_prompt: str = field(default="ROMEO:\n", metadata={"help": "Prompt for the generated sample."})
    sample_tokens: int = field(default=200, metadata={"help": "New tokens in the generated sample."})
    # Filled from TrainingArguments.push_to_hub by parse_lesson_args: the recipe pushes its finished
    # folder (weights, code, tokenizer, card) itself, so Trainer must not open a Hub repo of its own.
    push_to_hub: bool = field(default=False, init=False)


@dataclass
class DecoderArguments:
    """What the decoder lessons (4, 5) share; each recipe subclasses it with its own blocks' options."""

    tokenizer: str = field(default="auto", metadata={"help": "char, bpe, or auto (char for --dataset text, else bpe)."})
    vocab_size: int = field(default=2048, metadata={"help": "BPE vocabulary size."})
    sampling: str = field(default="random_windows", metadata={"help": "random_windows (nanoGPT) or blocks (packed)."})
    num_hidden_layers: int = field(default=4, metadata={"help": "Decoder layers."})
    num_attention_heads: int = field(default=4, metadata={"help": "Attention (query) heads."})
    hidden_size: int = field(default=192, metadata={"help": "Width of the residual stream."})
    dropout: float = field(default=0.0, metadata={"help": "Dropout on embeddings and residual branches."})
    export_for_serving: bool = field(
        default=True, metadata={"help": "Also save the model converted to GPT2LMHeadModel / LlamaForCausalLM."}
    )


def check_model_name(model_name: str) -> None:
    """Refuse a ``--model_name`` that is not one plain folder name.

    The model is saved to ``<output_dir>/<model_name>``, replacing what was there. ``.`` and ``""``
    would make that the output folder itself, ``..`` its parent, and ``/abs/path`` or ``a/b`` a
    folder elsewhere: the save would replace a folder the user never named as the model's.
    """
    parts = Path(model_name).parts
    if not model_name or model_name in (".", "..") or len(parts) != 1 or parts[0] != model_name or "\\" in model_name:
        raise ValueError(
            f"--model_name {model_name!r} is not allowed: it names the folder saved inside --output_dir, so it must "
            f"be one plain folder name: not empty, not '.' or '..', without '/' or '\\'."
        )


def checkpoint_to_resume(resume_from_checkpoint: str | None) -> str | bool | None:
    """``--resume_from_checkpoint`` as ``Trainer.train`` takes it: a folder, ``True`` (the latest
    ``checkpoint-*`` in ``--output_dir``) for ``true``, or ``None`` (start afresh) for ``false``."""
    if resume_from_checkpoint is None or resume_from_checkpoint.lower() in ("", "false"):
        return None
    return True if resume_from_checkpoint.lower() == "true" else resume_from_checkpoint


def check_resume(training_args: TrainingArguments) -> None:
    """Settle ``--resume_from_checkpoint`` before any work: a readable checkpoint, saved with this global batch.

    ``true`` becomes the newest checkpoint that reads back whole (a damaged newer one is skipped, with
    a warning); a named folder must read back whole. The checkpoint's recorded batch layout must be
    this run's (``hf_models.files.checkpoints``). The resolved folder replaces the flag's value.
    """
    requested = checkpoint_to_resume(training_args.resume_from_checkpoint)
    if requested is None:
        return
    folder = resolve_checkpoint(training_args.output_dir, requested)
    check_batch_layout(folder, batch_layout(
        training_args.per_device_train_batch_size, training_args.gradient_accumulation_steps, training_args.world_size))
    training_args.resume_from_checkpoint = str(folder)


def global_batch_size(training_args: TrainingArguments) -> int:
    """Sequences per optimizer step, over every process: per device x accumulation steps x processes.

    The one place the recipes, ``Trainer``'s set-up and lesson 7's loop compute it. Under
    ``accelerate launch --num_processes N`` each process reads ``per_device_train_batch_size``
    sequences per micro-batch, so a count that leaves out ``world_size`` (the number of processes)
    is the batch of one process only, ``N`` times too small.
    """
    return training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps * training_args.world_size


def launched_world_size() -> int:
    """How many processes the launcher started (``WORLD_SIZE``, set by ``accelerate launch`` and ``torchrun``)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def check_launch(training_args: TrainingArguments, fsdp_by_hand: bool = False) -> None:
    """Refuse a multi-process launch whose processes did not join one data-parallel job.

    Each process the launcher starts runs the whole recipe. If they do not form one process
    group, nothing fails: each trains its own model on its own copy of the data, and all of them
    write the same output folder. That happens on a CPU-only machine when ``TrainingArguments``
    is not told to use the CPU (``--use_cpu false``): accelerate looks for GPUs to spread the
    processes over, finds none, and falls back to one process per copy.

    FSDP and DeepSpeed configs are refused on CPU processes: accelerate 1.15 turns a job into FSDP
    or DeepSpeed only on accelerators (``AcceleratorState`` leaves a gloo ``MULTI_CPU`` job as it
    is), so the job would run as plain DDP, every process holding the whole model, while its
    config says the model is sharded. (torch itself can shard on CPUs: ``fully_shard`` over a
    ``"cpu"`` device mesh runs over gloo; it is accelerate that does not route a CPU job there.)
    For the same reason ``--fsdp`` is refused on CPUs, unless the recipe shards with its own loop
    (``fsdp_by_hand``: lesson 7's hand loop calls ``fully_shard`` itself).

    accelerate 1.15's own CPU launch (``--cpu`` or a ``MULTI_CPU`` config) starts several
    processes only through ``mpirun`` (``--mpirun_hostfile``); without it, it starts one and
    ignores ``--num_processes``. That trains one correct model, so it is only a warning.

    Raises:
        RuntimeError: ``WORLD_SIZE`` > 1 but ``training_args.world_size`` is 1, or an FSDP or
            DeepSpeed launch on CPU processes.
        ValueError: ``--fsdp`` on CPUs for ``Trainer``.
    """
    launched = launched_world_size()
    if launched > 1 and training_args.world_size != launched:
        raise RuntimeError(
            f"The launcher started {launched} processes (WORLD_SIZE={launched}), but they did not join one "
            f"data-parallel job (TrainingArguments.world_size={training_args.world_size}): each would train a "
            f"separate model and overwrite the same --output_dir. On a machine without a GPU, drop "
            f"--use_cpu false (the recipes set --use_cpu true for a multi-process launch, so that the "
            f"processes join over gloo); on GPUs, check that every process sees one."
        )
    sharded = [name for name in ("FSDP", "DEEPSPEED") if os.environ.get(f"ACCELERATE_USE_{name}", "").lower() == "true"]
    if launched > 1 and training_args.use_cpu and sharded:
        raise RuntimeError(
            f"This launch asks for {sharded[0].replace('DEEPSPEED', 'DeepSpeed')} on CPU processes (--use_cpu true), "
            f"which accelerate 1.15 does not do: it would silently run plain DDP instead. Launch on GPUs, or use "
            f"recipes/configs/multi_cpu.yaml for data-parallel training on CPUs."
        )
    if training_args.fsdp and training_args.use_cpu and not fsdp_by_hand:
        raise ValueError(
            "--fsdp asks Trainer for FSDP, and this run is on CPUs (--use_cpu true), where accelerate 1.15 does not "
            "shard. Allowed here: no --fsdp (data parallel over gloo), or lesson 7's hand loop, which shards on CPUs: "
            "torchrun --nproc_per_node 2 recipes/07_training.py --fsdp full_shard --skip_comparison true."
        )
    asked_for_several = os.environ.get("ACCELERATE_USE_CPU", "").lower() == "true" and "MASTER_PORT" in os.environ
    if launched == 1 and asked_for_several and "PMI_SIZE" not in os.environ and "OMPI_COMM_WORLD_SIZE" not in os.environ:
        logger.warning(
            "accelerate launch --cpu started a single process: without --mpirun_hostfile, accelerate's CPU "
            "launcher ignores --num_processes. For data-parallel training on CPU processes, launch with "
            "--config_file recipes/configs/multi_cpu.yaml (torchrun, gloo)."
        )


# In a Jupyter kernel (a recipe opened as a notebook) sys.argv is the kernel's own; the flags come from here.
NOTEBOOK_ARGS_VARIABLE = "HF_MODELS_RECIPE_ARGS"


def in_notebook() -> bool:
    """True inside IPython or Jupyter (IPython sets ``__IPYTHON__`` in builtins), where ``sys.argv`` is not the user's."""
    return bool(getattr(builtins, "__IPYTHON__", False))


def recipe_argv() -> list[str] | None:
    """The recipe's flags: ``None`` for a script (``HfArgumentParser`` reads ``sys.argv``); in a notebook, the
    shell-quoted words of ``$HF_MODELS_RECIPE_ARGS`` (empty: the lesson's defaults), so the same file runs both ways."""
    return shlex.split(os.environ.get(NOTEBOOK_ARGS_VARIABLE, "")) if in_notebook() else None


def parse_lesson_args(
    model_arguments_type: type, defaults: dict, args: list[str] | None = None,
    check_fsdp: Callable[[Any, TrainingArguments], None] | None = None,
) -> tuple[Any, DataArguments, LessonArguments, TrainingArguments]:
    """Parse ``(model args, DataArguments, LessonArguments, TrainingArguments)`` with the recipe's defaults.

    ``defaults`` may set fields of any of the four dataclasses (``HfArgumentParser`` shares one
    namespace). The training side is set up for lessons: no reporting integrations, no
    checkpoints (the lesson saves its finished folder itself), evaluation every ``eval_steps``.
    ``--save_strategy steps --save_steps N`` turns checkpoints on, and ``--resume_from_checkpoint``
    (a checkpoint folder, or ``true`` for the latest one in ``--output_dir``) continues from one
    (:func:`check_resume`). A recipe that names its model (``model_name`` in ``defaults``) gets
    ``--model_name`` checked (:func:`check_model_name`). The first process then locks
    ``--output_dir`` (``hf_models.files.lock_output_dir``), so that a second run on it fails at once.
    A model-arguments type with a ``sampling`` field (the decoder lessons) decides how
    ``--max_steps`` is checked; the others train on packed blocks. Seeds everything with ``--seed``.

    On a machine without an accelerator ``--use_cpu`` defaults to true: several launched processes
    then join one data-parallel job over gloo (see the module docstring), and ``--bf16`` autocasts on the CPU.
    ``--fsdp`` is ``Trainer``'s flag, refused on CPUs (:func:`check_launch`); a recipe that shards with its
    own loop (lesson 7) passes ``check_fsdp(model_args, training_args)``, its own check of the flag.

    Raises:
        ValueError: a flag that cannot work, naming it, its value and what is allowed
            (:func:`check_model_name`, :func:`check_resume` and ``validation.validate_lesson_args``:
            counts, learning rate, steps and epochs, an ``--output_dir`` that is a file or cannot be
            written).
        RuntimeError: a multi-process launch whose processes would train separately (:func:`check_launch`),
            or another run holding ``--output_dir``.
    """
    parser = HfArgumentParser((model_arguments_type, DataArguments, LessonArguments, TrainingArguments))
    parser.set_defaults(
        report_to="none", save_strategy="no", eval_strategy="steps", logging_first_step=True,
        dataloader_pin_memory=torch.cuda.is_available(),
        # Every parameter of a lesson's model gets a gradient at every step, so DDP need not walk
        # the autograd graph looking for unused ones (transformers' default for a model without
        # gradient checkpointing); a model that broke this would fail loudly at its second step.
        ddp_find_unused_parameters=False,
        # The periodic evaluation's targets. Trainer would otherwise take every forward argument
        # named like a label, and the random windows' pre-shifted ``shift_labels`` are the same
        # targets again, not a second set.
        label_names=["labels"],
        # Without an accelerator, say so: bf16 autocast on CPU and gloo DDP both need use_cpu.
        use_cpu=not torch.accelerator.is_available(),
        **defaults,
    )
    model_args, data_args, lesson_args, training_args = parser.parse_args_into_dataclasses(args=args if args is not None else recipe_argv())
    if "model_name" in defaults:  # the recipe saves a model folder named by it
        check_model_name(lesson_args.model_name)
    validate_lesson_args(model_args, data_args, lesson_args, training_args)
    check_launch(training_args, fsdp_by_hand=check_fsdp is not None)
    if check_fsdp is not None and training_args.fsdp:
        check_fsdp(model_args, training_args)
    check_resume(training_args)
    if training_args.process_index == 0:
        lock_output_dir(training_args.output_dir)
    lesson_args.push_to_hub, training_args.push_to_hub = training_args.push_to_hub, False
    set_seed(training_args.seed)
    return model_args, data_args, lesson_args, training_args


_NOT_GIVEN = object()


def flags_given(model_arguments_type: type, names: list[str], args: list[str] | None = None) -> list[str]:
    """Which of ``names`` (fields of the four argument dataclasses) the command line sets, whatever their value.

    Comparing a parsed value with its default cannot tell ``--hidden_size 192`` from no flag at all. So the
    same parser is run again with those defaults replaced by a marker; a field that no longer holds it was
    given. argparse's own rules apply (``--hidden-size``, ``--hidden_size=64``, unambiguous abbreviations).
    """
    parser = HfArgumentParser((model_arguments_type, DataArguments, LessonArguments, TrainingArguments))
    parser.set_defaults(**{name: _NOT_GIVEN for name in names})
    parsed, _ = parser.parse_known_args(args=args if args is not None else recipe_argv())
    return [name for name in names if getattr(parsed, name) is not _NOT_GIVEN]


def find_model_folder(path: str, flag: str, recipe: str) -> Path:
    """The saved model a fine-tuning lesson starts from: ``path`` itself when it holds ``config.json``,
    else its one sub-folder that does (a run folder such as ``runs/05_modern_gpt``).

    The folder is then checked (:func:`~.validation.check_model_folder`): weights present and whole,
    a tokenizer beside them.

    Raises:
        ValueError: no model there (naming ``flag`` and the ``recipe`` that writes one), several, or a
            model folder with a file missing or cut short (naming the file).
    """
    folder = Path(path)
    if (folder / "config.json").exists():
        return check_model_folder(folder, flag)
    candidates = sorted(p.parent for p in folder.glob("*/config.json")) if folder.is_dir() else []
    if len(candidates) == 1:
        return check_model_folder(candidates[0], flag)
    several = f", but several: {[str(c) for c in candidates]}" if candidates else ""
    raise ValueError(
        f"{flag} {path!r} holds no model folder (a folder with config.json){several}. "
        f"Run `python {recipe}` first, or pass {flag} with a saved model folder."
    )
