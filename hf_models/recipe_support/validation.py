"""Every mistake named before the first step: the checks a recipe runs on its flags and folders.

A lesson trains for minutes, then evaluates, saves and samples. A flag that cannot work must fail
*before* training, with a message that names the flag, the value given and what is allowed, not
minutes later with a message about something the user never typed (``num_samples``, a reshape,
torch's optimizer, a bare ``OSError`` at the save). :func:`validate_lesson_args` runs from
``parse_lesson_args``, so every recipe gets these checks; the lessons that load a saved model
check the folder with :func:`check_model_folder` before reading it.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from pathlib import Path
from typing import Any

# Flags that count things, and the smallest value that works. Each is checked on whichever of a
# recipe's argument dataclasses has the field.
SMALLEST_ALLOWED = {
    "per_device_train_batch_size": (1, "sequences per device in each micro-batch"),
    "per_device_eval_batch_size": (1, "sequences per device in each evaluation batch"),
    "gradient_accumulation_steps": (1, "micro-batches per optimizer step"),
    "block_size": (1, "tokens per training block"),
    "max_eval_blocks": (1, "validation blocks of the periodic evaluation"),
    "max_eval_tokens": (2, "held-out tokens evaluated: one prediction needs an input token and its target; leave it "
                           "out to evaluate whole splits"),
    "sample_tokens": (0, "new tokens in the generated sample"),
}


def check_max_steps(max_steps: int, sampling: str, num_train_epochs: float | None = None) -> None:
    """Refuse a ``--max_steps`` (with ``--num_train_epochs``) that trains nothing or that the sampling mode cannot honour.

    transformers reads ``max_steps <= 0`` as "train for ``num_train_epochs`` instead", and its
    default is -1. That is meaningful for packed ``blocks`` (an epoch is one pass over them), so
    ``-1`` stays allowed there, with a positive ``--num_train_epochs`` (0 epochs would save an
    untrained model and exit 0). ``random_windows`` draws ``max_steps`` x global batch windows up
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
    elif max_steps == -1 and num_train_epochs is not None and not num_train_epochs > 0:
        raise ValueError(
            f"--max_steps -1 --num_train_epochs {num_train_epochs:g} trains nothing: with --max_steps -1, "
            f"--num_train_epochs must be a positive number of passes over the training blocks (or pass a positive --max_steps)."
        )


def check_counts(*argument_objects: Any) -> None:
    """Refuse a count below what works (:data:`SMALLEST_ALLOWED`) and a learning rate that is not positive."""
    for arguments in argument_objects:
        for name, (smallest, meaning) in SMALLEST_ALLOWED.items():
            value = getattr(arguments, name, None)
            if value is not None and value < smallest:
                raise ValueError(f"--{name} {value} is not allowed: it is the {meaning}, so it must be at least {smallest}.")
        rate = getattr(arguments, "learning_rate", None)
        if rate is not None and not rate > 0:
            raise ValueError(f"--learning_rate {rate:g} is not allowed: the optimizer's step size must be a positive number (e.g. 1e-3).")


def check_output_dir_writable(output_dir: str, flag: str = "--output_dir") -> None:
    """Refuse now an ``output_dir`` the lesson cannot save into, not with a bare ``OSError`` after training
    (when the trained model would be lost): a path that is, or lies under, a file, or a folder that
    cannot be written.

    The probe is a uniquely named folder made and removed in the nearest part of the path that exists
    (the output folder itself, or the parent that would hold it). Nothing is created along the way, so a
    run refused later (by a launch check) leaves no empty output folder, and the processes of one launch,
    which all run this check, cannot race over a folder one of them made.
    """
    path = Path(output_dir).expanduser()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():  # mkdir would fail with a bare FileExistsError after training
        where = "is a file" if existing == path else f"lies under {str(existing)!r}, which is a file"
        raise ValueError(
            f"{flag} {output_dir!r} {where}: it must be a folder, either existing or one that can be created."
        )
    try:
        os.rmdir(tempfile.mkdtemp(dir=existing, prefix=".write-check-"))
    except OSError as error:
        raise ValueError(
            f"{flag} {output_dir!r} cannot be written ({error.strerror or error}): the lesson saves its model, "
            f"results and plots there. Pass a folder you can write to."
        ) from error


def validate_lesson_args(model_args: Any, data_args: Any, lesson_args: Any, training_args: Any) -> None:
    """All of the above, on the four dataclasses ``parse_lesson_args`` returns, before any data is loaded."""
    check_counts(model_args, data_args, lesson_args, training_args)
    check_max_steps(training_args.max_steps, getattr(model_args, "sampling", "blocks"), training_args.num_train_epochs)
    check_output_dir_writable(training_args.output_dir)


def check_sample_prompt_fits(tokenizer: Any, prompt: str, context: int) -> None:
    """Refuse a ``--sample_prompt`` that fills the model's context (``--block_size``): the sample,
    generated from the saved folder after training, would have no room for a single new token."""
    if not prompt:
        return
    length = len(tokenizer(prompt)["input_ids"])
    if length >= context:
        raise ValueError(
            f"--sample_prompt {prompt!r} is {length} tokens, and --block_size {context} (the model's context) leaves no room "
            f"to generate after it: pass a --block_size above {length} or a shorter --sample_prompt."
        )


# ----------------------------------------------------------------------------- saved model folders

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def check_safetensors(path: Path) -> None:
    """Refuse a ``.safetensors`` file whose header or tensors are cut short (an interrupted copy or download),
    naming the file; safetensors' own error names neither the file nor what is missing."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise ValueError(f"{str(path)!r} is truncated: {size} bytes, not even the 8-byte header length of a safetensors file.")
        header_length = struct.unpack("<Q", prefix)[0]
        if 8 + header_length > size:
            raise ValueError(f"{str(path)!r} is truncated: its header says {header_length} bytes, the file has {size}.")
        try:
            header = json.loads(handle.read(header_length))
        except ValueError as error:
            raise ValueError(f"{str(path)!r} is not a readable safetensors file: its header is not JSON ({error}).") from error
    end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
    if 8 + header_length + end > size:
        raise ValueError(
            f"{str(path)!r} is truncated: its tensors need {8 + header_length + end} bytes, the file has {size}. "
            f"Copy or save the model again."
        )


def check_model_folder(folder: str | os.PathLike, flag: str, tokenizer: bool = True) -> Path:
    """Refuse a folder ``from_pretrained`` cannot load a model (and, if ``tokenizer``, its tokenizer) from,
    naming ``flag``, the folder and the missing or damaged file.

    transformers' own messages name other things: a folder without ``config.json`` reads as a
    missing ``model_type`` key, one without a tokenizer as a ``sentencepiece`` error, a truncated
    safetensors file as a bare deserializing error.
    """
    path = Path(folder)
    if not path.is_dir():
        raise ValueError(f"{flag} {str(folder)!r} is not a folder{'' if not path.exists() else ' (it is a file)'}: pass a saved model folder.")
    config = path / "config.json"
    if not config.is_file():
        raise ValueError(f"{flag} {str(folder)!r} holds no model: config.json is missing (a saved model folder has config.json and its weights).")
    try:
        model_type = json.loads(config.read_text()).get("model_type")
    except ValueError as error:
        raise ValueError(f"{flag} {str(folder)!r}: config.json is not valid JSON ({error}).") from error
    if not model_type:
        raise ValueError(f"{flag} {str(folder)!r}: config.json has no model_type, so transformers cannot tell which model to build.")
    weights = [path / name for name in WEIGHT_FILES if (path / name).is_file()]
    if not weights:
        raise ValueError(f"{flag} {str(folder)!r} holds config.json but no weights: none of {list(WEIGHT_FILES)} is there.")
    if weights[0].name == "model.safetensors":
        check_safetensors(weights[0])
    if tokenizer and not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise ValueError(
            f"{flag} {str(folder)!r} holds a model but no tokenizer: neither of {list(TOKENIZER_FILES)} is there "
            f"(save the tokenizer with the model: tokenizer.save_pretrained(folder))."
        )
    return path


def lesson5_model_folder(path: str, default: str, flag: str) -> Path | None:
    """The folder lesson 6 (and its benchmark) times, checked; ``None`` (time random weights of lesson 5's
    size) only when ``path`` is the default and lesson 5 has not been run yet, which is said out loud."""
    if path == default and not Path(path).exists():
        print(f"{flag} {path!r} does not exist yet (python recipes/05_modern_gpt.py trains it): timing a randomly "
              f"initialised model of lesson 5's default size instead.")
        return None
    return check_model_folder(path, flag, tokenizer=False)
