"""Lesson 10: the sparse mixture-of-experts feed-forward (Shazeer et al. 2017; Switch, Fedus et al. 2021; Mixtral 2024).

What
----
A dense decoder runs every token through the same feed-forward network (FFN). A mixture of experts
(MoE) keeps ``E`` FFNs, the *experts*, and a small linear *router* that sends each token to only
``k`` of them::

    logits  = x @ W_router.T                      # (N, E)
    probs   = softmax(logits)
    w, idx  = top_k(probs, k); w = w / w.sum()    # (N, k), renormalised over the chosen k
    y       = sum_j w_j * expert[idx_j](x)

The model holds ``E`` FFNs' worth of parameters but each token pays for ``k``: capacity grows with
``E`` while the FLOPs per token stay those of a ``k``-wide dense FFN. That is why frontier models
(Mixtral 8x7B: ``E=8, k=2``; DeepSeek-V3: 256 routed experts, ``k=8``, plus a shared one) are MoEs.

Load balancing
--------------
Left alone, the router collapses: the experts that win early get the gradient, get better and win
more, and the rest starve. The Switch Transformer's auxiliary loss pushes towards a uniform load::

    aux = E * sum_e f_e * P_e

with ``f_e`` the fraction of routing slots sent to expert ``e`` (not differentiable) and ``P_e`` the
mean router probability of ``e`` (differentiable): it is minimal (= k) when both are uniform.
:func:`load_balancing_loss` computes it exactly as transformers' Mixtral does (counts over all
layers at once, padding excluded). ST-MoE (Zoph et al. 2022) adds the router *z-loss*,
``mean(logsumexp(logits)^2)``, which keeps router logits small so the softmax stays stable in low
precision (:func:`router_z_loss`).

Dispatch, and how frontier systems do it
----------------------------------------
The naive way loops over experts and, for each, builds a boolean mask over the whole batch, gathers
the matching tokens, runs the expert and scatters back: ``E`` passes over all ``N`` tokens just to
find each expert's share. Here the ``N * k`` (token, expert) assignments are **sorted by expert**
once; each expert's tokens are then one contiguous slice of the sorted batch, and each expert runs
one matmul per projection over its slice (a "grouped" GEMM written as a loop of plain matmuls).
The trade-off: the sort and the gather/scatter cost memory traffic of ``N * k * C``, and reading
the per-expert counts (to split the batch) is one host sync per layer; in exchange no work is done
for tokens an expert does not see, and every matmul is dense.

A decode step (one new token per sequence, ``T == 1``, eval mode) takes another path,
:meth:`SparseMoeBlock.dense_decode`: every expert runs on the few new tokens and the weights are
zero off the top ``k``. Decoding is memory-bound, so that costs about what reading the chosen
experts would, and it reads nothing back to the host, so generation makes no device sync per token.

Experts stay separate ``nn.Linear`` modules (``experts.<e>.gate_proj`` and so on), not one 3-D
tensor, so peft can put a LoRA adapter on each and bitsandbytes can quantize each; the router weight
is a bare parameter, not a ``Linear``, so quantization and "all-linear" LoRA leave routing in full
precision, as in transformers' Mixtral.

At scale:

* **Expert parallelism** (GShard, Lepikhin et al. 2020): each device holds a few experts; tokens
  travel to their experts' devices and back in two all-to-all exchanges per MoE layer.
* **Capacity factor and token dropping** (GShard, Switch): to give every expert a fixed-size buffer
  (static shapes for TPUs/all-to-all), each expert takes at most ``capacity_factor * N * k / E``
  tokens and the overflow skips the layer through the residual. This module is *dropless*: every
  token is computed, as in Mixtral and MegaBlocks.
* **Grouped GEMM** (MegaBlocks, Gale et al. 2022; ``torch._grouped_mm``, CUTLASS grouped GEMM): one
  kernel launch multiplies all experts' variable-sized slices, expressed as block-sparse matmuls,
  instead of ``E`` launches; that is the GPU version of the per-expert loop below.
* Fine-grained and shared experts (DeepSeekMoE, Dai et al. 2024) and auxiliary-loss-free balancing
  by a per-expert bias on the router logits (DeepSeek-V3) are the current refinements.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .decoder import DecoderSpec, register_feed_forward
from .feed_forward import SwiGLU

# The name under which DecoderSpec(mlp=...) builds this block in every layer's feed-forward slot.
MOE_FEED_FORWARD = "sparse_moe"


class TopKRouter(nn.Module):
    """Scores the experts for each token and keeps the ``k`` best, with weights renormalised to sum to 1.

    The softmax runs in float32 whatever the activations' dtype: routing decisions flip on small
    logit differences, and bf16 has 8 bits of mantissa. Renormalising over the chosen ``k`` (Mixtral)
    keeps the output's scale independent of how confident the router is, and the router still learns
    from the task loss through the ratio of the ``k`` weights. At ``k = 1`` that ratio is gone (the
    weight is always 1) and the router learns from the balancing loss alone, which is why Switch
    (``k = 1``) scales the expert's output by the raw probability instead (transformers' Qwen2-MoE
    makes the choice a config field, ``norm_topk_prob``; this router always renormalises, as Mixtral).

    Args:
        hidden_size: model width ``C``.
        num_experts: ``E``.
        top_k: ``k``, experts per token, ``1 <= k <= E``.
    """

    def __init__(self, hidden_size: int, num_experts: int, top_k: int) -> None:
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"TopKRouter top_k must be in [1, num_experts={num_experts}], got {top_k}.")
        self.num_experts = num_experts
        self.top_k = top_k
        # (E, C): a bare parameter, not an nn.Linear, so int8/NF4 and "all-linear" LoRA leave routing alone.
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(N, C) -> router logits (N, E), top-k weights (N, k) in float32, top-k expert ids (N, k)."""
        logits = F.linear(hidden_states, self.weight)  # (N, E)
        probs = torch.softmax(logits.float(), dim=-1)
        weights, experts = torch.topk(probs, self.top_k, dim=-1)  # (N, k)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        return logits, weights, experts

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, top_k={self.top_k}"


class SparseMoeBlock(nn.Module):
    """A top-k routed mixture of SwiGLU experts, dropless, dispatched by sorting tokens by expert.

    Drop-in for a dense FFN: (B, T, C) -> (B, T, C). After each forward the block keeps, for the
    model's losses and for monitoring, ``router_logits`` (B*T, E) and ``tokens_per_expert`` (E,)
    (routing slots each expert received; they sum to ``B*T*k``). Both come from work the forward
    does anyway.

    Args:
        hidden_size: model width ``C``.
        intermediate_size: each expert's SwiGLU width.
        num_experts: ``E``.
        top_k: experts per token ``k``.
        bias: biases in the experts' projections (Mixtral: no).
    """

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, top_k: int, bias: bool = False) -> None:
        super().__init__()
        self.router = TopKRouter(hidden_size, num_experts, top_k)
        self.experts = nn.ModuleList(SwiGLU(hidden_size, intermediate_size, bias=bias) for _ in range(num_experts))
        self.router_logits: torch.Tensor | None = None
        self.tokens_per_expert: torch.Tensor | None = None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        tokens = hidden_states.reshape(-1, shape[-1])  # (B, T, C) -> (N, C)
        logits, weights, experts = self.router(tokens)  # (N, E), (N, k), (N, k)
        if shape[1] == 1 and not self.training:
            combined, counts = self.dense_decode(tokens, weights, experts)
        else:
            combined, counts = self.grouped_dispatch(tokens, weights, experts)
        self.router_logits, self.tokens_per_expert = logits, counts.detach()
        return combined.reshape(shape)

    def grouped_dispatch(
        self, tokens: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Sort the (token, expert) slots by expert, run each expert once over its contiguous run, scatter back.

        ``counts.tolist()`` (to split the batch) is one host read per layer: free on a CPU, a
        device sync on a GPU, which grouped-GEMM kernels avoid by taking the offsets on device.
        """
        top_k = experts.shape[-1]
        flat_experts = experts.reshape(-1)  # (N*k,), slot s belongs to token s // k
        order = flat_experts.argsort(stable=True)  # (N*k,)
        token_of_slot = order // top_k  # (N*k,) the token of each sorted slot
        counts = torch.bincount(flat_experts, minlength=self.router.num_experts)  # (E,)
        grouped = tokens[token_of_slot]  # (N*k, C): expert 0's tokens, then expert 1's, ...
        outputs = [self.experts[e](run) for e, run in enumerate(grouped.split(counts.tolist())) if run.shape[0]]
        expert_out = torch.cat(outputs)  # (N*k, C), still in sorted order
        expert_out = expert_out * weights.reshape(-1)[order, None].to(expert_out.dtype)
        combined = torch.zeros_like(tokens).index_add_(0, token_of_slot, expert_out.to(tokens.dtype))  # (N, C)
        return combined, counts

    def dense_decode(
        self, tokens: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A decode step (one new token per sequence): every expert on the few tokens, weights zero off the top k.

        Decoding is memory-bound: once ``B * k >= E`` every expert's weights are read anyway, so
        computing all of them costs about the same time, and nothing is read back to the host, so
        generation makes no device sync per token (servers such as vLLM use a fused MoE kernel
        that takes the routing on device instead).
        """
        num_experts = self.router.num_experts
        dense_weights = torch.zeros(tokens.shape[0], num_experts, device=tokens.device).scatter(1, experts, weights)  # (N, E)
        counts = torch.zeros(num_experts, dtype=torch.long, device=tokens.device).scatter_add(
            0, experts.reshape(-1), torch.ones_like(experts.reshape(-1))
        )
        outputs = torch.stack([expert(tokens) for expert in self.experts], dim=1)  # (N, E, C)
        combined = (outputs * dense_weights[..., None].to(outputs.dtype)).sum(dim=1)  # (N, C)
        return combined.to(tokens.dtype), counts

    @classmethod
    def from_spec(cls, spec: MoEDecoderSpec) -> SparseMoeBlock:
        return cls(spec.hidden_size, spec.intermediate_size, spec.num_local_experts, spec.num_experts_per_tok, bias=spec.mlp_bias)


@dataclass(frozen=True)
class MoEDecoderSpec(DecoderSpec):
    """A :class:`~hf_models.decoder.DecoderSpec` with the MoE slot's fields (transformers' Mixtral names)."""

    num_local_experts: int = 8
    num_experts_per_tok: int = 2


register_feed_forward(MOE_FEED_FORWARD, SparseMoeBlock.from_spec)


def _padding_weights(attention_mask: torch.Tensor | None, rows: int, device: torch.device) -> torch.Tensor | None:
    """The (N,) float weights of each router row: 1 for real tokens, 0 for padding; None without a 2-D mask.

    Router rows are the (B, T) positions of this forward, flattened; with a KV cache the mask covers
    the cached tokens too, so its last T columns are the ones that match.
    """
    if attention_mask is None or attention_mask.dim() != 2:
        return None
    batch = attention_mask.shape[0]
    return attention_mask[:, -(rows // batch):].reshape(-1).to(device=device, dtype=torch.float32)


def load_balancing_loss(
    router_logits: tuple[torch.Tensor, ...],
    num_experts: int,
    top_k: int,
    attention_mask: torch.Tensor | None = None,
    per_layer: bool = False,
) -> torch.Tensor:
    """Switch Transformer's balancing loss ``E * sum_e f_e * P_e`` (Fedus et al. 2021, eqs. 4-6).

    ``f_e``: the fraction of top-k routing slots given to expert ``e``; ``P_e``: the mean router
    probability of ``e``; padding (``attention_mask == 0``) excluded. Equals ``k`` for a perfectly
    uniform router; ``k * E`` when every token goes to the same ``k`` experts.

    ``per_layer=False`` is transformers' Mixtral: ``f`` and ``P`` are taken over every layer's
    tokens at once, so expert ``e`` of layer 1 and expert ``e`` of layer 2 (different experts)
    share one count, and layers can stay unbalanced as long as their imbalances cancel.
    ``per_layer=True`` is the Switch Transformer's: the loss of each layer, averaged over layers.

    Args:
        router_logits: one (N, E) tensor per layer.
        attention_mask: (B, S) with 1 for real tokens, or None.
    """
    if per_layer:
        return torch.stack([load_balancing_loss((logits,), num_experts, top_k, attention_mask) for logits in router_logits]).mean()
    device = router_logits[0].device
    mask = _padding_weights(attention_mask, router_logits[0].shape[0], device)
    slots = torch.zeros(num_experts, device=device)
    prob_sum = torch.zeros(num_experts, device=device)
    rows = torch.zeros((), device=device)
    for logits in router_logits:
        probs = torch.softmax(logits.float(), dim=-1)  # (N, E)
        chosen = torch.topk(probs, top_k, dim=-1).indices  # (N, k)
        weight = torch.ones(logits.shape[0], device=device) if mask is None else mask
        slots = slots.scatter_add(0, chosen.reshape(-1), weight.repeat_interleave(top_k))
        prob_sum = prob_sum + (probs * weight[:, None]).sum(dim=0)
        rows = rows + weight.sum()
    return num_experts * torch.sum((slots / rows) * (prob_sum / rows))


def router_z_loss(router_logits: tuple[torch.Tensor, ...], attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """ST-MoE's router z-loss (Zoph et al. 2022, eq. 5): mean over tokens of ``logsumexp(logits)^2``, averaged over layers.

    Penalises large router logits, which in bf16 make the softmax round badly and training diverge.
    Padding (``attention_mask == 0``) is excluded, as in the balancing loss.
    """
    device = router_logits[0].device
    mask = _padding_weights(attention_mask, router_logits[0].shape[0], device)
    total = torch.zeros((), device=device)
    for logits in router_logits:
        z = torch.logsumexp(logits.float(), dim=-1).square()  # (N,)
        total = total + (z.mean() if mask is None else (z * mask).sum() / mask.sum())
    return total / len(router_logits)


__all__ = [
    "MOE_FEED_FORWARD",
    "MoEDecoderSpec",
    "SparseMoeBlock",
    "TopKRouter",
    "load_balancing_loss",
    "router_z_loss",
]
