"""Export a trained zoo decoder as a plain transformers folder that needs no remote code."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from torch import nn
from transformers import PreTrainedModel

from ..files import save_folder_atomically
from ..modeling_configurable import ConfigurableDecoderForCausalLM
from ..modeling_gpt import GPTForCausalLM
from ..modeling_modern import ModernDecoderForCausalLM
from ..modeling_moe import MoEDecoderForCausalLM
from ..tokenization import tokenizer_for_saving
from .configurable import to_dedicated
from .gpt2 import gpt_to_gpt2
from .llama import modern_to_llama
from .mixtral import moe_to_mixtral

# zoo model class -> converter to the transformers class that serves it. A new exportable model
# joins by adding its line.
SERVING_CONVERTERS: dict[type[nn.Module], Callable[[nn.Module], PreTrainedModel]] = {
    GPTForCausalLM: gpt_to_gpt2,
    ModernDecoderForCausalLM: modern_to_llama,
    MoEDecoderForCausalLM: moe_to_mixtral,
}


def export_for_serving(model: nn.Module, tokenizer, folder: str | os.PathLike) -> Path:
    """Save ``model`` converted to its transformers twin (``GPT2LMHeadModel``, ``LlamaForCausalLM``), with its tokenizer.

    The saved tokenizer's ``model_max_length`` is the model's context, so a server truncates where
    the model stops; ``tokenizer`` itself is not changed.
    """
    if isinstance(model, ConfigurableDecoderForCausalLM):
        model = to_dedicated(model)  # a preset: the GPT, modern or MoE decoder it is (else the error names what differs)
    converter = SERVING_CONVERTERS.get(type(model))
    if converter is None:
        raise TypeError(
            f"export_for_serving takes one of {sorted(cls.__name__ for cls in SERVING_CONVERTERS)}, got {type(model).__name__}."
        )
    exported = converter(model)
    saved_tokenizer = tokenizer_for_saving(tokenizer, model)

    def write(tmp: Path) -> None:
        exported.save_pretrained(tmp)
        saved_tokenizer.save_pretrained(tmp)

    return save_folder_atomically(folder, write)
