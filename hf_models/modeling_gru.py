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
from transformers import GenerationMixin
from transformers import initialization as init
from transformers.modeling_outputs import CausalLMOutputWithPast

from .causal_lm import ZooPreTrainedModel, keep_last_positions
from .configuration_gru import GRULMConfig
from .gru import GRULayer
from .recurrent_cache import RecurrentStateCache


class GRULMPreTrainedModel(ZooPreTrainedModel):
    config_class = GRULMConfig

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, GRULayer):
            # torch.nn.GRU's init, U(-1/sqrt(H), 1/sqrt(H)): keeps the gates away from saturation at the start.
            bound = 1.0 / math.sqrt(module.hidden_size)
            for param in module.parameters():
                init.uniform_(param, -bound, bound)


class GRULMForCausalLM(GRULMPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "embed_tokens.weight"}

    def __init__(self, config: GRULMConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(GRULayer(config.hidden_size, config.hidden_size) for _ in range(config.num_hidden_layers))
        self.dropout = nn.Dropout(config.dropout)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        past_key_values: RecurrentStateCache | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        use_cache, past_key_values = self.start_forward(input_ids, past_key_values, use_cache, lambda: RecurrentStateCache(num_layers=self.config.num_hidden_layers), kwargs)

        batch_size, seq_len = input_ids.shape
        mask = None
        if attention_mask is not None and not bool(attention_mask[:, -seq_len:].all()):
            mask = attention_mask[:, -seq_len:].bool()  # (B, T): padded steps leave the state unchanged

        x = self.dropout(self.embed_tokens(input_ids))  # (B, T) -> (B, T, H)
        for i, layer in enumerate(self.layers):
            h = past_key_values.get_state(i) if past_key_values is not None else None
            if h is None:
                h = x.new_zeros(batch_size, self.config.hidden_size)
            x, h = layer(x, h, mask, self.config.gru_implementation)
            if past_key_values is not None:
                past_key_values.set_state(h, i)
            x = self.dropout(x)
        if past_key_values is not None:
            past_key_values.advance(seq_len)

        logits = self.lm_head(keep_last_positions(x, logits_to_keep))  # (B, T, V)
        return self.causal_lm_output(logits, labels, past_key_values, **kwargs)


__all__ = ["GRULMForCausalLM", "GRULMPreTrainedModel"]
