"""Lesson 1: the bigram language model, a table of next-token logits.

``logits[t] = table[input_ids[t]]``: row ``a`` of the table holds the (unnormalised) log
probabilities of every token that can follow token ``a``. Training it by gradient descent on
cross-entropy converges to the counting solution, ``P(b | a) = count(a, b) / count(a)``, because the
softmax of a free row can represent any distribution, and the maximum-likelihood distribution is the
empirical one. The lesson's recipe checks this: the trained model's validation loss lands on the
add-one-smoothed count model computed in closed form.

Why bother training what we can count? Because everything after this lesson keeps the exact same
interface (ids in, logits out, cross-entropy loss, ``generate()``), and only the function between
the ids and the logits gets more expressive.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import GenerationMixin
from transformers import initialization as init
from transformers.modeling_outputs import CausalLMOutputWithPast

from .causal_lm import CACHE_FIELD, RecurrentStateCache, ZooPreTrainedModel, keep_last_positions, take_loss_kwargs
from .configuration_bigram import BigramConfig


class BigramPreTrainedModel(ZooPreTrainedModel):
    config_class = BigramConfig
    # One table lookup: there are no layer activations to recompute.
    supports_gradient_checkpointing = False
    _input_embed_layer = "logits_table"

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Embedding):
            if self.config.initializer_range == 0.0:
                init.zeros_(module.weight)
            else:
                init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)

    def new_cache(self, static: bool | None = None, max_cache_len: int | None = None) -> RecurrentStateCache:
        return RecurrentStateCache(num_layers=0)  # no state at all: static by nature


class BigramForCausalLM(BigramPreTrainedModel, GenerationMixin):
    """A ``vocab_size x vocab_size`` logits table (as an ``nn.Embedding``: row lookup is all it does).

    The one model of the zoo without a ``<Name>Model`` backbone: its "hidden state" would be the
    logits themselves. Its input embedding is the table (``inputs_embeds`` are rows of logits) and it
    has no separate output embedding. The only past a bigram needs is the current token, so the
    cache carries no state: with ``use_cache=True`` each generation step feeds just the newest token.
    """

    base_model_class = None  # no backbone: the table maps ids straight to logits

    def __init__(self, config: BigramConfig):
        super().__init__(config)
        self.logits_table = nn.Embedding(config.vocab_size, config.vocab_size)
        self.post_init()

    @classmethod
    def from_counts(cls, token_ids: torch.LongTensor, config: BigramConfig, smoothing: float = 1.0) -> "BigramForCausalLM":
        """The counting answer as a model: ``log((count(a, b) + k) / (count(a) + k * V))`` in the table.

        Add-k smoothing gives pairs never seen in ``token_ids`` a small probability instead of zero
        (a zero would make any held-out text containing them infinitely unlikely).
        """
        vocab_size = config.vocab_size
        pairs = token_ids[:-1] * vocab_size + token_ids[1:]  # each (a, b) as one index a * V + b
        counts = torch.bincount(pairs, minlength=vocab_size * vocab_size).view(vocab_size, vocab_size).double()
        probs = (counts + smoothing) / (counts.sum(dim=1, keepdim=True) + smoothing * vocab_size)  # rows sum to 1
        model = cls(config)
        with torch.no_grad():
            model.logits_table.weight.copy_(probs.log())
        return model

    def gradient_checkpointing_enable(self, *args, **kwargs):
        raise ValueError(
            "BigramForCausalLM does not support gradient checkpointing: the model is one table lookup, so there are "
            "no layer activations to drop and recompute. Train it without gradient_checkpointing."
        )

    activation_checkpointing_enable = gradient_checkpointing_enable

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: RecurrentStateCache | None = None,
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
        if output_hidden_states:
            raise ValueError(
                "output_hidden_states=True is not supported by BigramForCausalLM: a bigram table maps each token straight "
                "to its logits, with no hidden state in between. Leave output_hidden_states unset."
            )
        cache, _, seq_len = self.start_forward(input_ids, inputs_embeds, past_key_values, use_cache, output_attentions, kwargs)
        if inputs_embeds is None:
            logits = self.logits_table(keep_last_positions(input_ids, logits_to_keep))  # (B, T) -> (B, T, V)
        else:
            logits = keep_last_positions(inputs_embeds, logits_to_keep)  # rows of the table are logits
        if cache is not None:
            cache.advance(seq_len)
        loss = self.causal_lm_loss(logits, labels, loss_kwargs)
        output = CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_FIELD: cache})
        return output if self.wants_dict(return_dict) else output.to_tuple()


__all__ = ["BigramForCausalLM", "BigramPreTrainedModel"]
