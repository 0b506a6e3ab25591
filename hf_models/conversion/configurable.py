"""Lessons 4, 5 and 10's decoders to lesson 12's configurable decoder and back, by config alone.

A preset of the configurable decoder builds the dedicated model's modules under the same names
(the configurable decoder's modules carry the same names and blocks as ``modeling_gpt.py``, ``modeling_modern.py`` and ``modeling_moe.py``), so converting is translating the config:
the state dict loads unchanged, strictly, and the logits are identical. Going back only works for a
configurable model that *is* one of the presets; any other combination (QK-norm, NoPE, a GELU with
rotary, ...) has no dedicated model, and the error names the fields that differ.

From the command line (a folder saved by any of the four models; the tokenizer files are copied)::

    python -m hf_models.conversion.configurable runs/05_modern_gpt/model runs/05_as_configurable
    python -m hf_models.conversion.configurable runs/05_as_configurable runs/05_back --to dedicated
"""

from __future__ import annotations

import argparse
import copy
import os
import shutil
from pathlib import Path

from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedConfig, PreTrainedModel

from ..configuration_configurable import PRESETS, ConfigurableDecoderConfig
from ..configuration_gpt import GPTConfig
from ..configuration_modern import ModernDecoderConfig
from ..configuration_moe import MoEDecoderConfig
from ..files import save_folder_atomically
from ..modeling_configurable import ConfigurableDecoderForCausalLM
from ..modeling_gpt import GPTForCausalLM
from ..modeling_modern import ModernDecoderForCausalLM
from ..modeling_moe import MoEDecoderForCausalLM

# Fields every decoder config spells the same way, copied as they are.
SHARED_FIELDS = (
    "vocab_size", "max_position_embeddings", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
    "dropout", "attention_dropout", "initializer_range", "tie_word_embeddings", "kv_cache", "use_cache",
    "bos_token_id", "eos_token_id", "pad_token_id",
)
MOE_FIELDS = (
    "num_local_experts", "num_experts_per_tok", "output_router_logits", "router_aux_loss_coef", "router_aux_loss_per_layer",
    "router_z_loss_coef",
)
# The dedicated model of each preset. MoE first: its config is a modern config too.
DEDICATED = {
    "moe": (MoEDecoderConfig, MoEDecoderForCausalLM),
    "modern": (ModernDecoderConfig, ModernDecoderForCausalLM),
    "gpt": (GPTConfig, GPTForCausalLM),
}


def _shared(config: PreTrainedConfig) -> dict:
    return {name: getattr(config, name) for name in SHARED_FIELDS}


def configurable_config_from(config: PreTrainedConfig) -> ConfigurableDecoderConfig:
    """The configurable config that builds the same model as a GPT, modern or MoE config."""
    if isinstance(config, ConfigurableDecoderConfig):
        return copy.deepcopy(config)
    if isinstance(config, (ModernDecoderConfig, MoEDecoderConfig)):
        # Fields of the stock checkpoints (Qwen2's biases, Llama 3's rotary scaling) that lesson 12 has no toggle for.
        extras = {name: getattr(config, name) for name in ("attention_bias", "attention_output_bias", "mlp_bias", "rope_frequency_scaling")
                  if getattr(config, name, None) not in (None, False)}
        if extras:
            raise ValueError(f"The configurable decoder has no field for {extras}: this {type(config).__name__} has no preset.")
    if isinstance(config, MoEDecoderConfig):
        return ConfigurableDecoderConfig.preset(
            "moe", **_shared(config), **{name: getattr(config, name) for name in MOE_FIELDS},
            num_key_value_heads=config.num_key_value_heads, head_dim=config.head_dim, norm_eps=config.rms_norm_eps,
            rope_theta=config.rope_theta,
        )
    if isinstance(config, ModernDecoderConfig):
        return ConfigurableDecoderConfig.preset(
            "modern", **_shared(config), num_key_value_heads=config.num_key_value_heads, head_dim=config.head_dim,
            norm_eps=config.rms_norm_eps, rope_theta=config.rope_theta,
        )
    if isinstance(config, GPTConfig):
        return ConfigurableDecoderConfig.preset(
            "gpt", **_shared(config), hidden_act=config.hidden_act, bias=config.bias, norm_eps=config.layer_norm_eps,
        )
    raise TypeError(
        f"configurable_config_from takes a GPTConfig, ModernDecoderConfig or MoEDecoderConfig, got {type(config).__name__}."
    )


def _preset_mismatches(config: ConfigurableDecoderConfig, name: str) -> list[str]:
    """``field=value (preset needs X)`` for each field where ``config`` leaves preset ``name``."""
    wanted = {key: value for key, value in PRESETS[name].items() if key not in ("norm_eps", "bias")}
    if name == "gpt":
        wanted["num_key_value_heads"] = config.num_attention_heads  # GPT-2 is multi-head
        wanted["head_dim"] = config.hidden_size // config.num_attention_heads
    else:
        wanted["bias"] = False
    return [f"{key}={getattr(config, key)!r} (needs {value!r})" for key, value in wanted.items() if getattr(config, key) != value]


def dedicated_config_from(config: ConfigurableDecoderConfig) -> PreTrainedConfig:
    """The GPT, modern or MoE config of a configurable config that is one of the presets; else a ValueError naming the fields."""
    mismatches = {name: _preset_mismatches(config, name) for name in DEDICATED}
    for name, (config_class, _) in DEDICATED.items():
        if mismatches[name]:
            continue
        fields = _shared(config)
        if name == "gpt":
            return config_class(**fields, hidden_act=config.hidden_act, bias=config.bias, layer_norm_eps=config.norm_eps)
        fields.update(
            num_key_value_heads=config.num_key_value_heads, head_dim=config.head_dim, rms_norm_eps=config.norm_eps,
            rope_theta=config.rope_theta,
        )
        if name == "moe":
            fields.update({key: getattr(config, key) for key in MOE_FIELDS})
        return config_class(**fields)
    nearest = min(mismatches, key=lambda name: len(mismatches[name]))
    raise ValueError(
        f"This ConfigurableDecoderConfig is none of the presets {sorted(PRESETS)}, so no dedicated model computes it; "
        f"nearest is {nearest!r}, which differs in: {', '.join(mismatches[nearest])}."
    )


def _rebuild(model: PreTrainedModel, config: PreTrainedConfig, model_class: type[PreTrainedModel]) -> PreTrainedModel:
    target = model_class(config).to(model.dtype)
    # Same module names on both sides: a strict load proves nothing was left behind or invented.
    target.load_state_dict(model.state_dict(), strict=True)
    if config.tie_word_embeddings:
        target.tie_weights()
    return target.train(model.training)


def to_configurable(model: PreTrainedModel) -> ConfigurableDecoderForCausalLM:
    """The configurable decoder with ``model``'s weights (a GPT, modern or MoE causal LM): identical logits."""
    return _rebuild(model, configurable_config_from(model.config), ConfigurableDecoderForCausalLM)


def to_dedicated(model: ConfigurableDecoderForCausalLM) -> PreTrainedModel:
    """The GPT, modern or MoE causal LM with a preset configurable model's weights: identical logits."""
    config = dedicated_config_from(model.config)
    model_class = next(cls for config_class, cls in DEDICATED.values() if type(config) is config_class)
    return _rebuild(model, config, model_class)


def convert_folder(source: str | os.PathLike, destination: str | os.PathLike, to: str = "configurable") -> Path:
    """Convert a saved folder to the configurable type (``to="configurable"``) or back (``"dedicated"``).

    The tokenizer and any other non-model files (a model card) are copied; ``destination`` is
    written atomically, so an error leaves nothing half-written.
    """
    if to not in ("configurable", "dedicated"):
        raise ValueError(f"convert_folder's to must be 'configurable' or 'dedicated', got {to!r}.")
    source = Path(source)
    config = AutoConfig.from_pretrained(source)
    is_configurable = isinstance(config, ConfigurableDecoderConfig)
    if (to == "dedicated") != is_configurable:
        want = "a configurable decoder (zoo_configurable)" if to == "dedicated" else "a zoo_gpt, zoo_modern or zoo_moe decoder"
        raise ValueError(f"convert_folder(to={to!r}) needs {want}; {source} holds model_type {config.model_type!r}.")
    model = AutoModelForCausalLM.from_pretrained(source)
    converted = to_configurable(model) if to == "configurable" else to_dedicated(model)
    converted.config.name_or_path = str(destination)
    model_files = {"config.json", "model.safetensors", "model.safetensors.index.json", "generation_config.json"}

    def write(tmp: Path) -> None:
        converted.save_pretrained(tmp)
        for path in source.iterdir():
            if path.is_file() and path.name not in model_files and not path.name.endswith(".py") and not (tmp / path.name).exists():
                shutil.copy2(path, tmp / path.name)

    return save_folder_atomically(destination, write)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="a saved zoo_gpt, zoo_modern, zoo_moe or zoo_configurable folder")
    parser.add_argument("destination", help="the folder to write")
    parser.add_argument("--to", choices=("configurable", "dedicated"), default="configurable")
    args = parser.parse_args(argv)
    print(convert_folder(args.source, args.destination, args.to))


__all__ = ["configurable_config_from", "convert_folder", "dedicated_config_from", "to_configurable", "to_dedicated"]


if __name__ == "__main__":
    main()
