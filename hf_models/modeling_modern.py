"""Lessons 5 and 6: the modern (LLaMA-style) decoder and its KV cache.

Same skeleton as lesson 4's GPT (``decoder.py``), with the blocks that four years of practice
settled on (Touvron et al. 2023):

* RMSNorm (Zhang & Sennrich 2019): LayerNorm without the mean subtraction and the bias; as good,
  cheaper.
* SwiGLU feed-forward (Shazeer 2020): a gated MLP, ``down(silu(gate(x)) * up(x))``, better per
  parameter than GELU.
* Rotary position embeddings (Su et al. 2021): positions enter as rotations of q and k, so
  attention scores depend on relative distance, and there is no position table to outgrow.
* Grouped-query attention (Ainslie et al. 2023): several query heads share one key/value head,
  which shrinks the KV cache (lesson 6) by that factor at almost no quality cost.
* No biases anywhere.

Generation uses the hand-written KV cache of ``kv_cache.py`` by default. The model loads LLaMA
weights and exports to ``transformers.LlamaForCausalLM`` (``hf_models.conversion.llama``) with
identical logits: the module names are LLaMA's, and the rotary layout is the same rotate-half one.
"""

from __future__ import annotations

from .configuration_modern import ModernDecoderConfig
from .decoder import DecoderForCausalLM, DecoderModel


class ModernDecoderModel(DecoderModel):
    """The modern decoder's backbone: ids -> hidden states after the final RMSNorm (``AutoModel``)."""

    config_class = ModernDecoderConfig


class ModernDecoderForCausalLM(DecoderForCausalLM):
    """The modern backbone (``self.model``) and an LM head tied to its token embedding."""

    config_class = ModernDecoderConfig
    base_model_class = ModernDecoderModel


__all__ = ["ModernDecoderForCausalLM", "ModernDecoderModel"]
