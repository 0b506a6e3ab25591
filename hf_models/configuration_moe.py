"""Configuration of the mixture-of-experts decoder (lesson 10)."""

from __future__ import annotations

from dataclasses import asdict

from .config_validation import require_moe_routing
from .configuration_modern import ModernDecoderConfig
from .moe import MOE_FEED_FORWARD, MoEDecoderSpec


class MoEDecoderConfig(ModernDecoderConfig):
    r"""
    The modern decoder (every field of :class:`ModernDecoderConfig`) with a sparse mixture of SwiGLU
    experts in place of each layer's feed-forward. The MoE fields carry transformers' Mixtral names.

    Args:
        intermediate_size (`int`, *optional*): Each expert's SwiGLU width (default as in the modern decoder).
            A token's active feed-forward is `num_experts_per_tok` experts wide.
        num_local_experts (`int`, defaults to 8): Experts per layer, `E`.
        num_experts_per_tok (`int`, defaults to 2): Experts each token is routed to, `k` (1 <= k <= E).
        output_router_logits (`bool`, defaults to `False`): Return every layer's router logits and the
            balancing `aux_loss`, and add `router_aux_loss_coef * aux_loss` to `loss` when labels are given
            (as Mixtral: training with the balancing loss needs this on).
        router_aux_loss_coef (`float`, defaults to 0.01): Weight of the Switch balancing loss (Switch
            Transformer's alpha = 0.01; transformers' Mixtral config defaults to 0.001). 0 turns it off.
        router_aux_loss_per_layer (`bool`, defaults to `False`): Balance each layer's experts separately (Switch
            Transformer) instead of counting every layer's tokens together (transformers' Mixtral, the default, which
            equal conversion needs); see `moe.load_balancing_loss`.
        router_z_loss_coef (`float`, defaults to 0.0): Weight of ST-MoE's router z-loss (the paper uses
            0.001), added to `loss` when labels are given and `output_router_logits` is on.
    """

    model_type = "zoo_moe"
    attribute_map = {"num_experts": "num_local_experts"}  # as Mixtral's config; trl's fused loss reads `num_experts`

    num_local_experts: int = 8
    num_experts_per_tok: int = 2
    output_router_logits: bool = False
    router_aux_loss_coef: float = 0.01
    router_aux_loss_per_layer: bool = False
    router_z_loss_coef: float = 0.0

    def validate_architecture(self):
        """Fail on values the model cannot be built with, naming the field (also runs on `from_pretrained`)."""
        super().validate_architecture()
        require_moe_routing(self)

    def decoder_spec(self) -> MoEDecoderSpec:
        return MoEDecoderSpec(
            **{**asdict(super().decoder_spec()), "mlp": MOE_FEED_FORWARD},
            num_local_experts=self.num_local_experts,
            num_experts_per_tok=self.num_experts_per_tok,
        )


__all__ = ["MoEDecoderConfig"]
