"""Normalization layers: LayerNorm (GPT-2) and RMSNorm (LLaMA).

What
----
A residual stream is a running sum: every block adds its output to it, so the scale of the
activations drifts with depth. A normalization layer rescales each token's hidden vector before
a block reads it, so every block sees inputs of a predictable size.

* **LayerNorm** (Ba, Kiros & Hinton 2016, "Layer Normalization") centres and rescales each token
  over its ``hidden_size`` features::

      y = (x - mean(x)) / sqrt(var(x) + eps) * weight + bias

  ``var`` is the *biased* variance (divide by ``hidden_size``, not ``hidden_size - 1``), as in
  ``torch.nn.LayerNorm``. GPT-2, BERT and the original Transformer (Vaswani et al. 2017) use it.

* **RMSNorm** (Zhang & Sennrich 2019, "Root Mean Square Layer Normalization") drops the centring
  and the bias::

      y = x / sqrt(mean(x ** 2) + eps) * weight

  The paper's finding is that the re-scaling, not the re-centring, is what stabilises training;
  removing the mean saves one reduction per token and a parameter vector. LLaMA, Mistral, Qwen,
  Gemma and most frontier decoders since 2023 use it.

Why float32
-----------
The mean of squares of a bf16/fp16 vector over thousands of features loses precision (and an fp16
``x ** 2`` overflows above 256), so both layers upcast to float32 for the statistics and cast back
to the input dtype afterwards. ``RMSNorm`` follows ``LlamaRMSNorm`` to the letter (cast back
*before* multiplying by ``weight``), which is what makes a converted LLaMA match transformers
bit for bit in half precision, not only in float32.

The hand-written math and the fast path
---------------------------------------
``LayerNorm._normalize`` is the readable reference. Written as separate tensor ops it launches
five or six kernels and materialises intermediates, where ``torch.nn.functional.layer_norm`` is a
single fused kernel (forward and backward) -- a measurable cost at nanoGPT scale, where the
layer norms are a sizeable share of the step. So ``LayerNorm(fused=True)``, the default, calls
``F.layer_norm``; ``fused=False`` runs the hand math. The test suite checks that both equal
``torch.nn.LayerNorm`` to 1e-6, so the fast path is covered by the reference. ``RMSNorm`` keeps
its hand math on every path: it is exactly what ``LlamaRMSNorm`` computes, and LLaMA-style models
are not on the nanoGPT speed budget. (Frontier training stacks fuse both norms into the
neighbouring matmul or residual-add kernels; the arithmetic is the same.)

Parameter names are ``weight`` and ``bias``, as in torch and transformers, so state dicts load
across implementations without renaming.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LayerNorm(nn.Module):
    """Layer normalization over the last dimension (Ba et al. 2016).

    Args:
        hidden_size: size of the normalized (last) dimension.
        eps: added to the variance before the square root; GPT-2 uses 1e-5.
        bias: learn an additive ``bias`` (GPT-2: yes; some modern models drop it).
        fused: use ``torch.nn.functional.layer_norm`` (one fused kernel) instead of the
            hand-written reference math. Both compute the same function; see the module docstring.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-5, bias: bool = True, fused: bool = True) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.eps = eps
        self.fused = fused
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.bias = nn.Parameter(torch.zeros(hidden_size)) if bias else None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.fused:
            return F.layer_norm(hidden_states, (self.hidden_size,), self.weight, self.bias, self.eps)
        return self._normalize(hidden_states)

    def _normalize(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Reference math: statistics in float32, affine transform in the input dtype."""
        input_dtype = hidden_states.dtype
        x = hidden_states.to(torch.float32)
        mean = x.mean(-1, keepdim=True)  # (..., 1)
        centred = x - mean
        variance = centred.pow(2).mean(-1, keepdim=True)  # biased variance, (..., 1)
        x = centred * torch.rsqrt(variance + self.eps)
        x = self.weight * x.to(input_dtype)
        if self.bias is not None:
            x = x + self.bias
        return x

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.eps}, bias={self.bias is not None}, fused={self.fused}"


class RMSNorm(nn.Module):
    """Root-mean-square normalization (Zhang & Sennrich 2019), as in ``LlamaRMSNorm``.

    Args:
        hidden_size: size of the normalized (last) dimension.
        eps: added to the mean square before the square root; LLaMA uses 1e-6 (LLaMA-1) or 1e-5.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        x = hidden_states.to(torch.float32)
        mean_square = x.pow(2).mean(-1, keepdim=True)  # (..., 1)
        x = x * torch.rsqrt(mean_square + self.eps)
        return self.weight * x.to(input_dtype)

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.eps}"
