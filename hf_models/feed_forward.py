"""Position-wise feed-forward networks: GPT-2's GELU MLP and LLaMA's SwiGLU.

What
----
After attention has mixed information *across* tokens, the feed-forward network (FFN) processes
each token *on its own*: expand the hidden vector to ``intermediate_size`` (usually about 4x
wider), apply a non-linearity, project back. Two thirds of a dense transformer's parameters and
FLOPs sit here; interpretability work reads these layers as key-value memories that store most
of what the model "knows".

* **GELU MLP** (Vaswani et al. 2017 with ReLU; GPT-2 switched to GELU, Hendrycks & Gimpel 2016)::

      down_proj(gelu(up_proj(x)))

  GPT-2 was trained with the tanh approximation of GELU, which transformers calls ``"gelu_new"``
  (and ``"gelu_pytorch_tanh"``, the same function computed by torch's fused kernel). The exact
  erf-based GELU is ``"gelu"``. The two differ by up to ~1e-3 per activation: small, but enough to
  break a 1e-5 equality test against a converted checkpoint, so the config must say which one.

* **SwiGLU** (Shazeer 2020, "GLU Variants Improve Transformer")::

      down_proj(silu(gate_proj(x)) * up_proj(x))

  A *gated* linear unit: one projection (passed through SiLU) decides, feature by feature, how
  much of the other projection gets through. At equal parameter count it reaches lower loss than
  a plain MLP, so LLaMA, Mistral, Qwen and Gemma all use a GLU variant. Because it has three
  matrices instead of two, LLaMA shrinks ``intermediate_size`` to about ``8/3 * hidden_size``
  (rounded to a multiple of 256) to keep the parameter count of a 4x MLP.

How it scales
-------------
The FFN is embarrassingly parallel over tokens, which is why frontier models grow here first:
tensor parallelism splits ``up_proj``/``gate_proj`` by columns and ``down_proj`` by rows (one
all-reduce per FFN, Megatron-LM), and Mixture-of-Experts models replace this one FFN with many,
routing each token to a few of them.

Names follow transformers' LLaMA (``gate_proj``, ``up_proj``, ``down_proj``); the GPT-2 converter
maps ``c_fc`` -> ``up_proj`` and ``c_proj`` -> ``down_proj`` (transposing GPT-2's ``Conv1D``).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

# Names as in transformers' ``ACT2FN``; values are the torch functions that compute them.
GELU_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "gelu_new": partial(F.gelu, approximate="tanh"),
    "gelu_pytorch_tanh": partial(F.gelu, approximate="tanh"),
}


class GELUMLP(nn.Module):
    """``down_proj(act(up_proj(x)))``, the GPT-2 feed-forward block.

    Args:
        hidden_size: model width ``C``.
        intermediate_size: inner width, ``4 * C`` in GPT-2.
        bias: give both projections a bias (GPT-2: yes).
        activation: ``"gelu"`` (exact, erf), ``"gelu_new"`` or ``"gelu_pytorch_tanh"`` (tanh
            approximation, what GPT-2 was trained with).
    """

    _residual_projections = ("down_proj",)  # writes into the residual stream

    def __init__(
        self, hidden_size: int, intermediate_size: int, bias: bool = True, activation: str = "gelu_new"
    ) -> None:
        super().__init__()
        if activation not in GELU_ACTIVATIONS:
            raise ValueError(
                f"GELUMLP activation must be one of {sorted(GELU_ACTIVATIONS)}, got {activation!r}."
            )
        self.activation = activation
        self.act_fn = GELU_ACTIVATIONS[activation]
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # (B, T, C) -> (B, T, I) -> (B, T, C)
        return self.down_proj(self.act_fn(self.up_proj(hidden_states)))

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}"


class SwiGLU(nn.Module):
    """``down_proj(silu(gate_proj(x)) * up_proj(x))``, the LLaMA feed-forward block (Shazeer 2020).

    Args:
        hidden_size: model width ``C``.
        intermediate_size: inner width (LLaMA-7B: 11008 for C = 4096).
        bias: give the three projections a bias (LLaMA: no).
    """

    _residual_projections = ("down_proj",)  # writes into the residual stream

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # (B, T, C) -> two (B, T, I) branches, gated elementwise -> (B, T, C)
        return self.down_proj(F.silu(self.gate_proj(hidden_states)) * self.up_proj(hidden_states))


def swiglu_intermediate_size(hidden_size: int) -> int:
    """LLaMA's SwiGLU width: ``8/3 * hidden_size`` rounded up to a multiple of 32.

    SwiGLU has three matrices to the GELU MLP's two, so 8/3 x width keeps the parameters of a 4x MLP.
    """
    return 32 * -(-8 * hidden_size // (3 * 32))
