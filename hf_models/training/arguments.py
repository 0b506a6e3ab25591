"""Command-line arguments every recipe shares, as ``HfArgumentParser`` dataclasses, and their parser.

Each recipe adds its own ``ModelArguments`` dataclass and transformers' ``TrainingArguments``,
and sets its defaults with ``parse_lesson_args(..., defaults={...})``, so ``--help`` shows the
values the lesson actually runs with.

``parse_lesson_args`` also refuses, before any corpus is loaded or any step is taken, the values
that would otherwise fail minutes later with a message naming something the user never typed
(``num_samples``, a bare ``FileExistsError``): each error names the flag, the value and what is
allowed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import HfArgumentParser, TrainingArguments, set_seed


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
    card_copy: str = field(
        default="",
        metadata={"help": "Also write the model card to this path (the recipes default to model_cards/<model>.md)."},
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


def check_max_steps(max_steps: int, sampling: str) -> None:
    """Refuse a ``--max_steps`` that trains nothing or that the sampling mode cannot honour.

    transformers reads ``max_steps <= 0`` as "train for ``num_train_epochs`` instead", and its
    default is -1. That is meaningful for packed ``blocks`` (an epoch is one pass over them), so
    ``-1`` stays allowed there. ``random_windows`` draws ``max_steps`` x global batch windows up
    front and has no epoch to count, so it needs a positive number of steps. ``0`` or any other
    negative value is always a mistake: Trainer would silently train for epochs instead.
    """
    if sampling == "random_windows":
        if not isinstance(max_steps, int) or max_steps <= 0:
            raise ValueError(
                f"--max_steps {max_steps} cannot be used with --sampling random_windows: the training set is "
                f"max_steps x global batch random windows, so --max_steps must be a positive integer."
            )
    elif not isinstance(max_steps, int) or (max_steps <= 0 and max_steps != -1):
        raise ValueError(
            f"--max_steps {max_steps} is not allowed: pass a positive integer (the number of optimizer steps), "
            f"or -1 to train for --num_train_epochs passes over the packed blocks."
        )


def check_output_dir(output_dir: str) -> None:
    """Refuse an ``--output_dir`` that is, or lies under, an existing file.

    The folder itself is created when the lesson saves; what cannot work is a path whose nearest
    existing part is a file (``mkdir`` would fail with a bare ``FileExistsError`` after training).
    """
    path = Path(output_dir).expanduser()
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        where = "is a file" if existing == path else f"lies under {str(existing)!r}, which is a file"
        raise ValueError(
            f"--output_dir {output_dir!r} {where}: it must be a folder, either existing or one that can be "
            f"created (runs/<lesson> by default)."
        )


def parse_lesson_args(
    model_arguments_type: type, defaults: dict, args: list[str] | None = None
) -> tuple[Any, DataArguments, LessonArguments, TrainingArguments]:
    """Parse ``(model args, DataArguments, LessonArguments, TrainingArguments)`` with the recipe's defaults.

    ``defaults`` may set fields of any of the four dataclasses (``HfArgumentParser`` shares one
    namespace). The training side is set up for lessons: no reporting integrations, no
    checkpoints (the lesson saves its finished folder itself), evaluation every ``eval_steps``.
    A model-arguments type with a ``sampling`` field (the decoder lessons) decides how
    ``--max_steps`` is checked; the others train on packed blocks. Seeds everything with ``--seed``.

    Raises:
        ValueError: ``--max_steps`` or ``--output_dir`` that cannot work (see :func:`check_max_steps`
            and :func:`check_output_dir`).
    """
    parser = HfArgumentParser((model_arguments_type, DataArguments, LessonArguments, TrainingArguments))
    parser.set_defaults(
        report_to="none", save_strategy="no", eval_strategy="steps", logging_first_step=True,
        dataloader_pin_memory=torch.cuda.is_available(), **defaults,
    )
    model_args, data_args, lesson_args, training_args = parser.parse_args_into_dataclasses(args=args)
    check_max_steps(training_args.max_steps, getattr(model_args, "sampling", "blocks"))
    check_output_dir(training_args.output_dir)
    lesson_args.push_to_hub, training_args.push_to_hub = training_args.push_to_hub, False
    set_seed(training_args.seed)
    return model_args, data_args, lesson_args, training_args
