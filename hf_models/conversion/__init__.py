"""Weight converters between the zoo's decoders and transformers' own model classes.

Converting both ways, with logits that match to 1e-5, is the proof that the hand-written decoder is
the architecture it claims to be; exporting to a plain ``GPT2LMHeadModel`` / ``LlamaForCausalLM``
folder lets any tool that serves those architectures serve what a lesson trained, no remote code.
``stock.py`` goes the other way for a whole checkpoint: a GPT-2, Llama, Qwen2 or Mixtral folder or Hub
id loads as the zoo model that computes it, with its tokenizer, or is refused field by field.
"""

from .configurable import configurable_config_from, convert_folder, dedicated_config_from, to_configurable, to_dedicated
from .export import SERVING_CONVERTERS, export_for_serving
from .gpt2 import gpt2_to_gpt, gpt_to_gpt2
from .llama import llama_to_modern, modern_to_llama
from .mixtral import mixtral_to_moe, moe_to_mixtral
from .stock import STOCK_MODEL_TYPES, describe_source, is_stock_checkpoint, load_stock_checkpoint

__all__ = [
    "SERVING_CONVERTERS", "configurable_config_from", "convert_folder", "dedicated_config_from", "export_for_serving", "gpt2_to_gpt", "gpt_to_gpt2", "llama_to_modern", "mixtral_to_moe", "modern_to_llama",
    "moe_to_mixtral", "to_configurable", "to_dedicated", "STOCK_MODEL_TYPES", "describe_source", "is_stock_checkpoint",
    "load_stock_checkpoint",
]
