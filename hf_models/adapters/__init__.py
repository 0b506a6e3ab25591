"""Parameter-efficient fine-tuning, written by hand (lesson 8): LoRA on any zoo model.

    from hf_models.adapters import LoRAConfig, apply_lora, merge_lora, save_lora, lora_to_peft
    apply_lora(model, LoRAConfig(rank=8, alpha=16, target_modules="all-linear"))   # freezes the base
    # an MoE's experts too (3-D weights, one rank-r pair per expert; dropout must be 0 there):
    # LoRAConfig(..., dropout=0.0, target_parameters=["experts.gate_up_proj", "experts.down_proj"])
    ...train...
    save_lora(model, "adapter")            # A and B alone, kilobytes
    lora_to_peft(model, "adapter-peft")    # the same adapter for PeftModel.from_pretrained
    merge_lora(model).save_pretrained("merged")   # a plain zoo model again
"""

from .lora import (
    LoRAConfig,
    LoRAEmbedding,
    LoRAExpertWeights,
    LoRALinear,
    apply_lora,
    load_lora,
    lora_layers,
    lora_to_peft,
    merge_lora,
    save_lora,
    trainable_parameters,
)

__all__ = [
    "LoRAConfig",
    "LoRAEmbedding",
    "LoRAExpertWeights",
    "LoRALinear",
    "apply_lora",
    "load_lora",
    "lora_layers",
    "lora_to_peft",
    "merge_lora",
    "save_lora",
    "trainable_parameters",
]
