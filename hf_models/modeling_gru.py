"""Lesson 3: a GRU language model.

The n-gram MLP of lesson 2 sees a fixed window; a recurrent network folds the whole past into a
state vector, one token at a time, so its context is in principle unbounded and its cost per token
is constant. The price is sequential computation: step ``t`` needs step ``t - 1``. (Lesson 4's
attention removes that dependency during training and pays for it with a cache that grows.)

Generation makes the recurrent advantage concrete: the cache holds one (B, H) state per layer, and
each new token costs one step through each layer, never a re-run of the prefix.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers import initialization as init
from transformers.cache_utils import Cache
from transformers.modeling_outputs import BaseModelOutputWithPast

from .causal_lm import ZooForCausalLM, ZooModel, ZooPreTrainedModel, has_padding
from .configuration_gru import GRULMConfig
from .gru import GRULayer
from .recurrent_cache import RecurrentStateCache


class GRULMPreTrainedModel(ZooPreTrainedModel):
    config_class = GRULMConfig
    _no_split_modules = ["GRULayer"]

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, GRULayer):
            # torch.nn.GRU's init, U(-1/sqrt(H), 1/sqrt(H)): keeps the gates away from saturation at the start.
            bound = 1.0 / math.sqrt(module.hidden_size)
            for param in module.parameters():
                init.uniform_(param, -bound, bound)

    def new_cache(self) -> Cache:
        return RecurrentStateCache(num_layers=self.config.num_hidden_layers)


class GRULMModel(GRULMPreTrainedModel, ZooModel):
    """The backbone: token embedding and the stack of GRU layers; ids (B, T) -> states (B, T, H)."""

    def __init__(self, config: GRULMConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(GRULayer(config.hidden_size, config.hidden_size) for _ in range(config.num_hidden_layers))
        self.dropout = nn.Dropout(config.dropout)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: RecurrentStateCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast | tuple:
        # position_ids are accepted for the common signature; a recurrence counts positions itself.
        cache, past_length, seq_len = self.start_forward(input_ids, inputs_embeds, past_key_values, use_cache, output_attentions, kwargs)
        mask = None
        if attention_mask is not None and has_padding(attention_mask, cache, past_length):
            mask = attention_mask[:, -seq_len:].bool()  # (B, T): padded steps leave the state unchanged

        x = self.dropout(self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds)  # (B, T) -> (B, T, H)
        all_hidden_states = [] if output_hidden_states else None
        for i, layer in enumerate(self.layers):
            if all_hidden_states is not None:
                all_hidden_states.append(x)
            h = cache.get_state(i) if cache is not None else None
            if h is None:
                h = x.new_zeros(x.shape[0], self.config.hidden_size)
            x, h = layer(x, h, mask, self.config.gru_implementation)
            if cache is not None:
                cache.set_state(h, i)
            x = self.dropout(x)
        if cache is not None:
            cache.advance(seq_len)
        if all_hidden_states is not None:
            all_hidden_states.append(x)
        return self.model_output(x, cache, all_hidden_states, return_dict)


class GRULMForCausalLM(GRULMPreTrainedModel, ZooForCausalLM):
    """The GRU backbone (``self.model``) and an LM head tied to its embedding."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    # Folders saved before the backbone existed hold `embed_tokens.*` and `layers.*` at the top level.
    base_model_class = GRULMModel
    _legacy_key_mapping = {r"^embed_tokens\.": "model.embed_tokens.", r"^layers\.": "model.layers."}

    def __init__(self, config: GRULMConfig):
        super().__init__(config)
        self.model = self.build_backbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()


__all__ = ["GRULMForCausalLM", "GRULMModel", "GRULMPreTrainedModel"]
