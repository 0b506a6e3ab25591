"""Lesson 3: a GRU language model.

The n-gram MLP of lesson 2 sees a fixed window; a recurrent network folds the whole past into a
state vector, one token at a time, so its context is in principle unbounded and its cost per token
is constant. The price is sequential computation: step ``t`` needs step ``t - 1``. (Lesson 4's
attention removes that dependency during training and pays for it with a cache that grows.)

Generation makes the recurrent advantage concrete: the cache holds one (B, H) state per layer, and
each new token costs one step through each layer, never a re-run of the prefix.

A gated recurrent unit (Cho et al. 2014) written from two ``nn.Linear`` layers.

A GRU reads a sequence one step at a time and keeps everything it knows in one vector ``h``.
Two gates decide how much of ``h`` to keep: the update gate ``z`` interpolates between the old
state and a candidate, and the reset gate ``r`` decides how much of the old state the candidate
may look at. This is torch.nn.GRU's formulation, gates stacked in the order (r, z, n)::

    r = sigmoid(W_ir x + b_ir + W_hr h + b_hr)
    z = sigmoid(W_iz x + b_iz + W_hz h + b_hz)
    n = tanh(W_in x + b_in + r * (W_hn h + b_hn))
    h' = (1 - z) * n + z * h

Because the gates are learned and the update is a convex mix, gradients can flow through ``z * h``
across many steps without vanishing as fast as in a plain RNN.

Why the two ``nn.Linear``s (``input_proj`` = W_i[rzn], ``hidden_proj`` = W_h[rzn])? They hold the
weights in exactly ``torch.nn.GRU``'s layout, so the same parameters run through two kernels:

* ``eager``: the loop below, readable, and what ``peft`` can adapt (LoRA wraps ``nn.Linear``s);
* ``torch``: the fused ``torch.gru`` kernel that ``nn.GRU`` calls, much faster for training.

The input projection of all time steps is one (B*T, I) x (I, 3H) matmul before the loop; only the
hidden projection has to be sequential. That split, parallel input work and sequential state work,
is also how modern linear-recurrent models (Mamba, RWKV) make recurrence fast.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers import GenerationMixin
from transformers import initialization as init
from transformers.cache_utils import Cache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .causal_lm import CACHE_FIELD, RecurrentStateCache, ZooPreTrainedModel, keep_last_positions, mask_has_padding, take_loss_kwargs
from .configuration_gru import GRULMConfig


class GRULayer(GradientCheckpointingLayer):
    """One GRU layer over a whole sequence, with torch.nn.GRU's weight layout.

    A ``GradientCheckpointingLayer``: with ``gradient_checkpointing_enable()`` its per-step
    activations (T gate tensors in the eager loop) are recomputed in the backward instead of kept.
    """

    def __init__(self, input_size: int, hidden_size: int):
        super().__init__()
        self.hidden_size = hidden_size
        self.input_proj = nn.Linear(input_size, 3 * hidden_size)  # W_ir|W_iz|W_in, as nn.GRU's weight_ih_l0
        self.hidden_proj = nn.Linear(hidden_size, 3 * hidden_size)  # W_hr|W_hz|W_hn, as nn.GRU's weight_hh_l0

    def forward(
        self,
        x: torch.Tensor,
        h: torch.Tensor,
        mask: torch.Tensor | None = None,
        implementation: str = "eager",
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the sequence.

        Args:
            x: (B, T, I) inputs. h: (B, H) initial state.
            mask: (B, T) bool, False where a position is padding: the state passes through unchanged.
            implementation: "eager" or "torch".
        Returns:
            outputs (B, T, H) and the final state (B, H).
        """
        fused_ok = type(self.input_proj) is nn.Linear and type(self.hidden_proj) is nn.Linear
        # The fused kernel reads raw weights: with a peft adapter wrapped around the Linears it would
        # silently skip the adapter, and it has no notion of padding. The eager loop handles both.
        if implementation == "torch" and fused_ok and mask is None:
            return self._forward_fused(x, h)
        return self._forward_eager(x, h, mask)

    def _forward_eager(self, x, h, mask):
        gates_x = self.input_proj(x)  # (B, T, 3H): every time step in one matmul
        outputs = []
        for t in range(x.shape[1]):
            x_r, x_z, x_n = gates_x[:, t].chunk(3, dim=-1)  # (B, H) each
            h_r, h_z, h_n = self.hidden_proj(h).chunk(3, dim=-1)
            r = torch.sigmoid(x_r + h_r)
            z = torch.sigmoid(x_z + h_z)
            n = torch.tanh(x_n + r * h_n)
            h_new = n + z * (h - n)  # == (1 - z) * n + z * h
            if mask is not None:
                h_new = torch.where(mask[:, t, None], h_new, h)
            outputs.append(h_new)
            h = h_new
        return torch.stack(outputs, dim=1), h  # (B, T, H), (B, H)

    def _forward_fused(self, x, h):
        params = [self.input_proj.weight, self.hidden_proj.weight, self.input_proj.bias, self.hidden_proj.bias]
        # torch.gru(input, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first)
        outputs, h_last = torch.gru(x, h.unsqueeze(0).contiguous(), params, True, 1, 0.0, self.training, False, True)
        return outputs, h_last[0]  # (B, T, H), (1, B, H) -> (B, H)


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

    def new_cache(self, static: bool | None = None, max_cache_len: int | None = None) -> Cache:
        return RecurrentStateCache(num_layers=self.config.num_hidden_layers)  # one (B, H) state per layer: static by nature


class GRULMModel(GRULMPreTrainedModel):
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
        _, output_hidden_states = self.output_flags(output_attentions, output_hidden_states)
        cache, past_length, seq_len = self.start_forward(input_ids, inputs_embeds, past_key_values, use_cache, output_attentions, kwargs)
        mask = None
        if mask_has_padding(attention_mask, past_length):
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
                cache.set_state(h, i, per_token=x)  # x (B, T, H): the state after each token, for rollbacks
            x = self.dropout(x)
        if cache is not None:
            cache.advance(seq_len)
        if all_hidden_states is not None:
            all_hidden_states.append(x)
        return self.model_output(x, cache, all_hidden_states, return_dict)


class GRULMForCausalLM(GRULMPreTrainedModel, GenerationMixin):
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


__all__ = ["GRULMForCausalLM", "GRULMModel", "GRULMPreTrainedModel"]
