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
generation the only past the model needs is its last ``context_size`` tokens: the cache keeps
their embeddings, and each new token costs one window, not a re-run of the prefix.

In transformers' layout the backbone (:class:`NGramMLPModel`) ends at the tanh layer and the LM
head is one ``nn.Linear``. Bengio's direct connection ``W x`` fits that shape exactly: with it, the
backbone's output is ``[tanh(d + H x); x]`` and the head's weight is ``[U | W]``, so
``lm_head([h; x]) = b + U h + W x`` -- one matmul, and a library that projects the hidden states
through the LM head itself (trl's fused loss) computes the same logits.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import GenerationMixin
from transformers.cache_utils import Cache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .causal_lm import CACHE_FIELD, RecurrentStateCache, ZooPreTrainedModel, keep_last_positions, take_loss_kwargs
from .configuration_ngram_mlp import NGramMLPConfig


class NGramMLPPreTrainedModel(ZooPreTrainedModel):
    config_class = NGramMLPConfig

    def new_cache(self, static: bool | None = None, max_cache_len: int | None = None) -> Cache:
        return RecurrentStateCache(num_layers=1)  # the last context window: fixed-size, static by nature


class TanhLayer(GradientCheckpointingLayer):
    """Bengio's hidden layer, ``tanh(d + H x)``: (B, T, F) -> (B, T, H); recomputed under gradient checkpointing."""

    def __init__(self, in_features: int, hidden_size: int):
        super().__init__()
        self.proj = nn.Linear(in_features, hidden_size)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.proj(features))


class NGramMLPModel(NGramMLPPreTrainedModel):
    """The backbone: window embeddings -> tanh layer; ids (B, T) -> hidden states (B, T, H) (or (B, T, H + F)
    with the direct connection, see the module docstring)."""

    def __init__(self, config: NGramMLPConfig):
        super().__init__(config)
        # Row `vocab_size` is the "before the start of the text" token; no tokenizer ever emits it.
        self.start_id = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size + 1, config.embedding_dim)
        self.hidden = TanhLayer(config.context_size * config.embedding_dim, config.hidden_size)
        self.dropout = nn.Dropout(config.dropout)
        self.post_init()

    def context_windows(self, embeds: torch.Tensor, previous: torch.Tensor | None) -> torch.Tensor:
        """The ``n-1 = context_size`` token embeddings up to and including each position, concatenated:
        (B, T, m) -> (B, T, (n-1) * m). ``previous`` (B, n-1, m) is what came before the first position."""
        n = self.config.context_size
        if previous is None:
            previous = self.embed_tokens.weight[self.start_id].expand(embeds.shape[0], n, -1)
        extended = torch.cat([previous, embeds], dim=1)  # (B, n-1 + T, m)
        # Window j covers extended[j : j+n-1]; the one that ends at input position t is window t+1.
        windows = extended.unfold(1, n, 1)[:, 1:]  # (B, T, m, n-1)
        return windows.transpose(-1, -2).flatten(2)  # (B, T, n-1, m) -> (B, T, (n-1)*m)

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
        # position_ids are accepted for the common signature; a window model has no positions.
        _, output_hidden_states = self.output_flags(output_attentions, output_hidden_states)
        cache, _, seq_len = self.start_forward(input_ids, inputs_embeds, past_key_values, use_cache, output_attentions, kwargs)
        embeds = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, m)
        if attention_mask is not None:
            # Padding (left padding in batched generation) is treated as "before the start of the text".
            real = attention_mask[:, -seq_len:, None].bool()  # (B, T, 1)
            embeds = torch.where(real, embeds, self.embed_tokens.weight[self.start_id])
        previous = cache.get_state(0) if cache is not None else None
        features = self.context_windows(embeds, previous)  # (B, T, (n-1)*m)
        if cache is not None:
            # The last window is the next step's past: (B, (n-1)*m) -> (B, n-1, m); every window, (B, T, n-1, m),
            # is what assisted generation rolls back to.
            windows = features.unflatten(-1, (self.config.context_size, -1))
            cache.set_state(windows[:, -1], 0, per_token=windows)
            cache.advance(seq_len)
        hidden_states = self.dropout(self.hidden(features))  # (B, T, H)
        if self.config.direct_connection:
            hidden_states = torch.cat([hidden_states, features], dim=-1)  # (B, T, H + (n-1)*m)
        all_hidden_states = [embeds, hidden_states] if output_hidden_states else None
        return self.model_output(hidden_states, cache, all_hidden_states, return_dict)


class NGramMLPForCausalLM(NGramMLPPreTrainedModel, GenerationMixin):
    """The n-gram backbone (``self.model``) and the output layer ``lm_head`` (``b + U h``, plus ``W x``
    with the direct connection)."""

    # Folders saved before the backbone existed hold these at the top level. (The direct connection
    # was a separate `direct` matrix then; such folders must be converted, see the module docstring.)
    base_model_class = NGramMLPModel
    _legacy_key_mapping = {r"^embed_tokens\.": "model.embed_tokens.", r"^hidden\.": "model.hidden.proj."}

    def __init__(self, config: NGramMLPConfig):
        super().__init__(config)
        self.model = self.build_backbone(config)
        features = config.context_size * config.embedding_dim
        head_inputs = config.hidden_size + (features if config.direct_connection else 0)
        self.lm_head = nn.Linear(head_inputs, config.vocab_size)
        self.post_init()

    # Copied from hf_models.modeling_gpt.GPTForCausalLM.forward
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        shift_labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast | tuple:
        loss_kwargs = take_loss_kwargs(kwargs, shift_labels)
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
            **kwargs,
        )
        logits = self.lm_head(keep_last_positions(outputs.last_hidden_state, logits_to_keep))  # (B, T, C) -> (B, T, V)
        loss = self.causal_lm_loss(logits, labels, loss_kwargs)
        output = CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            **{CACHE_FIELD: getattr(outputs, CACHE_FIELD)},
        )
        return output if self.wants_dict(return_dict) else output.to_tuple()


__all__ = ["NGramMLPForCausalLM", "NGramMLPModel", "NGramMLPPreTrainedModel"]
