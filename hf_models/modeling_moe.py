"""Lesson 10: the mixture-of-experts decoder, the modern decoder with a routed FFN (Mixtral's architecture).

The skeleton is lesson 5's (``decoder.py``: RMSNorm, rotary, grouped-query attention); only the
feed-forward slot changes, to ``moe.SparseMoeBlock`` (``E`` SwiGLU experts, top-``k`` routing). The
outputs follow transformers' Mixtral: with ``output_router_logits`` the backbone returns every
layer's router logits (a :class:`~transformers.modeling_outputs.MoeModelOutputWithPast`) and the
causal LM the Switch balancing loss as ``aux_loss``, added to ``loss`` (times
``router_aux_loss_coef``, plus ST-MoE's z-loss times ``router_z_loss_coef``) when labels are given.
``hf_models.conversion.mixtral`` converts to and from ``transformers.MixtralForCausalLM`` with
identical logits.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import initialization as init
from transformers.cache_utils import Cache
from transformers.modeling_outputs import BaseModelOutputWithPast, MoeCausalLMOutputWithPast, MoeModelOutputWithPast

from .causal_lm import CACHE_FIELD
from .configuration_moe import MoEDecoderConfig
from .decoder import DecoderForCausalLM, DecoderModel, DecoderPreTrainedModel
from .moe import SparseMoeBlock, TopKRouter, load_balancing_loss, router_z_loss


class MoEDecoderPreTrainedModel(DecoderPreTrainedModel):
    """The decoders' init, plus the router's (a bare parameter that the generic init does not know)."""

    config_class = MoEDecoderConfig

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, TopKRouter):
            init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)


class MoEDecoderModel(MoEDecoderPreTrainedModel, DecoderModel):
    """The MoE backbone: ids -> hidden states, and with ``output_router_logits`` each layer's (B*T, E) router logits."""

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        output_router_logits: bool | None = None,
        **kwargs,
    ) -> MoeModelOutputWithPast | tuple:
        outputs: BaseModelOutputWithPast = super().forward(
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
        if output_router_logits is None:
            output_router_logits = self.config.output_router_logits
        # Each block kept its router logits from the forward that just ran (see SparseMoeBlock).
        router_logits = self.router_logits() if output_router_logits else None
        output = MoeModelOutputWithPast(
            last_hidden_state=outputs.last_hidden_state,
            hidden_states=outputs.hidden_states,
            router_logits=router_logits,
            **{CACHE_FIELD: getattr(outputs, CACHE_FIELD)},
        )
        return output if return_dict is not False else output.to_tuple()

    def router_logits(self) -> tuple[torch.Tensor, ...] | None:
        """Each routed layer's (B*T, E) logits from the last forward; ``None`` where no layer routes
        (lesson 12's configurable decoder with a dense feed-forward)."""
        return tuple(layer.mlp.router_logits for layer in self.layers if isinstance(layer.mlp, SparseMoeBlock)) or None

    def tokens_per_expert(self) -> torch.Tensor:
        """(layers, E): routing slots each expert received in the last forward (for monitoring the load)."""
        return torch.stack([layer.mlp.tokens_per_expert for layer in self.layers])


class MoEDecoderForCausalLM(MoEDecoderPreTrainedModel, DecoderForCausalLM):
    """The MoE backbone (``self.model``) and an LM head tied to its token embedding; Mixtral's outputs and losses."""

    base_model_class = MoEDecoderModel

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
        output_router_logits: bool | None = None,
        **kwargs,
    ) -> MoeCausalLMOutputWithPast | tuple:
        if output_router_logits is None:
            output_router_logits = self.config.output_router_logits
        output: MoeCausalLMOutputWithPast = super().forward(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            labels=labels,
            shift_labels=shift_labels,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
            logits_to_keep=logits_to_keep,
            output_router_logits=output_router_logits,
            **kwargs,
        )
        if output_router_logits and output.router_logits is None:
            # No layer routes (lesson 12's configurable decoder with a dense feed-forward): nothing is
            # unbalanced. A zero, not None, because clients that see `output_router_logits` in the config
            # (trl's trainers) ask for it and read `aux_loss` as a tensor.
            output["aux_loss"] = torch.zeros((), device=output.logits.device)
        elif output_router_logits:
            c = self.config
            # As Mixtral: padding is excluded from the balancing loss, which joins `loss` only with labels.
            output["aux_loss"] = load_balancing_loss(
                output.router_logits, c.num_local_experts, c.num_experts_per_tok, attention_mask, c.router_aux_loss_per_layer
            )
            if output.loss is not None:
                extra = c.router_aux_loss_coef * output.aux_loss
                if c.router_z_loss_coef:
                    extra = extra + c.router_z_loss_coef * router_z_loss(output.router_logits, attention_mask)
                output["loss"] = output.loss + extra.to(output.loss.device)
        return output if return_dict is not False else output.to_tuple()

    def num_active_parameters(self) -> int:
        """Parameters one token uses: all but the ``E - k`` experts it is not routed to, in every layer.

        The number a dense model is matched on (compute per token), against ``num_parameters()``
        (memory): Mixtral 8x7B has 47B parameters, 13B of them active.
        """
        c = self.config
        if not isinstance(self.model.layers[0].mlp, SparseMoeBlock):
            return self.num_parameters()  # a dense feed-forward: every parameter is active
        per_expert = sum(p.numel() for p in self.model.layers[0].mlp.experts[0].parameters())
        return self.num_parameters() - c.num_hidden_layers * (c.num_local_experts - c.num_experts_per_tok) * per_expert

    def causal_lm_output(self, loss: torch.Tensor | None, logits: torch.Tensor, outputs: MoeModelOutputWithPast):
        return MoeCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            router_logits=outputs.router_logits,
            **{CACHE_FIELD: getattr(outputs, CACHE_FIELD)},
        )


__all__ = ["MoEDecoderForCausalLM", "MoEDecoderModel"]
