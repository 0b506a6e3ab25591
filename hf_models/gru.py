"""A gated recurrent unit (Cho et al. 2014) written from two ``nn.Linear`` layers.

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

import torch
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer

GRU_IMPLEMENTATIONS = ("eager", "torch")


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
