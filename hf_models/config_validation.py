"""Checks that turn a bad config value into an error a person can act on.

A config is the contract between a saved checkpoint and the code that rebuilds it, so a wrong
value should fail when the config is built, with a message that names the field, the value and
what is allowed, rather than as a shape mismatch three modules deep. Each config calls these from
its ``validate_architecture`` method, which its ``__post_init__`` runs, so construction and
``from_pretrained`` both check. (transformers' own configs use ``huggingface_hub``'s ``@strict``
for this; a saved zoo folder must import only the standard library, torch and transformers.)
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def require_positive_int(config: Any, field: str) -> None:
    """Raise if ``config.<field>`` is not an integer greater than zero."""
    value = getattr(config, field)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{type(config).__name__}.{field} must be a positive integer, got {value!r}.")


def require_choice(config: Any, field: str, allowed: Iterable[Any]) -> None:
    """Raise if ``config.<field>`` is not one of ``allowed``."""
    value = getattr(config, field)
    allowed = tuple(allowed)
    if value not in allowed:
        raise ValueError(f"{type(config).__name__}.{field} must be one of {list(allowed)}, got {value!r}.")


def require_probability(config: Any, field: str) -> None:
    """Raise if ``config.<field>`` is not a float in [0, 1) (dropout rates and the like)."""
    value = getattr(config, field)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{type(config).__name__}.{field} must be a number in [0, 1), got {value!r}.")


def require_divisible(config: Any, field: str, divisor_field: str) -> None:
    """Raise if ``config.<field>`` is not a multiple of ``config.<divisor_field>``."""
    value, divisor = getattr(config, field), getattr(config, divisor_field)
    if value % divisor != 0:
        raise ValueError(
            f"{type(config).__name__}.{field}={value} must be divisible by {divisor_field}={divisor}."
        )


def require_moe_routing(config: Any) -> None:
    """The mixture-of-experts fields (Mixtral's names): ``1 <= num_experts_per_tok <= num_local_experts``,
    loss coefficients ``>= 0`` and boolean switches (lessons 10 and 12)."""
    name = type(config).__name__
    require_positive_int(config, "num_local_experts")
    require_positive_int(config, "num_experts_per_tok")
    if config.num_experts_per_tok > config.num_local_experts:
        raise ValueError(
            f"{name}.num_experts_per_tok={config.num_experts_per_tok} must be at most "
            f"num_local_experts={config.num_local_experts}: a token cannot be routed to more experts than there are."
        )
    for field in ("router_aux_loss_coef", "router_z_loss_coef"):
        value = getattr(config, field)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ValueError(f"{name}.{field} must be a number >= 0, got {value!r}.")
    for field in ("output_router_logits", "router_aux_loss_per_layer"):
        if not isinstance(getattr(config, field), bool):
            raise ValueError(f"{name}.{field} must be True or False, got {getattr(config, field)!r}.")
