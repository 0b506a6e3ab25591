"""Export a trained zoo decoder as a plain transformers folder that needs no remote code."""

from __future__ import annotations

import os
from pathlib import Path

from ..modeling_gpt import GPTForCausalLM
from ..modeling_modern import ModernDecoderForCausalLM
from ..files import save_folder_atomically
from .gpt2 import gpt_to_gpt2
from .llama import modern_to_llama


def export_for_serving(model, tokenizer, folder: str | os.PathLike) -> Path:
    """Save ``model`` converted to ``GPT2LMHeadModel`` / ``LlamaForCausalLM``, with its tokenizer."""
    if isinstance(model, GPTForCausalLM):
        exported = gpt_to_gpt2(model)
    elif isinstance(model, ModernDecoderForCausalLM):
        exported = modern_to_llama(model)
    else:
        raise TypeError(f"export_for_serving takes a GPTForCausalLM or ModernDecoderForCausalLM, got {type(model).__name__}.")

    def write(tmp: Path) -> None:
        exported.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return save_folder_atomically(folder, write)
