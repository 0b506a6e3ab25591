"""Stock transformers checkpoints, loaded into the zoo's own decoders: most LLM work starts from a pretrained base.

A folder or Hub id of a GPT-2, Llama, Qwen2 or Mixtral checkpoint becomes the zoo model that computes
the same function, with the checkpoint's own tokenizer:

==============  ==========================================  ===========================================
model_type      transformers class                          zoo class
==============  ==========================================  ===========================================
``gpt2``        ``GPT2LMHeadModel``                         ``GPTForCausalLM`` (lesson 4)
``llama``       ``LlamaForCausalLM``                        ``ModernDecoderForCausalLM`` (lesson 5)
``qwen2``       ``Qwen2ForCausalLM`` (q/k/v biases)         ``ModernDecoderForCausalLM``, ``attention_bias``
``mixtral``     ``MixtralForCausalLM``                      ``MoEDecoderForCausalLM`` (lesson 10)
==============  ==========================================  ===========================================

The config is read first and translated field by field (``stock_configs.py``); anything the zoo does
not compute exactly (a YaRN rotary, a sliding window, another activation...) is refused by name
*before* the weights are read. The weights are then read by transformers' own class, as any user
reads them (a Hub id downloads through ``from_pretrained``; shards, bf16 files and Mixtral's
per-expert checkpoint layout are its business), and copied into the zoo model by the converters
beside this module. Both copies are in memory for a moment: about twice the model's fp32 size.

The zoo model's config records where it came from (``source_checkpoint``), so a folder saved after
fine-tuning still says which base it started from.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedConfig, PreTrainedModel

from .gpt2 import gpt2_to_gpt
from .llama import llama_to_modern
from .mixtral import mixtral_to_moe
from .stock_configs import STOCK_MODEL_TYPES, gpt_config_from_gpt2, modern_config_from_stock, moe_config_from_mixtral

SOURCE_CHECKPOINT = "source_checkpoint"
"""The zoo config attribute recording the stock checkpoint a model was converted from: ``{"model_type", "name_or_path"}``."""

# model_type -> (config translation that refuses what it cannot take, weight converter)
STOCK_CONVERTERS: dict[str, tuple[Callable[[PreTrainedConfig], PreTrainedConfig], Callable[[PreTrainedModel], PreTrainedModel]]] = {
    "gpt2": (gpt_config_from_gpt2, gpt2_to_gpt),
    "llama": (modern_config_from_stock, llama_to_modern),
    "qwen2": (modern_config_from_stock, llama_to_modern),
    "mixtral": (moe_config_from_mixtral, mixtral_to_moe),
}


def folder_model_type(folder: str | os.PathLike) -> str | None:
    """The ``model_type`` in a local folder's ``config.json``, or ``None`` where there is no readable one."""
    config = Path(folder) / "config.json"
    try:
        return json.loads(config.read_text()).get("model_type")
    except (OSError, ValueError):
        return None


def looks_like_hub_id(name: str) -> bool:
    """``owner/name`` with nothing else: the shape of a Hub model id (a local path that does not exist may share it)."""
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "~")) and " " not in name


def is_stock_checkpoint(name_or_path: str | os.PathLike) -> bool:
    """A local folder whose config.json names a stock family, or a Hub id (which only the Hub can tell more about)."""
    path = Path(name_or_path)
    if path.exists():
        return folder_model_type(path) in STOCK_MODEL_TYPES
    return looks_like_hub_id(str(name_or_path))


def check_stock_config(config: PreTrainedConfig) -> PreTrainedConfig:
    """The zoo config a stock config translates to; a ValueError naming every field that keeps it from loading exactly."""
    if config.model_type not in STOCK_CONVERTERS:
        raise ValueError(
            f"model_type {config.model_type!r} is not a stock family the zoo loads; allowed: {list(STOCK_MODEL_TYPES)} "
            f"(or a folder saved by a zoo recipe)."
        )
    translate, _ = STOCK_CONVERTERS[config.model_type]
    return translate(config)


def load_stock_checkpoint(name_or_path: str | os.PathLike, dtype: torch.dtype = torch.float32):
    """``(zoo model, tokenizer)`` from a stock checkpoint: a local folder or a Hub id.

    The zoo model computes transformers' own logits on the same weights (fp32, to 1e-5; tested per
    family). ``dtype`` is what the weights are read as; fp32 by default, since the lessons train on
    CPUs, where bf16 checkpoints (most on the Hub) are slower and lose precision in the optimizer.

    Raises:
        ValueError: the config is not a stock family, or asks for what the zoo does not compute
            exactly (naming each field and value), before any weight is read.
    """
    source = str(name_or_path)
    config = AutoConfig.from_pretrained(source)
    check_stock_config(config)  # refuse before reading the weights
    _, convert = STOCK_CONVERTERS[config.model_type]
    stock = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    model = convert(stock.eval())
    del stock
    setattr(model.config, SOURCE_CHECKPOINT, {"model_type": config.model_type, "name_or_path": source})
    tokenizer = AutoTokenizer.from_pretrained(source)
    return model, tokenizer


def describe_source(config: PreTrainedConfig | dict) -> str | None:
    """``"llama checkpoint SmolLM2-135M"`` for a model converted from a stock checkpoint, else ``None``."""
    record = config.get(SOURCE_CHECKPOINT) if isinstance(config, dict) else getattr(config, SOURCE_CHECKPOINT, None)
    if not record:
        return None
    name = record["name_or_path"]
    return f"{record['model_type']} checkpoint {name if looks_like_hub_id(name) else Path(name).name}"


__all__ = [
    "SOURCE_CHECKPOINT", "STOCK_CONVERTERS", "STOCK_MODEL_TYPES", "check_stock_config", "describe_source", "folder_model_type",
    "is_stock_checkpoint", "load_stock_checkpoint", "looks_like_hub_id",
]
