"""Lesson 12: the configurable decoder, every block of lessons 4-10 behind a config switch.

A research engineer's question is rarely "is this model good?" but "what does *this* change buy?".
Answering it needs two models that differ in exactly one choice and agree on everything else:
the same data, token budget, optimiser, seed and code path. This model makes each choice of the
curriculum one field of :class:`ConfigurableDecoderConfig`:

==============  =========================================  ===========================
choice          options                                    lesson
==============  =========================================  ===========================
norm            LayerNorm, RMSNorm (pre-norm); QK-norm      4, 5, 12
positions       learned table, rotary, none (NoPE)          4, 5, 12
feed-forward    GELU MLP, SwiGLU, mixture of experts        4, 5, 10
attention       multi-head, grouped-query, multi-query;     4, 5, 6
                fused or separate q/k/v
biases          on (GPT-2) or off (LLaMA)                   4, 5
embeddings      tied or untied LM head                      4
==============  =========================================  ===========================

Nothing here is new code: the skeleton is ``decoder.py``'s and every block is the one its lesson
wrote, picked by name from the same tables. That is what makes the ablation honest (a SwiGLU here
*is* lesson 5's SwiGLU) and what makes the presets exact: ``ConfigurableDecoderConfig.preset("gpt")``
builds lesson 4's modules under lesson 4's names, so a GPT checkpoint loads unchanged and gives the
same logits (``hf_models.conversion.configurable`` converts folders both ways).

The MoE outputs (router logits, ``aux_loss``) are lesson 10's; with a dense feed-forward they are
simply absent.
"""

from __future__ import annotations

from .configuration_configurable import ConfigurableDecoderConfig
from .modeling_moe import MoEDecoderForCausalLM, MoEDecoderModel


class ConfigurableDecoderModel(MoEDecoderModel):
    """The configurable backbone: ids -> hidden states after the final norm (``AutoModel``)."""

    config_class = ConfigurableDecoderConfig


class ConfigurableDecoderForCausalLM(MoEDecoderForCausalLM):
    """The configurable backbone (``self.model``) and an LM head, tied to the embedding unless the config says not."""

    config_class = ConfigurableDecoderConfig
    base_model_class = ConfigurableDecoderModel


__all__ = ["ConfigurableDecoderForCausalLM", "ConfigurableDecoderModel"]
