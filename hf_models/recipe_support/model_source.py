"""The model a lesson starts from: a zoo folder, or a stock checkpoint converted into one.

Lessons 6, 8, 9 and 11 start from a saved model (``--model_folder``, ``--base_model``, ``--model``,
``--sft_model``). Each takes either a folder a zoo recipe saved or a stock transformers checkpoint: a
local folder whose config.json says ``gpt2``, ``llama``, ``qwen2`` or ``mixtral``, or a Hub id.
A stock checkpoint is loaded into the zoo's own class (``hf_models.conversion.stock``; what it
cannot compute exactly is refused by name) and saved once, with its own tokenizer, as a zoo folder
under ``<output_dir>/converted/``; from there the lesson reads it as it reads any zoo folder, so
every later step (``from_pretrained``, trl rebuilding a reference model from the folder, peft's
adapter config) sees the zoo model. Tables and cards name the start by what it is.

A lesson that can only start from one kind of model (lesson 10 continues pretraining a mixture of
experts) passes ``model_types``: the ``model_type`` of the folder, or of the stock config, is read
first (a config file, no weights) and anything else refused, naming the flag, the value and the
types allowed, before a checkpoint is converted or any data is prepared.

A mixture of experts keeps its experts as 3-D weights (lesson 10), which LoRA reaches only through
``target_parameters`` and bitsandbytes does not quantize: :func:`expert_weights` names them in a
model, :func:`source_expert_weights` in the model a flag names, from its config alone.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from ..conversion.stock import describe_source, folder_model_type, is_stock_checkpoint, load_stock_checkpoint, looks_like_hub_id
from ..files import save_folder_atomically
from ..tokenization import tokenizer_for_saving
from .arguments import find_model_folder
from .validation import check_model_folder


@dataclass(frozen=True)
class ModelSource:
    """A zoo folder to read, and what it is in words (``"llama checkpoint SmolLM2-135M"``, ``"zoo_modern folder ..."``)."""

    folder: Path
    description: str


def describe_zoo_folder(folder: Path) -> str:
    """``"zoo_modern folder modern-gpt-shakespeare"``, plus the stock checkpoint it started from, where it did."""
    config = json.loads((folder / "config.json").read_text())
    origin = describe_source(config)
    return f"{config.get('model_type')} folder {folder.name}" + (f", from {origin}" if origin else "")


def converted_folder(name_or_path: str, output_dir: str | os.PathLike) -> Path:
    """Where :func:`convert_stock_checkpoint` saves ``name_or_path``: ``<output_dir>/converted/<name>``."""
    name = re.sub(r"[^\w.-]+", "-", name_or_path if looks_like_hub_id(name_or_path) else Path(name_or_path).name)
    return Path(output_dir) / "converted" / name


def convert_stock_checkpoint(name_or_path: str, output_dir: str | os.PathLike, convert: bool = True) -> Path:
    """Load a stock checkpoint into its zoo class and save it, with its tokenizer, under ``<output_dir>/converted/``."""
    if not convert:
        return check_model_folder(converted_folder(name_or_path, output_dir), "the converted base")
    model, tokenizer = load_stock_checkpoint(name_or_path)
    saved_tokenizer = tokenizer_for_saving(tokenizer, model)  # context, pad token, and the record in model.config

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        saved_tokenizer.save_pretrained(tmp)

    folder = save_folder_atomically(converted_folder(name_or_path, output_dir), write)
    print(f"{name_or_path}: {model.config.source_checkpoint['model_type']} checkpoint loaded as the zoo's "
          f"{type(model).__name__} ({model.num_parameters():,} parameters), saved to {folder}")
    return folder


def source_model_type(value: str, flag: str, recipe: str) -> str | None:
    """The ``model_type`` ``value`` names, read from a config alone: a zoo folder's (``zoo_moe``), a stock folder's or
    a Hub id's (``mixtral``). ``None`` for a Hub id the Hub cannot be asked about (offline): loading it fails later, by name."""
    path = Path(value)
    if path.exists() and not is_stock_checkpoint(path):
        return folder_model_type(find_model_folder(value, flag, recipe))
    if path.exists():
        return folder_model_type(path)
    if looks_like_hub_id(value):
        try:
            return AutoConfig.from_pretrained(value).model_type
        except (OSError, ValueError):  # not on the Hub, no network, HF_HUB_OFFLINE, or a model_type transformers lacks
            return None
    return folder_model_type(find_model_folder(value, flag, recipe))  # raises, naming the recipe that writes one


def check_source_model_type(value: str, flag: str, recipe: str, model_types: tuple[str, ...]) -> None:
    """Refuse ``value`` unless its ``model_type`` is one of ``model_types`` (see :func:`source_model_type`)."""
    kind = source_model_type(value, flag, recipe)
    if kind is not None and kind not in model_types:
        raise ValueError(
            f"{flag} {value!r} is a {kind!r} model; this lesson starts only from one of model_type {list(model_types)}: "
            f"a folder `python {recipe}` saved, or a stock checkpoint of that family (a folder or a Hub id)."
        )


def expert_weights(model: nn.Module) -> list[str]:
    """The full names of ``model``'s expert weights: the 3-D parameters (E, out, in) of its ``experts`` modules
    (lesson 10's ``MoEExperts``, transformers' ``MixtralExperts``: ``gate_up_proj``, ``down_proj``). Empty for a dense model."""
    return [name for name, parameter in model.named_parameters() if parameter.dim() == 3 and name.rpartition(".")[0].endswith("experts")]


def source_expert_weights(value: str, flag: str, recipe: str) -> list[str] | None:
    """:func:`expert_weights` of the model ``value`` names (a zoo folder, a stock folder or a Hub id), read from its config
    alone: the model is built on the meta device, so no weight is read and nothing is converted. ``None`` for a Hub id
    the Hub cannot be asked about (offline)."""
    path = Path(value)
    if path.exists():
        source = path if is_stock_checkpoint(path) else find_model_folder(value, flag, recipe)
    elif looks_like_hub_id(value):
        source = value
    else:
        source = find_model_folder(value, flag, recipe)  # raises, naming the recipe that writes one
    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError):  # not on the Hub, no network, HF_HUB_OFFLINE
        return None
    with torch.device("meta"):
        return expert_weights(AutoModelForCausalLM.from_config(config))


def resolve_model_source(value: str, flag: str, recipe: str, output_dir: str | os.PathLike, convert: bool = True,
                         model_types: tuple[str, ...] | None = None) -> ModelSource:
    """The zoo folder ``value`` names (see the module docstring), checked, with its description.

    ``convert=False`` (the other processes of a launch, after the first converted) reads the folder the
    first process saved instead of converting again. ``model_types`` (zoo and stock ``model_type`` names,
    e.g. ``("zoo_moe", "mixtral")``) limits what is accepted; ``None`` accepts every model.

    Raises:
        ValueError: no model there (naming ``flag`` and the ``recipe`` that writes one), a model of a type
            not in ``model_types``, a folder with a file missing, or a stock config the zoo does not compute
            exactly (naming the field).
    """
    if model_types is not None:
        check_source_model_type(value, flag, recipe, model_types)  # before anything is converted
    path = Path(value)
    if path.exists() and not is_stock_checkpoint(path):
        folder = find_model_folder(value, flag, recipe)
        return ModelSource(folder, describe_zoo_folder(folder))
    if path.exists():
        check_model_folder(path, flag)  # weights whole, a tokenizer beside them
        kind = folder_model_type(path)
        return ModelSource(convert_stock_checkpoint(value, output_dir, convert), f"{kind} checkpoint {path.name}")
    if looks_like_hub_id(value):
        try:
            folder = convert_stock_checkpoint(value, output_dir, convert)
        except OSError as error:  # not on the Hub, no network, or HF_HUB_OFFLINE
            raise ValueError(
                f"{flag} {value!r} is not a local folder (a zoo model: run `python {recipe}` first) and could not be "
                f"loaded from the Hub as a stock checkpoint ({error})."
            ) from error
        return ModelSource(folder, describe_source(json.loads((folder / "config.json").read_text())))
    folder = find_model_folder(value, flag, recipe)  # raises, naming the recipe that writes one
    return ModelSource(folder, describe_zoo_folder(folder))


def resolve_training_model_source(value: str, flag: str, recipe: str, training_args,
                                  model_types: tuple[str, ...] | None = None) -> ModelSource:
    """:func:`resolve_model_source` for a lesson that may run as several processes (``accelerate launch``): a stock
    checkpoint is converted by the first process of each machine while the others wait, then read by all."""
    output_dir = training_args.output_dir
    if not is_stock_checkpoint(value):
        return resolve_model_source(value, flag, recipe, output_dir, model_types=model_types)
    with training_args.main_process_first(desc="converting the stock checkpoint"):
        return resolve_model_source(value, flag, recipe, output_dir, convert=training_args.local_process_index == 0,
                                    model_types=model_types)


__all__ = ["check_source_model_type", "resolve_training_model_source", "ModelSource", "convert_stock_checkpoint", "converted_folder", "describe_zoo_folder",
           "expert_weights", "resolve_model_source", "source_expert_weights", "source_model_type"]
