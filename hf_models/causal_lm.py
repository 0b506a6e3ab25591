"""What every causal language model in the zoo shares: the HF base class, input checks and the loss.

Each lesson's ``<Name>ForCausalLM`` subclasses :class:`ZooPreTrainedModel` and calls
:meth:`ZooPreTrainedModel.check_input_ids` and :meth:`ZooPreTrainedModel.causal_lm_output`, so
that the contract users know from transformers holds for a bigram table as much as for a decoder:

* ``forward(input_ids, attention_mask, past_key_values, labels, use_cache, logits_to_keep)``
  returns a :class:`~transformers.modeling_outputs.CausalLMOutputWithPast`, with ``loss`` when
  ``labels`` are given. Labels are the input ids themselves; the shift by one happens inside the
  loss, as in every transformers causal LM, so the same packed dataset trains every model.
* the loss is transformers' own ``ForCausalLM`` loss (``self.loss_function``), which also takes
  ``num_items_in_batch`` so that gradient accumulation averages over tokens, not over micro-batches.
* bad input fails early with a message that names the field and the limit, instead of an
  ``IndexError`` from an embedding lookup.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

# transformers 5.24 renamed the cache that ``generate()`` threads through ``forward`` from
# ``past_key_values`` to ``cache`` (argument and output field; the old name is deprecated until 5.40).
# The zoo accepts both names and answers in the installed version's field, so a saved folder keeps
# working across that rename.
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


class ZooPreTrainedModel(PreTrainedModel):
    """Base class of every model in the zoo (config checks, init, loss and output plumbing)."""

    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = False

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # Each zoo model builds its own cache on the first forward with ``use_cache=True``: a
        # state cache for the recurrent lessons, the hand-written KV cache for the decoders.
        # Returning False stops ``generate()`` from pre-building a transformers ``DynamicCache``.
        return False

    def start_forward(self, input_ids: torch.LongTensor, past_key_values, use_cache: bool | None, new_cache, kwargs: dict):
        """The preamble every zoo ``forward`` shares; returns ``(use_cache, past_key_values)``.

        A cache passed as ``cache=`` (transformers >= 5.24 names it so) is taken out of ``kwargs``,
        which the caller then hands on to the loss.

        ``use_cache`` defaults to ``config.use_cache`` outside training: a training step never reads a
        cache, so building one would be wasted work on the hot path. Inputs are checked against the
        vocabulary and the context (cached tokens included), and when a cache is wanted and none was
        passed, the model's own is created with ``new_cache()``.
        """
        renamed = kwargs.pop("cache", None)
        if renamed is not None:
            if past_key_values is not None and past_key_values is not renamed:
                raise ValueError("Pass the cache once, as `cache` or as `past_key_values`, not two different ones.")
            past_key_values = renamed
        use_cache = (self.config.use_cache and not self.training) if use_cache is None else use_cache
        past_length = past_key_values.get_seq_length() if past_key_values is not None else 0
        self.check_input_ids(input_ids, past_length)
        if use_cache and past_key_values is None:
            past_key_values = new_cache()
        return use_cache, (past_key_values if use_cache else None)

    def check_input_ids(self, input_ids: torch.LongTensor, past_length: int = 0) -> None:
        """Fail with a clear message on ids outside the vocabulary or a sequence past the context."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must have shape (batch, sequence), got shape {tuple(input_ids.shape)}.")
        total = past_length + input_ids.shape[1]
        context = self.config.max_position_embeddings
        if total > context:
            raise ValueError(
                f"input_ids: a sequence of {total} tokens ({past_length} cached + {input_ids.shape[1]} new) is longer "
                f"than the model's context, config.max_position_embeddings={context}. Truncate the prompt, "
                f"lower max_new_tokens, or build the model with a larger max_position_embeddings."
            )
        # The range check reads min/max back to the host: a device sync on a GPU. Decode steps
        # (past_length > 0) feed back ids the model itself produced, so only fresh input is checked.
        if past_length == 0 and input_ids.numel() and not torch.compiler.is_compiling():
            low, high = int(input_ids.min()), int(input_ids.max())
            if low < 0 or high >= self.config.vocab_size:
                bad = low if low < 0 else high
                raise ValueError(
                    f"input_ids contains token id {bad}, outside the model's vocabulary "
                    f"[0, config.vocab_size={self.config.vocab_size}). Is the tokenizer the one this model was "
                    f"trained with? (A tokenizer with more tokens than the model's vocab_size cannot be used.)"
                )

    def causal_lm_output(
        self,
        logits: torch.Tensor,
        labels: torch.LongTensor | None,
        past_key_values=None,
        **loss_kwargs,
    ) -> CausalLMOutputWithPast:
        """Wrap logits (B, T, V) in the standard output, adding the shifted cross-entropy when ``labels`` are given."""
        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, vocab_size=self.config.vocab_size, **loss_kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_FIELD: past_key_values})


def keep_last_positions(hidden_states: torch.Tensor, logits_to_keep: int | torch.Tensor) -> torch.Tensor:
    """Slice the positions (dim 1 of (B, T, ...)) that reach the LM head: ``generate()`` only needs
    the last one, and the vocabulary projection is the largest matmul of a small model."""
    if isinstance(logits_to_keep, int):
        return hidden_states if logits_to_keep == 0 else hidden_states[:, -logits_to_keep:]
    return hidden_states[:, logits_to_keep]
