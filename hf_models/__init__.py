"""hf_models: a Hugging Face native LLM zoo, built from scratch one lesson at a time.

``import hf_models`` registers every model of the zoo with transformers' ``Auto*`` classes, so
``AutoConfig``, ``AutoModelForCausalLM``, ``AutoTokenizer`` and ``pipeline`` resolve our model
types like any built-in one. Each model class is also registered for ``trust_remote_code``: a
folder saved with ``save_pretrained`` carries its modeling files and an ``auto_map``, so it loads
on a machine where ``hf_models`` is not installed, as it would from the Hub.

Layout. Each lesson's model is whole in its own ``modeling_<name>.py`` (blocks, ``<Name>Model``,
``<Name>ForCausalLM``) beside its ``configuration_<name>.py``; a block two lessons share is copied
under a ``# Copied from`` marker that ``utils/check_copies.py`` keeps identical. Besides those, the
flat model code is ``causal_lm.py`` (the transformers contract every model shares), lesson 6's
``kv_cache.py`` and lesson 9's ``int8.py``/``quantization_int8.py`` (carried only by folders saved
quantized). They import their siblings only with ``from .x import y``, because that is all
``trust_remote_code`` copies next to a checkpoint. Everything a saved model never needs (corpora,
tokenizer training, evaluation, training plumbing, model cards) lives in subpackages:
``data`` (corpora and splits), ``tokenization`` (lesson 2's BPE), ``evaluation`` (loss, perplexity,
bits per byte), ``training`` (lesson 7's loop), ``adapters`` (lesson 8's LoRA), ``alignment``
(lesson 11's DPO), ``files`` (atomic writes, the cache root), ``recipe_support`` (the recipes' arguments, data,
trainer setup, model cards and publishing), ``benchmarking`` (timers, memory, the generation
harness), ``conversion`` (to and from transformers, GGUF) and ``experiments`` (lesson 12's grids,
the leaderboard and the scaling notes).
"""

from __future__ import annotations

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from .library_logs import quiet_library_logs

quiet_library_logs()  # bitsandbytes' warnings once each, before Trainer's import of peft imports it (library_logs.py)

from .configuration_bigram import BigramConfig
from .configuration_configurable import ConfigurableDecoderConfig
from .configuration_gpt import GPTConfig
from .configuration_gru import GRULMConfig
from .configuration_modern import ModernDecoderConfig
from .configuration_moe import MoEDecoderConfig
from .configuration_ngram_mlp import NGramMLPConfig
from .modeling_bigram import BigramForCausalLM
from .modeling_configurable import ConfigurableDecoderForCausalLM, ConfigurableDecoderModel
from .modeling_gpt import GPTForCausalLM, GPTModel
from .modeling_gru import GRULMForCausalLM, GRULMModel
from .modeling_modern import ModernDecoderForCausalLM, ModernDecoderModel
from .modeling_moe import MoEDecoderForCausalLM, MoEDecoderModel
from .modeling_ngram_mlp import NGramMLPForCausalLM, NGramMLPModel
from .quantization_int8 import ZooInt8Config

__version__ = "0.1.0"

# model_type -> (config class, causal LM class). A new lesson joins the zoo, and the integration
# test matrix, by adding its line here. A causal LM's backbone is its `base_model_class` (every
# model but the bigram table has one), registered with AutoModel.
MODEL_REGISTRY: dict[str, tuple[type, type]] = {
    BigramConfig.model_type: (BigramConfig, BigramForCausalLM),
    NGramMLPConfig.model_type: (NGramMLPConfig, NGramMLPForCausalLM),
    GRULMConfig.model_type: (GRULMConfig, GRULMForCausalLM),
    GPTConfig.model_type: (GPTConfig, GPTForCausalLM),
    ModernDecoderConfig.model_type: (ModernDecoderConfig, ModernDecoderForCausalLM),
    MoEDecoderConfig.model_type: (MoEDecoderConfig, MoEDecoderForCausalLM),
    ConfigurableDecoderConfig.model_type: (ConfigurableDecoderConfig, ConfigurableDecoderForCausalLM),
}


def _register_with_auto_classes() -> None:
    for config_class, model_class in MODEL_REGISTRY.values():
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
        AutoModelForCausalLM.register(config_class, model_class, exist_ok=True)
        backbone_class = getattr(model_class, "base_model_class", None)
        if backbone_class is not None:
            AutoModel.register(config_class, backbone_class, exist_ok=True)
            backbone_class.register_for_auto_class("AutoModel")
        # Every zoo tokenizer is a plain PreTrainedTokenizerFast, so none needs remote code.
        AutoTokenizer.register(config_class, tokenizer_class=PreTrainedTokenizerFast, exist_ok=True)
        # Makes save_pretrained write `auto_map` and copy the modeling files next to the weights.
        config_class.register_for_auto_class()
        model_class.register_for_auto_class("AutoModelForCausalLM")


_register_with_auto_classes()

__all__ = [
    "MODEL_REGISTRY",
    "BigramConfig",
    "BigramForCausalLM",
    "ConfigurableDecoderConfig",
    "ConfigurableDecoderForCausalLM",
    "ConfigurableDecoderModel",
    "GPTConfig",
    "GPTForCausalLM",
    "GPTModel",
    "GRULMConfig",
    "GRULMForCausalLM",
    "GRULMModel",
    "ModernDecoderConfig",
    "ModernDecoderForCausalLM",
    "ModernDecoderModel",
    "MoEDecoderConfig",
    "MoEDecoderForCausalLM",
    "MoEDecoderModel",
    "NGramMLPConfig",
    "NGramMLPForCausalLM",
    "NGramMLPModel",
    "ZooInt8Config",
]
