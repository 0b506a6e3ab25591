"""Key/value caches for fast autoregressive decoding (lesson 6).

What
----
A decoder generates one token per forward pass. Without a cache, step ``n`` re-runs the whole
prefix: O(n) tokens through every layer, O(n^2) work for a sequence. But causal attention means
the keys and values of old tokens never change once computed, so we store them: each step then
computes q/k/v for the *one* new token, appends its k/v to the cache, and attends over the cache.
Per-step compute drops from O(n * model) to O(model + n * layers * width), and decoding becomes
limited by reading the cache from memory -- which is why MQA/GQA (``modeling_modern.py``'s ``repeat_kv``) shrink it.

Memory: ``2 (k and v) * layers * kv_heads * head_dim * tokens * batch * bytes``. For LLaMA-2-7B
(32 layers, 32 kv heads of 128, fp16) that is 0.5 MB per token: a 4k context is 2 GB per sequence.

Storage and the O(n^2) copy
---------------------------
transformers' ``DynamicCache`` grows by ``torch.cat([old, new])`` every step: a new tensor is
allocated and the *entire* history copied, so generating ``n`` tokens copies ``n^2 / 2`` token
slots per layer and churns the allocator. The caches here write into preallocated buffers of
shape (B, H_kv, capacity, D) instead; each step copies only the new token's k/v into its slot and
returns a *view* of the filled prefix ``buffer[:, :, :length]`` (no copy).

* ``GrowingKVCache``: when a write does not fit, capacity *doubles* (at least to what is needed)
  and the filled prefix is copied once into the larger buffer. Doubling makes the total copy work
  ``n + n/2 + n/4 + ... < 2n`` -- amortised O(1) per token, the ``std::vector``/Python ``list``
  growth policy -- while never holding more than 2x the memory in use.
* ``StaticKVCache(max_cache_len)``: the buffer is allocated once, at the full length, and never
  reallocated while decoding (only a change of batch size re-allocates); writing past the end is
  an error. This is what serving systems do to make memory use predictable, and (with fixed
  shapes) what makes ``torch.compile``/CUDA graphs possible.

The in-place writes make these caches inference-only (run them under ``torch.no_grad()`` or
``torch.inference_mode()``, as ``generate`` does): autograd refuses a buffer that was overwritten
after a step saved it for backward. ``DynamicCache`` allocates fresh tensors and has no such limit.

Two contracts: eager-friendly and compile-friendly
--------------------------------------------------
The growing cache keeps its length as a Python int and returns the filled prefix, of length
``past + new``: a model masks it like ``DynamicCache`` (``get_mask_sizes`` reports ``past + new``),
attention never touches unused slots, and the single-token decode step needs no mask at all.

The static cache is built for ``torch.compile`` as well (transformers' ``StaticCache`` contract).
A compiled graph is specialised on every Python int it reads and on every tensor shape: a length
kept as an int, or a prefix that grows by one each token, would make each token a new graph. So
its fill level is a 0-d tensor advanced in place, writes go through ``index_copy_`` at positions
computed on the device, and, while ``torch.compile`` traces it, ``update`` returns the *whole*
``max_cache_len`` buffer, the same shape at every step. The cost is attention over the empty tail
and an explicit mask (those slots sit after every query's position, so a causal mask hides them --
``build_causal_mask`` handles both); the gain is one graph for the whole decode:
``generate(..., cache_implementation="static", compile_config=CompileConfig(...))`` compiles the
forward once and replays it for every token. Run eagerly, it returns the filled prefix like the
growing cache (transformers' ``StaticCache`` attends over the empty tail in eager mode too, which
costs it about 15% at 512 tokens here).

How generate() uses a cache
---------------------------
``generate`` calls ``update`` (through the model), ``get_seq_length`` (position ids), ``get_mask_sizes``
(masks), ``reorder_cache`` after every beam-search step, ``crop`` (assisted/speculative decoding rolls
back rejected draft tokens), ``batch_repeat_interleave``/``batch_select_indices`` (batch expansion
and selection), and ``reset`` (reuse across calls). Frontier serving goes one step further with
*paged* caches (vLLM's PagedAttention): fixed-size blocks from a shared pool plus a block table
per sequence, so memory is allocated like virtual memory pages and prefixes can be shared.
"""

from __future__ import annotations

from functools import partial

import torch
from transformers.cache_utils import Cache, CacheLayerMixin


class KVBufferLayer(CacheLayerMixin):
    """One layer's cache: k/v buffers of shape (B, H_kv, capacity, D), the first ``length`` slots filled.

    ``keys``/``values`` are views of the filled prefix, which is also what ``update`` returns.
    Subclasses decide what happens when a write does not fit (``_ensure_capacity``).
    """

    # `generate` may `torch.compile` the forward only with a compileable cache. Prefix views change
    # shape every token (a new graph each time), so only `StaticKVLayer`, which returns its whole
    # buffer, says it is.
    is_compileable = False
    is_croppable = True
    is_sliding = False

    def __init__(self) -> None:
        super().__init__()
        self.length = 0
        self.key_buffer: torch.Tensor | None = None
        self.value_buffer: torch.Tensor | None = None

    def _initial_capacity(self, needed: int) -> int:
        raise NotImplementedError

    def _ensure_capacity(self, needed: int) -> None:
        raise NotImplementedError

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Allocate the buffers for the batch size, heads, head_dim, dtype and device of the first write."""
        batch_size, num_heads, new_tokens, _ = key_states.shape
        capacity = self._initial_capacity(new_tokens)
        self.dtype, self.device = key_states.dtype, key_states.device
        self.key_buffer = key_states.new_empty((batch_size, num_heads, capacity, key_states.shape[-1]))
        self.value_buffer = value_states.new_empty((batch_size, num_heads, capacity, value_states.shape[-1]))
        self.batch_size = batch_size
        self.is_initialized = True
        self._set_length(0)

    def _fits(self, key_states: torch.Tensor, value_states: torch.Tensor) -> bool:
        return (
            self.key_buffer.shape[:2] == key_states.shape[:2]
            and self.key_buffer.shape[-1] == key_states.shape[-1]
            and self.value_buffer.shape[-1] == value_states.shape[-1]
            and self.key_buffer.dtype == key_states.dtype
            and self.key_buffer.device == key_states.device
            # Buffers made under `torch.inference_mode` cannot be written outside it (and vice versa).
            and self.key_buffer.is_inference() == torch.is_inference_mode_enabled()
        )

    def _set_length(self, length: int) -> None:
        self.length = length
        self.keys = self.key_buffer.narrow(2, 0, length)  # (B, H_kv, capacity, D) -> (B, H_kv, length, D), a view
        self.values = self.value_buffer.narrow(2, 0, length)

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k/v of shape (B, H_kv, T, D) after the filled prefix; return the (B, H_kv, past + T, D) prefix."""
        # A fresh sequence (first write, or after reset) may come with a new batch size, dtype or device.
        if self.length == 0 and not (self.is_initialized and self._fits(key_states, value_states)):
            self.lazy_initialization(key_states, value_states)
        start = self.length
        end = start + key_states.shape[-2]
        if end > self.key_buffer.shape[-2]:
            self._ensure_capacity(end)
        self.key_buffer.narrow(2, start, end - start).copy_(key_states)  # in place, (B, H_kv, T, D) slots
        self.value_buffer.narrow(2, start, end - start).copy_(value_states)
        self._set_length(end)
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """(kv_length, kv_offset): ``update`` returns the filled prefix, so ``past + query_length`` from 0."""
        return self.length + query_length, 0

    def reset(self) -> None:
        """Forget the contents but keep the buffers for the next sequence (nothing beyond ``length`` is ever read)."""
        if self.is_initialized:
            self._set_length(0)

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last ``-tokens_to_remove`` tokens (negative count, as transformers' ``DynamicLayer.crop``)."""
        if tokens_to_remove > 0:
            raise ValueError(
                f"crop takes a negative number of tokens to remove, got {tokens_to_remove}; "
                f"use crop(-n) to remove the last n tokens."
            )
        if tokens_to_remove == 0 or not self.is_initialized:
            return
        self._set_length(max(self.length + tokens_to_remove, 0))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: row ``b`` becomes old row ``beam_idx[b]``, written in place into the same buffers."""
        if self.length == 0:
            return
        beam_idx = beam_idx.to(self.key_buffer.device)
        self.keys.copy_(self.keys.index_select(0, beam_idx))
        self.values.copy_(self.values.index_select(0, beam_idx))

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Repeat each batch row ``repeats`` times (new buffers: the batch size changes)."""
        if self.is_initialized:
            self.key_buffer = self.key_buffer.repeat_interleave(repeats, dim=0)
            self.value_buffer = self.value_buffer.repeat_interleave(repeats, dim=0)
            self.batch_size = self.key_buffer.shape[0]
            self._set_length(self.length)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep only the batch rows ``indices`` (new buffers: the batch size changes)."""
        if self.is_initialized:
            self.key_buffer = self.key_buffer[indices]
            self.value_buffer = self.value_buffer[indices]
            self.batch_size = self.key_buffer.shape[0]
            self._set_length(self.length)

    def offload(self) -> None:
        if self.is_initialized:
            self.key_buffer = self.key_buffer.to("cpu", non_blocking=True)
            self.value_buffer = self.value_buffer.to("cpu", non_blocking=True)
            self._set_length(self.length)

    def prefetch(self) -> None:
        if self.is_initialized and self.key_buffer.device != self.device:
            self.key_buffer = self.key_buffer.to(self.device, non_blocking=True)
            self.value_buffer = self.value_buffer.to(self.device, non_blocking=True)
            self._set_length(self.length)

    def __repr__(self) -> str:
        capacity = self.key_buffer.shape[-2] if self.is_initialized else 0
        return f"{type(self).__name__}(length={self.length}, capacity={capacity})"


class GrowingKVLayer(KVBufferLayer):
    """A layer cache without a length limit: capacity doubles when full (amortised O(1) copy per token).

    Args:
        initial_capacity: slots allocated on the first write (more if the prompt is longer).
    """

    def __init__(self, initial_capacity: int = 128) -> None:
        super().__init__()
        if initial_capacity < 1:
            raise ValueError(f"GrowingKVLayer initial_capacity must be a positive integer, got {initial_capacity}.")
        self.initial_capacity = initial_capacity

    def _initial_capacity(self, needed: int) -> int:
        return max(self.initial_capacity, needed)

    def _ensure_capacity(self, needed: int) -> None:
        capacity = max(needed, 2 * self.key_buffer.shape[-2])
        batch_size, num_heads, _, _ = self.key_buffer.shape
        key_buffer = self.key_buffer.new_empty((batch_size, num_heads, capacity, self.key_buffer.shape[-1]))
        value_buffer = self.value_buffer.new_empty((batch_size, num_heads, capacity, self.value_buffer.shape[-1]))
        key_buffer[:, :, : self.length] = self.keys
        value_buffer[:, :, : self.length] = self.values
        self.key_buffer, self.value_buffer = key_buffer, value_buffer
        self._set_length(self.length)

    def get_max_length(self) -> int:
        return -1


class StaticKVLayer(KVBufferLayer):
    """A layer cache preallocated to ``max_cache_len`` slots on its first write, then only written in place.

    Built so that ``torch.compile`` traces one decoding step once and replays it for every token:

    * **The fill level is a 0-d tensor** (``cumulative_length``), advanced in place with ``add_``.
      A Python int would be a constant baked into the compiled graph: dynamo guards on it, so the
      next token (a different int) would recompile. A tensor is a graph *input*; its value may change
      freely.
    * **Writes go through** ``index_copy_`` at the slots ``cumulative_length + arange(T)``: the
      destination is computed on the device, not sliced with Python ints.
    * **Traced, ``update`` returns the whole buffer**, (B, H_kv, max_cache_len, D), the same shape at
      every step. A view of the filled prefix would have a different length each token (a new shape,
      a new graph). The price is attention over the empty tail; the model's mask hides it (those
      slots lie after every query's position, so causality alone masks them), which is why
      ``get_mask_sizes`` then reports ``max_cache_len``.

    This is transformers' ``StaticLayer`` contract, so ``generate`` can compile the forward
    (``cache_implementation="static"`` with a ``compile_config``). Run eagerly (nothing to trace),
    the layer keeps the eager-friendly contract of ``GrowingKVLayer`` instead: the fill level read as
    a Python int, the filled prefix returned, no attention over empty slots. Which one applies is
    ``torch.compiler.is_compiling()``, true while dynamo or ``torch.export`` traces.

    Args:
        max_cache_len: the most tokens (prompt + generated) it can hold.
    """

    is_compileable = True

    def __init__(self, max_cache_len: int) -> None:
        super().__init__()
        if not isinstance(max_cache_len, int) or max_cache_len < 1:
            raise ValueError(f"StaticKVLayer max_cache_len must be a positive integer, got {max_cache_len!r}.")
        self.max_cache_len = max_cache_len
        self.cumulative_length = torch.tensor(0, dtype=torch.long)  # 0-d: tokens written so far
        self.fresh = True  # nothing written since creation or reset: the next write may re-allocate

    def _initial_capacity(self, needed: int) -> int:
        if needed > self.max_cache_len:
            self._ensure_capacity(needed)
        return self.max_cache_len

    def _ensure_capacity(self, needed: int) -> None:
        raise ValueError(
            f"StaticKVCache is full: it needs {needed} slots but max_cache_len={self.max_cache_len}. "
            f"Create it with a larger max_cache_len (prompt length + max_new_tokens)."
        )

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Allocate the full-length buffers (zeros: the empty tail is read, masked, by attention)."""
        super().lazy_initialization(key_states, value_states)
        self.key_buffer.zero_()
        self.value_buffer.zero_()
        self.cumulative_length = self.cumulative_length.to(self.device)
        # transformers' `StaticLayer` does the same: it tells dynamo these tensors keep their address, so
        # a compiled graph (and a CUDA graph) may write into them in place without being re-recorded.
        if not torch.compiler.is_compiling():
            for tensor in (self.key_buffer, self.value_buffer, self.cumulative_length):
                torch._dynamo.mark_static_address(tensor)

    def _set_length(self, length: int) -> None:
        """Set the fill level (in place: a compiled graph holds this very tensor); ``keys``/``values`` are the whole buffers."""
        self.cumulative_length.fill_(length)
        self.keys, self.values = self.key_buffer, self.value_buffer

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k/v of shape (B, H_kv, T, D) at the next T slots; return both whole (B, H_kv, max_cache_len, D) buffers."""
        if self.fresh:
            # The first write of a sequence (never compiled: `generate` runs the prompt eagerly) may bring a
            # new batch size, dtype or device.
            if not (self.is_initialized and self._fits(key_states, value_states)):
                self.lazy_initialization(key_states, value_states)
            self.fresh = False
        new_tokens = key_states.shape[-2]
        if torch.compiler.is_compiling():
            # Traced: slots computed on the device from the 0-d fill level, no Python int anywhere (no bounds
            # check either; index_copy_ still refuses an out-of-range slot).
            slots = torch.arange(new_tokens, device=self.key_buffer.device) + self.cumulative_length  # (T,)
            self.key_buffer.index_copy_(2, slots, key_states)  # in place, into slots along the sequence axis
            self.value_buffer.index_copy_(2, slots, value_states)
            self.cumulative_length.add_(new_tokens)  # in place, never rebound: the compiled graph holds it
            return self.key_buffer, self.value_buffer  # (B, H_kv, max_cache_len, D): one shape for every token
        # Eager: one host read of the fill level per layer and step, then GrowingKVLayer's plain slice writes.
        start = int(self.cumulative_length)
        end = start + new_tokens
        if end > self.max_cache_len:
            self._ensure_capacity(end)
        self.key_buffer.narrow(2, start, new_tokens).copy_(key_states)  # in place, (B, H_kv, T, D) slots
        self.value_buffer.narrow(2, start, new_tokens).copy_(value_states)
        self.cumulative_length.add_(new_tokens)
        return self.key_buffer[:, :, :end], self.value_buffer[:, :, :end]  # (B, H_kv, past + T, D), views

    def get_seq_length(self) -> torch.Tensor | int:
        """The fill level: traced, a 0-d tensor (as transformers' ``StaticLayer``), a graph input whose value
        may change; eager, a Python int (0 before the first write)."""
        if not self.is_initialized:
            return 0
        return self.cumulative_length if torch.compiler.is_compiling() else int(self.cumulative_length)

    @property
    def length(self) -> int:
        """The fill level as a Python int (a host read: for inspection, not for the decoding loop)."""
        return int(self.cumulative_length)

    @length.setter
    def length(self, value: int) -> None:
        # `KVBufferLayer.__init__` sets `length = 0` before the tensor exists; the tensor is the truth.
        pass

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """(kv_length, kv_offset): traced, ``update`` returns the whole buffer (``max_cache_len`` from 0);
        eager, the filled prefix (``past + query_length`` from 0)."""
        if torch.compiler.is_compiling():
            return self.max_cache_len, 0
        return self.get_seq_length() + query_length, 0

    def reset(self) -> None:
        """Forget the contents but keep the buffers (stale slots sit beyond the fill level, masked)."""
        super().reset()
        self.fresh = True

    # crop, reorder_cache and the batch operations are KVBufferLayer's: they move the fill level through
    # `_set_length` (in place, into the tensor a compiled graph holds) and act on `keys`/`values`, here
    # the whole buffers.

    def __repr__(self) -> str:
        length = self.length if self.is_initialized else 0
        return f"{type(self).__name__}(length={length}, max_cache_len={self.max_cache_len})"

    def get_max_length(self) -> int:
        return self.max_cache_len


class GrowingKVCache(Cache):
    """A ``Cache`` of ``GrowingKVLayer``: unbounded length, in-place writes, capacity doubling.

    Args:
        num_layers: create this many layers now; ``None`` creates them as layers first write.
        initial_capacity: slots per layer allocated on the first write.

    ``update(k, v, layer_idx)`` returns views of shape (B, H_kv, past + T, D).
    """

    def __init__(self, num_layers: int | None = None, initial_capacity: int = 128) -> None:
        if num_layers is None:
            super().__init__(layer_class_to_replicate=partial(GrowingKVLayer, initial_capacity=initial_capacity))
        else:
            super().__init__(layers=[GrowingKVLayer(initial_capacity) for _ in range(num_layers)])


class StaticKVCache(Cache):
    """A ``Cache`` of ``StaticKVLayer``: each layer's buffers are allocated once at ``max_cache_len``.

    Args:
        max_cache_len: the most tokens (prompt + generated) a sequence may reach.
        num_layers: create this many layers now (so ``early_initialization`` can preallocate them);
            ``None`` creates them as layers first write.

    ``update(k, v, layer_idx)`` returns the whole buffers, (B, H_kv, max_cache_len, D), the same shape
    at every step, and the fill level is a 0-d tensor: what ``torch.compile`` needs to trace one
    decoding step once (see :class:`StaticKVLayer` and the module docstring).
    """

    def __init__(self, max_cache_len: int, num_layers: int | None = None) -> None:
        self.max_cache_len = max_cache_len
        if num_layers is None:
            super().__init__(layer_class_to_replicate=partial(StaticKVLayer, max_cache_len=max_cache_len))
        else:
            super().__init__(layers=[StaticKVLayer(max_cache_len) for _ in range(num_layers)])

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        """As :meth:`StaticKVLayer.get_mask_sizes`, also for a layer not created yet: traced, the first write
        already returns the whole buffer (``max_cache_len``); eager, the ``query_length`` tokens written."""
        if layer_idx < len(self.layers):
            return self.layers[layer_idx].get_mask_sizes(query_length)
        return (self.max_cache_len if torch.compiler.is_compiling() else query_length), 0
