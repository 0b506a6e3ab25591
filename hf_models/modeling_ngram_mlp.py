"""Lesson 2: the n-gram MLP language model of Bengio, Ducharme, Vincent & Jauvin (2003).

A count-based n-gram model has one free parameter per n-gram it has seen, so it cannot say
anything about "the cat sat" from having seen "a dog sat": the tokens are atoms. Bengio et al.
embed each token as a learned vector, concatenate the vectors of the last ``n - 1`` tokens and
predict the next token with a small MLP::

    x = [C(w_{t-n+1}); ...; C(w_{t-1})]                  # (n-1) * m features
    logits = b + W x + U tanh(d + H x)                   # W x: the optional direct connection

Similar tokens get similar vectors, so what is learned about one transfers to the other. That idea,
distributed representations of tokens, is the first layer of every LLM since.

Each position sees exactly the previous ``context_size`` tokens (positions before the start of the
text see a learned "start" vector), so the whole (B, T) batch is one gather plus two matmuls. For
generation the only past the model needs is its last ``context_size`` tokens: the cache keeps that
window, and each new token costs one window, not a re-run of the prefix.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import GenerationMixin
from transformers.modeling_outputs import CausalLMOutputWithPast

from .causal_lm import ZooPreTrainedModel, keep_last_positions
from .configuration_ngram_mlp import NGramMLPConfig
from .recurrent_cache import RecurrentStateCache


class NGramMLPPreTrainedModel(ZooPreTrainedModel):
    config_class = NGramMLPConfig


class NGramMLPForCausalLM(NGramMLPPreTrainedModel, GenerationMixin):
    def __init__(self, config: NGramMLPConfig):
        super().__init__(config)
        # Row `vocab_size` is the "before the start of the text" token; no tokenizer ever emits it.
        self.start_id = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size + 1, config.embedding_dim)
        features = config.context_size * config.embedding_dim
        self.hidden = nn.Linear(features, config.hidden_size)
        self.dropout = nn.Dropout(config.dropout)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size)
        self.direct = nn.Linear(features, config.vocab_size, bias=False) if config.direct_connection else None
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.embed_tokens = value

    def context_windows(self, input_ids: torch.LongTensor, previous: torch.LongTensor | None) -> torch.LongTensor:
        """The ``context_size`` tokens up to and including each position: (B, T) -> (B, T, n-1)."""
        n = self.config.context_size
        if previous is None:
            previous = input_ids.new_full((input_ids.shape[0], n), self.start_id)
        extended = torch.cat([previous, input_ids], dim=1)  # (B, n-1 + T)
        # Window j covers extended[j : j+n-1]; the one that ends at input position t is window t+1.
        return extended.unfold(1, n, 1)[:, 1:]  # (B, T, n-1)

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
        use_cache, past_key_values = self.start_forward(input_ids, past_key_values, use_cache, lambda: RecurrentStateCache(num_layers=1), kwargs)

        if attention_mask is not None:
            # Padding (left padding in batched generation) is treated as "before the start of the text".
            mask = attention_mask[:, -input_ids.shape[1] :].bool()
            input_ids = torch.where(mask, input_ids, torch.full_like(input_ids, self.start_id))
        previous = past_key_values.get_state(0) if past_key_values is not None else None
        windows = self.context_windows(input_ids, previous)  # (B, T, n-1)
        if past_key_values is not None:
            past_key_values.set_state(windows[:, -1], 0)  # the last window is the next step's past
            past_key_values.advance(input_ids.shape[1])

        windows = keep_last_positions(windows, logits_to_keep)
        features = self.embed_tokens(windows).flatten(2)  # (B, T, n-1, m) -> (B, T, (n-1)*m)
        logits = self.lm_head(self.dropout(torch.tanh(self.hidden(features))))  # (B, T, V)
        if self.direct is not None:
            logits = logits + self.direct(features)
        return self.causal_lm_output(logits, labels, past_key_values, **kwargs)


__all__ = ["NGramMLPForCausalLM", "NGramMLPPreTrainedModel"]
