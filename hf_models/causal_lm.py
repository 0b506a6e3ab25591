"""The small base every zoo model stands on: transformers' input contract, the loss, and the caches' plumbing.

Each lesson's model is whole in its own ``modeling_<name>.py``: its blocks, its ``<Name>Model``
backbone and its ``<Name>ForCausalLM``. What is left here is what is not a lesson but a contract
with transformers, the same for every model, so it is written once:

* **The forward contract.** ``input_ids`` **or** ``inputs_embeds``; ``attention_mask`` (B, S) with
  1 for real tokens (left padding in batched generation); the cache under both names
  (transformers 5.24 renamed ``past_key_values`` to ``cache``, argument and output field; the zoo
  accepts both and answers in the installed version's field, :data:`CACHE_FIELD`, so a saved folder
  keeps working across the rename); ``use_cache``, ``output_hidden_states`` and ``return_dict``;
  ``labels`` are the input ids themselves, shifted inside transformers' own loss
  (``self.loss_function``), which takes ``num_items_in_batch`` so gradient accumulation averages
  over tokens. Any keyword a model does not know is refused by name, never passed on silently.
* **Bad input fails early**, naming the field and the limit, instead of an ``IndexError`` from an
  embedding lookup three modules down.
* **The recurrent lessons' cache** (:class:`RecurrentStateCache`), a fixed-size state per layer,
  which ``generate()`` talks to through the same ``Cache`` API as lesson 6's KV caches.
* **Init once, from the top**, and the folder layout (``save_pretrained`` also maps ``AutoModel``
  to the backbone; folders saved before a model had a backbone load through a key mapping).

The class hierarchy is transformers': ``<Name>ForCausalLM`` -> ``<Name>PreTrainedModel`` ->
:class:`ZooPreTrainedModel` -> ``PreTrainedModel``.
"""

from __future__ import annotations

import inspect
import json
import shutil
from contextvars import ContextVar
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.cache_utils import Cache, LinearAttentionLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

# The output field the installed transformers names the cache (see the module docstring).
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"

# Keyword arguments ``<Name>ForCausalLM.forward`` hands to transformers' loss.
LOSS_KWARGS = ("num_items_in_batch", "ignore_index", "shift_labels")
# Keyword arguments transformers may pass that the zoo's models have no use for: positions come
# from the cache itself, and ``generate`` hands its ``tokenizer`` (for ``stop_strings``) and the
# assistant's on to every forward, as it does to ``LlamaForCausalLM``'s ``**kwargs``.
IGNORED_KWARGS = ("cache_position", "tokenizer", "assistant_tokenizer")


def take_cache(past_key_values: Cache | None, kwargs: dict) -> Cache | None:
    """The cache passed as ``past_key_values=`` or as ``cache=`` (taken out of ``kwargs``), never two different ones."""
    renamed = kwargs.pop("cache", None)
    if renamed is not None:
        if past_key_values is not None and past_key_values is not renamed:
            raise ValueError("Pass the cache once, as `cache` or as `past_key_values`, not two different ones.")
        past_key_values = renamed
    return past_key_values


def take_loss_kwargs(kwargs: dict, shift_labels: torch.LongTensor | None) -> dict:
    """The loss's keywords, taken out of ``kwargs`` before the rest is checked, plus ``shift_labels`` if given.

    ``shift_labels`` (targets already shifted, as nanoGPT's random windows give them: all ``T``
    positions predict) is a named forward argument, not a ``**kwargs`` one, because ``Trainer``
    drops every batch key the forward's signature does not name.
    """
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


def mask_has_padding(attention_mask: torch.Tensor | None, past_length: int) -> bool:
    """Whether a 2-D ``attention_mask`` must be honoured in this forward, with no state kept anywhere.

    On the prefill (``past_length == 0``) the mask is read once: ``bool(mask.all())`` is a host
    read, on a GPU a wait for every queued kernel, which is fine once per sequence. A decode step
    (``past_length > 0``) never reads it: the mask is simply honoured, which costs a few tiny
    ops and is correct whether or not the batch is padded; reading it would be one device sync
    per generated token. Under ``torch.compile``/``torch.export`` the mask is always honoured too:
    a branch on tensor data cannot be traced into one graph.
    """
    if attention_mask is None:
        return False
    if is_tracing() or isinstance(past_length, torch.Tensor) or past_length > 0:
        return True  # (a 0-d tensor past length comes from a static cache: no host read of it either)
    return not bool(attention_mask.all())


def is_tracing() -> bool:
    """Whether ``torch.compile`` or ``torch.export`` is tracing this code (no host reads of tensor data then)."""
    return torch.compiler.is_compiling() or torch.compiler.is_exporting()


def keep_last_positions(hidden_states: torch.Tensor, logits_to_keep: int | torch.Tensor) -> torch.Tensor:
    """Slice the positions (dim 1 of (B, T, ...)) that reach the LM head: ``generate()`` only needs
    the last one, and the vocabulary projection is the largest matmul of a small model."""
    if isinstance(logits_to_keep, int):
        return hidden_states if logits_to_keep == 0 else hidden_states[:, -logits_to_keep:]
    return hidden_states[:, logits_to_keep]


class RecurrentStateLayer(LinearAttentionLayer):
    """One layer's state, stored by transformers' linear-attention cache layer (in place, fixed shape).

    Assisted generation (``assistant_model=``, ``prompt_lookup_num_tokens=``) runs the model over
    several draft tokens at once, then rolls back the ones it rejects with ``crop(-n)``. A state
    that summarises the whole past cannot be un-summarised, so while ``generate`` records the past
    (``activate_past_recording``) the layer keeps the state after *every* token since the last
    ``crop``: rolling back ``n`` tokens is then picking the state ``n`` steps earlier.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.history: list[torch.Tensor] = []  # while recording: (B, 1 + T, ...) chunks, states after each token

    def update_recurrent_state(self, recurrent_states: torch.Tensor, state_idx: int = 0, **kwargs) -> torch.Tensor:
        state = super().update_recurrent_state(recurrent_states, state_idx, **kwargs)
        # The parent marks a state as present only through its conv path; we have no conv state.
        self.has_previous_state[state_idx] = True
        return state

    def record(self, previous: torch.Tensor | None, per_token: torch.Tensor) -> None:
        """While recording, keep the states after each of this forward's T tokens, (B, T, ...).

        ``previous`` is the state before the forward (``None`` at the start of a sequence), kept
        once so that every token of the first chunk can be rolled back but the very first.
        """
        if not self.record_past:
            return
        if not self.history and previous is not None:
            self.history.append(previous.detach().clone()[:, None])  # (B, ...) -> (B, 1, ...)
        self.history.append(per_token.detach())

    @property
    def is_croppable(self) -> bool:
        return self.record_past or not any(self.is_recurrent_states_initialized.values())

    def crop(self, tokens_to_remove: int) -> None:
        """Roll the state back by ``-tokens_to_remove`` tokens (a negative count, as transformers' layers)."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative number of tokens to remove, got {tokens_to_remove}.")
        if tokens_to_remove < 0:
            if not self.record_past:
                raise RuntimeError("A recurrent state can only be rolled back while generate() records the past (activate_past_recording).")
            states = torch.cat(self.history, dim=1) if self.history else None  # (B, kept, ...)
            if states is None or states.shape[1] <= -tokens_to_remove:
                raise RuntimeError(
                    f"Cannot roll the recurrent state back by {-tokens_to_remove} tokens: only "
                    f"{0 if states is None else states.shape[1] - 1} were recorded since the last crop."
                )
            self.update_recurrent_state(states[:, tokens_to_remove - 1].contiguous())  # the state n tokens earlier
        self.history = []


class RecurrentStateCache(Cache):
    """Per-layer fixed-size states plus a count of the tokens they summarise (lessons 1-3).

    A transformer must keep every past key and value, because attention looks back at all of them
    (lesson 6). A recurrent network (lesson 3) squeezes the whole past into its hidden state, and
    an n-gram model (lesson 2) only ever looks at its last ``n - 1`` tokens: for both, the cache
    that makes generation cheap is one fixed-size tensor per layer, and each new token costs one
    step instead of a re-run of the prefix. transformers' ``LinearAttentionLayer`` (Mamba-style
    models) already stores such states; this cache adds ``get_seq_length`` (the tokens seen, which
    ``generate()`` asks for) and says it is not compileable (no 4-D attention masks to build).
    Beam search works unchanged: ``Cache.reorder_cache`` reorders the states along the batch axis.

    Args:
        num_layers: how many layers keep a state (0 is fine: a bigram model needs none).
    """

    def __init__(self, num_layers: int) -> None:
        super().__init__(layers=[RecurrentStateLayer() for _ in range(num_layers)])
        self.seen_tokens = 0

    def get_state(self, layer_idx: int) -> torch.Tensor | None:
        """The state after the last token seen, or None before the first forward."""
        return self.get_recurrent_state(layer_idx)

    def set_state(self, state: torch.Tensor, layer_idx: int, per_token: torch.Tensor | None = None) -> None:
        """Store a layer's state after this forward; ``per_token`` (B, T, ...) are the states after each
        of its tokens, kept only while ``generate`` records the past (see :class:`RecurrentStateLayer`)."""
        layer = self.layers[layer_idx]
        if per_token is not None and layer.record_past:
            layer.record(self.get_state(layer_idx), per_token)
        self.update_recurrent_state(state, layer_idx)

    def advance(self, num_tokens: int) -> None:
        """Record that the states now also summarise ``num_tokens`` more tokens."""
        self.seen_tokens += num_tokens

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)
        self.seen_tokens += min(tokens_to_remove, 0)

    @property
    def is_compileable(self) -> bool:
        return False

    def reset(self) -> None:
        super().reset()
        self.seen_tokens = 0


# Lesson 9's hand-written int8 (``quantization_int8.py`` + ``int8.py``) registers itself with
# transformers as this quantization method. Only a folder saved quantized with it carries that code.
INT8_QUANT_METHOD = "zoo_int8"
INT8_FILES = ("quantization_int8.py", "int8.py")
INT8_ENTRY = "quantized_int8"


def _quant_method(config) -> str | None:
    quantization = getattr(config, "quantization_config", None)
    if isinstance(quantization, dict):
        return quantization.get("quant_method")
    return getattr(quantization, "quant_method", None)


def carry_int8_quantizer(folder: Path) -> None:
    """Make a folder saved quantized with lesson 9's int8 load quantized under ``trust_remote_code`` too.

    transformers resolves ``config.quantization_config["quant_method"]`` only among the quantizers it
    knows, so ``"zoo_int8"`` must be registered before the weights load. The folder gets the int8
    code and a small entry module, ``quantized_int8.py``, that imports the quantizer (which registers
    it) and then re-exports the model classes; ``auto_map`` points at the entry module. transformers
    imports the model's module before it looks the quantizer up, so the registration is in time. An
    unquantized folder carries none of this.
    """
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    auto_map = dict(config.get("auto_map") or {})
    targets = {auto: reference for auto, reference in auto_map.items() if auto != "AutoConfig"}
    if not targets:
        return
    here = Path(__file__).resolve().parent  # also the dynamic-module folder of a model loaded with trust_remote_code
    for name in INT8_FILES:
        shutil.copyfile(here / name, folder / name)
    imports = sorted({(reference.split(".")[0], reference.split(".")[1]) for reference in targets.values() if not reference.startswith(INT8_ENTRY + ".")})
    lines = [
        '"""Written by ``save_pretrained``: this folder was quantized with lesson 9\'s hand-written int8 (``zoo_int8``).',
        "",
        "Importing the quantizer registers ``zoo_int8`` with transformers, before it reads the quantized weights;",
        'then the model classes are the usual ones."""',
        "",
        "from .quantization_int8 import ZooInt8Config  # noqa: F401  (registers the quantizer)",
    ]
    lines += [f"from .{module} import {name}  # noqa: F401" for module, name in imports]
    (folder / f"{INT8_ENTRY}.py").write_text("\n".join(lines) + "\n", encoding="utf-8")
    config["auto_map"] = {auto: (reference if auto == "AutoConfig" else f"{INT8_ENTRY}.{reference.split('.')[-1]}") for auto, reference in auto_map.items()}
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


# True while a causal LM builds its backbone (see ZooPreTrainedModel.build_backbone).
_BUILDING_INSIDE_CAUSAL_LM: ContextVar[bool] = ContextVar("building_inside_causal_lm", default=False)


class ZooPreTrainedModel(PreTrainedModel):
    """Base class of every model in the zoo: input checks, the loss, cache defaults, init order, folder layout.

    A model sets ``base_model_class`` (its ``<Name>Model``, ``None`` for the bigram table) and,
    where it once saved its weights at the top level, ``_legacy_key_mapping`` (regex ->
    replacement) so that ``from_pretrained`` still reads such folders.
    """

    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    base_model_class: type[PreTrainedModel] | None = None
    _legacy_key_mapping: dict[str, str] | None = None

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        # generate() calls inspect.signature(model.forward) at every decoding step of a model registered
        # for remote code (to decide whether it takes `cache_position`): about 25 us a step, 6% of a
        # compiled decoding step of lesson 5's model on a CPU. A forward's signature never changes, so
        # it is computed once, here, and stored where `inspect` looks first.
        if "forward" in cls.__dict__:
            cls.forward.__signature__ = inspect.signature(cls.forward)

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # Each zoo model builds its own cache on the first forward with ``use_cache=True``: a
        # state cache for the recurrent lessons, the hand-written KV cache for the decoders.
        # Returning False stops ``generate()`` from pre-building a transformers ``DynamicCache``.
        return False

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        if cls._legacy_key_mapping and "key_mapping" not in kwargs:
            kwargs["key_mapping"] = cls._legacy_key_mapping
        return super().from_pretrained(*args, **kwargs)

    # Whether the model computes attention weights it can return with ``output_attentions=True``.
    has_attention_weights = False

    def new_cache(self, static: bool | None = None, max_cache_len: int | None = None) -> Cache:
        """The cache a forward with ``use_cache=True`` creates when none is passed.

        ``static`` picks lesson 6's static cache over the growing one (``None``: as ``config.kv_cache``
        says), and ``max_cache_len`` sizes it (``generate`` passes prompt + ``max_new_tokens``;
        ``None``: the model's context). A recurrent model's state is fixed-size anyway.
        """
        raise NotImplementedError

    def context_limit(self) -> int | None:
        """The most positions the model can encode, or ``None`` where nothing bounds them.

        Learned position embeddings (GPT-2's table) end at ``max_position_embeddings``; rotary
        positions, a recurrence and an n-gram window have no such table, so they run past the
        length they were trained at, as ``LlamaForCausalLM`` does (quality may degrade there).
        """
        return None

    # Generation -------------------------------------------------------------------------------

    def _prepare_cache_for_generation(
        self, generation_config, model_kwargs: dict, generation_mode, batch_size: int, max_cache_length: int
    ) -> None:
        """Give ``generate`` the model's own cache, also for ``cache_implementation="static"``.

        transformers would build its ``DynamicCache``; the zoo's models bring lesson 6's caches (or a
        recurrent state), so ``generate`` gets one of those up front. Assisted generation and prompt
        lookup need the cache before the first forward (to record and roll back draft tokens), and
        ``cache_implementation="static"`` maps to lesson 6's :class:`StaticKVCache`, sized to the
        prompt plus ``max_new_tokens`` as transformers sizes its ``StaticCache`` (``config.kv_cache="static"``
        keeps lesson 6's preallocation of the whole context).
        """
        if model_kwargs.get(CACHE_FIELD) is not None or generation_config.use_cache is False:
            return super()._prepare_cache_for_generation(generation_config, model_kwargs, generation_mode, batch_size, max_cache_length)
        implementation = generation_config.cache_implementation
        if implementation not in (None, "dynamic", "static"):
            raise ValueError(
                f"cache_implementation={implementation!r} is not supported by {type(self).__name__}: it takes None or "
                f"'dynamic' (lesson 6's growing cache, or config.kv_cache) and 'static' (lesson 6's static cache). For "
                f"another transformers cache, build it and pass it as past_key_values."
            )
        static = {None: None, "dynamic": False, "static": True}[implementation]
        if static is None:
            # config.kv_cache="static": lesson 6 preallocates the whole context once (longer if generation needs it).
            max_cache_length = max(max_cache_length, getattr(self.config, "max_position_embeddings", 0) or 0)
        cache = self.new_cache(static=static, max_cache_len=max_cache_length)
        if getattr(generation_config, "is_assistant", False):
            cache.activate_past_recording()  # a draft model rolls back what the main model rejects
        model_kwargs[CACHE_FIELD] = cache

    def create_masks_for_generate(self, attention_mask: torch.Tensor | None = None, cache: Cache | None = None, inputs_embeds: torch.Tensor | None = None, **kwargs):
        """The mask ``generate`` hands each forward when the cache is compileable (a static cache).

        transformers would build its own 4-D mask here. The zoo's models build theirs from the 2-D
        (B, L) padding mask (``build_causal_mask``), so they get that one, right-padded with zeros to
        the cache's ``max_cache_len``: then every decoding step passes a mask of *one* shape, and a
        compiled forward is not re-traced as ``L`` grows by one per token. The padded columns are
        slots not yet written; causality hides them whatever they say (and an eager forward, which
        attends over the filled prefix only, reads just the columns it needs).
        """
        key_length = getattr(cache, "max_cache_len", None)
        if attention_mask is None or attention_mask.dim() != 2 or key_length is None:
            return attention_mask
        if attention_mask.shape[-1] < key_length:
            attention_mask = F.pad(attention_mask, (0, key_length - attention_mask.shape[-1]), value=0)  # (B, L) -> (B, S)
        return attention_mask

    def _validate_generated_length(self, generation_config, input_ids_length: int, has_default_max_length: bool):
        """Refuse up front a generation longer than learned positions can encode (not at token 129)."""
        limit = self.context_limit()
        if limit is not None and generation_config.max_length > limit:
            raise ValueError(
                f"max_new_tokens: a prompt of {input_ids_length} tokens plus {generation_config.max_length - input_ids_length} "
                f"new ones is {generation_config.max_length} tokens, longer than the context of {limit} positions "
                f"(config.max_position_embeddings) that {type(self).__name__}'s learned position embeddings can encode. "
                f"Lower max_new_tokens to at most {max(limit - input_ids_length, 0)} or shorten the prompt."
            )
        return super()._validate_generated_length(generation_config, input_ids_length, has_default_max_length)

    def init_weights(self):
        # Built inside a causal LM, the backbone leaves its init to the LM's one pass over the whole tree.
        if not _BUILDING_INSIDE_CAUSAL_LM.get():
            super().init_weights()

    def build_backbone(self, config) -> PreTrainedModel:
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
        backbone = getattr(self, "model", None)
        if self._auto_class is not None and getattr(type(backbone), "_auto_class", None) is not None:
            auto_map = dict(getattr(self.config, "auto_map", None) or {})
            auto_map["AutoModel"] = f"{type(backbone).__module__.split('.')[-1]}.{type(backbone).__name__}"
            self.config.auto_map = auto_map
        result = super().save_pretrained(save_directory, *args, **kwargs)
        if self._auto_class is not None and _quant_method(self.config) == INT8_QUANT_METHOD:
            carry_int8_quantizer(Path(save_directory))
        return result

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
        if not is_tracing() and not isinstance(past_length, torch.Tensor) and past_length == 0 and input_ids.numel():
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

        Takes the cache under either name, refuses unknown keywords (and ``output_attentions`` for a
        model without attention), checks the input against the vocabulary and, where positions are
        learned, the context (cached tokens included), and
        creates the model's own cache when one is wanted and none was passed. ``use_cache``
        defaults to ``config.use_cache`` outside training: a training step never reads a cache, so
        building one would be wasted work on the hot path.
        """
        past_key_values = take_cache(past_key_values, kwargs)
        refuse_unknown_kwargs(self, kwargs)
        if output_attentions and not self.has_attention_weights:
            raise ValueError(
                f"output_attentions=True is not supported by {type(self).__name__}: the model has no attention, so there "
                f"are no attention weights to return. Leave output_attentions unset."
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
        context = self.context_limit()
        if context is not None and not is_tracing() and past_length + seq_len > context:
            raise ValueError(
                f"input_ids: a sequence of {past_length + seq_len} tokens ({past_length} cached + {seq_len} new) is "
                f"longer than the model's context, config.max_position_embeddings={context}. Truncate the prompt, "
                f"lower max_new_tokens, or build the model with a larger max_position_embeddings."
            )
        if use_cache and past_key_values is None:
            past_key_values = self.new_cache()
        return (past_key_values if use_cache else None), past_length, seq_len

    def output_flags(self, output_attentions: bool | None, output_hidden_states: bool | None) -> tuple[bool, bool]:
        """The two ``output_*`` flags, each falling back to the config when not passed (as in transformers:
        ``from_pretrained(folder, output_hidden_states=True)`` sets them there)."""
        return (
            bool(self.config.output_attentions if output_attentions is None else output_attentions) and self.has_attention_weights,
            bool(self.config.output_hidden_states if output_hidden_states is None else output_hidden_states),
        )

    def wants_dict(self, return_dict: bool | None) -> bool:
        """``return_dict``, falling back to ``config.return_dict``."""
        return self.config.return_dict if return_dict is None else return_dict

    def model_output(
        self,
        hidden_states: torch.Tensor,
        cache: Cache | None,
        all_hidden_states: list | None,
        return_dict: bool | None,
        all_attentions: list | None = None,
    ) -> BaseModelOutputWithPast | tuple:
        """A backbone's output: the final hidden states (B, T, C), the cache and (if asked) every layer's
        input and attention weights (B, H, T, S)."""
        output = BaseModelOutputWithPast(
            last_hidden_state=hidden_states,
            hidden_states=tuple(all_hidden_states) if all_hidden_states is not None else None,
            attentions=tuple(all_attentions) if all_attentions is not None else None,
            **{CACHE_FIELD: cache},
        )
        return output if self.wants_dict(return_dict) else output.to_tuple()


__all__ = [
    "CACHE_FIELD",
    "LOSS_KWARGS",
    "RecurrentStateCache",
    "ZooPreTrainedModel",
    "keep_last_positions",
    "is_tracing",
    "mask_has_padding",
    "take_cache",
    "take_loss_kwargs",
]
