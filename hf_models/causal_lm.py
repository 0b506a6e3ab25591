"""What every causal language model in the zoo shares: transformers' layout, its input contract and the loss.

The layout users' libraries rely on
-----------------------------------
Every transformers language model is two classes: a backbone ``<Name>Model`` that turns ids into
hidden states (a :class:`~transformers.modeling_outputs.BaseModelOutputWithPast`), and
``<Name>ForCausalLM`` = that backbone under ``self.model`` plus an LM head ``lm_head``. Libraries
build on that split, not on the logits alone:

* trl's trainers patch the model with a fused, chunked LM-head loss that calls
  ``model.base_model(input_ids=..., attention_mask=..., use_cache=False)``, reads
  ``.last_hidden_state`` and projects it through ``model.get_output_embeddings()`` itself, so the
  (batch, seq, vocab) logits are never materialised;
* ``AutoModel.from_pretrained(folder)`` loads the backbone alone (for embeddings, or a new head);
* ``gradient_checkpointing_enable()`` finds the layers to recompute as ``GradientCheckpointingLayer``s;
* bitsandbytes and ``device_map`` keep ``_no_split_modules`` whole and the LM head in full precision.

:class:`ZooModel` (the backbones) and :class:`ZooForCausalLM` (the heads) hold what every zoo
model shares, so each lesson's modeling file only says what is new in it.

The forward contract
--------------------
* ``input_ids`` **or** ``inputs_embeds`` (same logits for ``embed(ids)`` as for the ids);
* ``attention_mask`` (B, S) with 1 for real tokens (left padding in batched generation);
* the cache under both names: transformers 5.24 renamed ``past_key_values`` to ``cache``
  (argument and output field; the old name is deprecated until 5.40). The zoo accepts both and
  answers in the installed version's field (:data:`CACHE_FIELD`), so a saved folder keeps working
  across the rename;
* ``use_cache``, ``output_hidden_states`` and ``return_dict`` are honoured; ``output_attentions``
  is refused with a clear error (the fused SDPA kernels never materialise attention weights), and
  so is any keyword the model does not know, instead of being passed on silently;
* ``labels`` are the input ids themselves: the shift by one happens inside the loss, transformers'
  own ``ForCausalLM`` loss (``self.loss_function``), which takes ``num_items_in_batch`` so that
  gradient accumulation averages over tokens, not over micro-batches. ``shift_labels`` (targets
  already shifted, as nanoGPT's random windows give them: all ``T`` positions predict) is a named
  argument, not a ``**kwargs`` one, because ``Trainer`` drops every batch key the forward's
  signature does not name.

Bad input fails early with a message that names the field and the limit, instead of an
``IndexError`` from an embedding lookup.
"""

from __future__ import annotations

from contextvars import ContextVar

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

# Registers lesson 9's "zoo_int8" quantizer with transformers on import: every saved zoo folder
# carries it, so a folder saved quantized reloads quantized under trust_remote_code too.
from .quantization_int8 import ZooInt8Config  # noqa: F401

# The output field the installed transformers names the cache (see the module docstring).
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"

# Keyword arguments ``<Name>ForCausalLM.forward`` hands to transformers' loss.
LOSS_KWARGS = ("num_items_in_batch", "ignore_index", "shift_labels")
# Keyword arguments transformers may pass that the zoo's models have no use for: positions come
# from the cache itself.
IGNORED_KWARGS = ("cache_position",)


def take_cache(past_key_values: Cache | None, kwargs: dict) -> Cache | None:
    """The cache passed as ``past_key_values=`` or as ``cache=`` (taken out of ``kwargs``), never two different ones."""
    renamed = kwargs.pop("cache", None)
    if renamed is not None:
        if past_key_values is not None and past_key_values is not renamed:
            raise ValueError("Pass the cache once, as `cache` or as `past_key_values`, not two different ones.")
        past_key_values = renamed
    return past_key_values


def take_loss_kwargs(kwargs: dict, shift_labels: torch.LongTensor | None) -> dict:
    """The loss's keywords, taken out of ``kwargs`` before the rest is checked, plus ``shift_labels`` if given."""
    loss_kwargs = {name: kwargs.pop(name) for name in LOSS_KWARGS if name in kwargs}
    if shift_labels is not None:
        loss_kwargs["shift_labels"] = shift_labels
    return loss_kwargs


def refuse_unknown_kwargs(model: nn.Module, kwargs: dict) -> None:
    """Raise on keyword arguments ``forward`` does not understand (after the known ones were taken out)."""
    for name in IGNORED_KWARGS:
        kwargs.pop(name, None)
    if kwargs:
        raise TypeError(
            f"{type(model).__name__}.forward() got unexpected keyword argument(s) {sorted(kwargs)}. It takes input_ids, "
            f"inputs_embeds, attention_mask, position_ids, past_key_values (or cache), use_cache, output_hidden_states, "
            f"return_dict, labels, logits_to_keep and the loss's {list(LOSS_KWARGS)}."
        )


def has_padding(attention_mask: torch.Tensor | None, cache: Cache | None, past_length: int) -> bool:
    """Whether a 2-D ``attention_mask`` hides any token, decided once per sequence.

    ``bool(mask.all())`` reads a value back to the host: on a GPU it waits for every queued kernel.
    Done at every decode step, that is one sync per generated token. So it is decided on the
    prefill (``past_length == 0``) and remembered on the cache; decode steps only append real
    tokens, so the answer cannot change. A cache that did not see the prefill is assumed padded
    (the mask is then built, which is correct either way, just not the fastest path).
    """
    if attention_mask is None:
        return False
    if cache is None or past_length == 0:
        padded = not bool(attention_mask.all())
        if cache is not None:
            cache.zoo_has_padding = padded
        return padded
    return getattr(cache, "zoo_has_padding", True)


def keep_last_positions(hidden_states: torch.Tensor, logits_to_keep: int | torch.Tensor) -> torch.Tensor:
    """Slice the positions (dim 1 of (B, T, ...)) that reach the LM head: ``generate()`` only needs
    the last one, and the vocabulary projection is the largest matmul of a small model."""
    if isinstance(logits_to_keep, int):
        return hidden_states if logits_to_keep == 0 else hidden_states[:, -logits_to_keep:]
    return hidden_states[:, logits_to_keep]


class ZooPreTrainedModel(PreTrainedModel):
    """Base class of every model in the zoo: config checks, input checks, cache defaults."""

    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # Each zoo model builds its own cache on the first forward with ``use_cache=True``: a
        # state cache for the recurrent lessons, the hand-written KV cache for the decoders.
        # Returning False stops ``generate()`` from pre-building a transformers ``DynamicCache``.
        return False

    def new_cache(self) -> Cache:
        """The cache a forward with ``use_cache=True`` creates when none is passed."""
        raise NotImplementedError

    def causal_lm_loss(self, logits: torch.Tensor, labels: torch.LongTensor | None, loss_kwargs: dict) -> torch.Tensor | None:
        """transformers' causal LM loss when ``labels`` are given (``loss_kwargs`` from :func:`take_loss_kwargs`)."""
        if labels is None:
            return None
        return self.loss_function(logits, labels, vocab_size=self.config.vocab_size, **loss_kwargs)

    def check_input_ids(self, input_ids: torch.LongTensor, past_length: int = 0) -> None:
        """Fail with a clear message on ids outside the vocabulary."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must have shape (batch, sequence), got shape {tuple(input_ids.shape)}.")
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

    def start_forward(
        self,
        input_ids: torch.LongTensor | None,
        inputs_embeds: torch.Tensor | None,
        past_key_values: Cache | None,
        use_cache: bool | None,
        output_attentions: bool | None,
        kwargs: dict,
    ) -> tuple[Cache | None, int, int]:
        """The preamble every zoo forward shares; returns ``(cache or None, past_length, new tokens)``.

        Takes the cache under either name, refuses unknown keywords and ``output_attentions``,
        checks the input against the vocabulary and the context (cached tokens included), and
        creates the model's own cache when one is wanted and none was passed. ``use_cache``
        defaults to ``config.use_cache`` outside training: a training step never reads a cache, so
        building one would be wasted work on the hot path.
        """
        past_key_values = take_cache(past_key_values, kwargs)
        refuse_unknown_kwargs(self, kwargs)
        if output_attentions:
            raise ValueError(
                f"output_attentions=True is not supported by {type(self).__name__}: its attention runs in fused kernels "
                f"(SDPA) that never materialise the attention weights. Leave output_attentions unset."
            )
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
        if inputs_embeds is not None and inputs_embeds.dim() != 3:
            raise ValueError(f"inputs_embeds must have shape (batch, sequence, hidden), got shape {tuple(inputs_embeds.shape)}.")
        use_cache = (self.config.use_cache and not self.training) if use_cache is None else use_cache
        past_length = past_key_values.get_seq_length() if past_key_values is not None else 0
        seq_len = input_ids.shape[1] if input_ids is not None else inputs_embeds.shape[1]
        if input_ids is not None:
            self.check_input_ids(input_ids, past_length)
        context = self.config.max_position_embeddings
        if past_length + seq_len > context:
            raise ValueError(
                f"input_ids: a sequence of {past_length + seq_len} tokens ({past_length} cached + {seq_len} new) is "
                f"longer than the model's context, config.max_position_embeddings={context}. Truncate the prompt, "
                f"lower max_new_tokens, or build the model with a larger max_position_embeddings."
            )
        if use_cache and past_key_values is None:
            past_key_values = self.new_cache()
        return (past_key_values if use_cache else None), past_length, seq_len


# True while a causal LM builds its backbone (see ZooForCausalLM.build_backbone).
_BUILDING_INSIDE_CAUSAL_LM: ContextVar[bool] = ContextVar("building_inside_causal_lm", default=False)


class ZooModel(ZooPreTrainedModel):
    """Base of the zoo's backbones (``<Name>Model``): ids or embeddings in, hidden states out."""

    def init_weights(self):
        # Built inside a causal LM, the backbone leaves its init to the LM's one pass over the whole tree.
        if not _BUILDING_INSIDE_CAUSAL_LM.get():
            super().init_weights()

    def model_output(
        self, hidden_states: torch.Tensor, cache: Cache | None, all_hidden_states: list | None, return_dict: bool | None
    ) -> BaseModelOutputWithPast | tuple:
        """Wrap the final hidden states (B, T, C), the cache and (if asked) every layer's input."""
        output = BaseModelOutputWithPast(
            last_hidden_state=hidden_states,
            hidden_states=tuple(all_hidden_states) if all_hidden_states is not None else None,
            **{CACHE_FIELD: cache},
        )
        return output if return_dict is not False else output.to_tuple()


class ZooForCausalLM(ZooPreTrainedModel, GenerationMixin):
    """Base of ``<Name>ForCausalLM``: a backbone under ``self.model`` and an ``lm_head``.

    Subclasses set ``base_model_class`` and build ``self.model`` and ``self.lm_head`` in ``__init__``; the forward, the loss, the
    cache and the embedding accessors (transformers' own, through ``self.model.embed_tokens`` and
    ``self.lm_head``) are shared.

    ``_legacy_key_mapping`` (regex -> replacement) lets ``from_pretrained`` read folders saved
    before a model had a backbone, when its weights sat at the top level.
    """

    base_model_class: type[ZooModel] | None = None  # the backbone built as `self.model`, registered with AutoModel
    _legacy_key_mapping: dict[str, str] | None = None

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        if cls._legacy_key_mapping and "key_mapping" not in kwargs:
            kwargs["key_mapping"] = cls._legacy_key_mapping
        return super().from_pretrained(*args, **kwargs)

    def build_backbone(self, config) -> ZooModel:
        """``base_model_class(config)``, initialised later by this model's own ``post_init``.

        Weights are initialised once, from the top, after the LM head exists. The order matters for
        reproducibility: torch draws a default init for every layer it constructs, so a backbone
        that initialised itself before the head was built would shift the random stream, and every
        seeded result of the lessons with it.
        """
        token = _BUILDING_INSIDE_CAUSAL_LM.set(True)
        try:
            return self.base_model_class(config)
        finally:
            _BUILDING_INSIDE_CAUSAL_LM.reset(token)

    def save_pretrained(self, save_directory, *args, **kwargs):
        # A folder loads its backbone alone through `AutoModel` too, also with trust_remote_code.
        backbone = type(self.model)
        if self._auto_class is not None and getattr(backbone, "_auto_class", None) is not None:
            auto_map = dict(getattr(self.config, "auto_map", None) or {})
            auto_map["AutoModel"] = f"{backbone.__module__.split('.')[-1]}.{backbone.__name__}"
            self.config.auto_map = auto_map
        return super().save_pretrained(save_directory, *args, **kwargs)

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
            **kwargs,
        )
        logits = self.lm_head(keep_last_positions(outputs.last_hidden_state, logits_to_keep))  # (B, T, C) -> (B, T, V)
        loss = self.causal_lm_loss(logits, labels, loss_kwargs)
        output = self.causal_lm_output(loss, logits, outputs)
        return output if return_dict is not False else output.to_tuple()

    def causal_lm_output(self, loss: torch.Tensor | None, logits: torch.Tensor, outputs: BaseModelOutputWithPast):
        """The output of ``forward``; a model with more to report (an MoE's ``aux_loss``) overrides this."""
        return CausalLMOutputWithPast(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, **{CACHE_FIELD: getattr(outputs, CACHE_FIELD)}
        )


__all__ = [
    "CACHE_FIELD",
    "LOSS_KWARGS",
    "ZooForCausalLM",
    "ZooModel",
    "ZooPreTrainedModel",
    "has_padding",
    "keep_last_positions",
    "take_cache",
    "take_loss_kwargs",
]
