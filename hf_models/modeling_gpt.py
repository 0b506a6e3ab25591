"""Lesson 4: the GPT decoder (Radford et al. 2019), the architecture of GPT-2 and nanoGPT.

Attention is what the recurrent network of lesson 3 lacked: every position looks at every earlier
position directly, through learned queries and keys, so information from 200 tokens ago is one
step away instead of 200. All positions are computed at once in training (one causal mask instead
of a sequential loop), which is what made transformers the architecture that scales.

The model is the zoo's shared decoder skeleton (``decoder.py``) with GPT-2's blocks in each slot:
a learned position table added to the token embeddings, pre-LayerNorm, multi-head attention and a
GELU MLP, residual connections around both, and an LM head tied to the token embedding. It loads
GPT-2 weights and exports to ``transformers.GPT2LMHeadModel`` (``hf_models.conversion.gpt2``) with
identical logits.
"""

from __future__ import annotations

from .configuration_gpt import GPTConfig
from .decoder import DecoderForCausalLM, DecoderModel


class GPTModel(DecoderModel):
    """The GPT backbone: ids -> hidden states after the final LayerNorm (``AutoModel``)."""

    config_class = GPTConfig


class GPTForCausalLM(DecoderForCausalLM):
    """The GPT backbone (``self.model``) and an LM head tied to its token embedding."""

    config_class = GPTConfig
    base_model_class = GPTModel


__all__ = ["GPTForCausalLM", "GPTModel"]
