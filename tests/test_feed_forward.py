"""The hand-written feed-forward blocks compute their formulas and equal transformers' MLPs.

``GELUMLP`` against the GELU formulas (exact erf and the tanh approximation) and transformers'
``ACT2FN``; ``SwiGLU`` against its formula and, bit for bit, ``LlamaMLP`` on the same weights.
GPT-2's ``GPT2MLP`` is checked with GPT-2 attention in ``test_attention.py``.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers.activations import ACT2FN
from transformers.models.llama.modeling_llama import LlamaMLP

from hf_models.modeling_gpt import GPTMLP as GELUMLP
from hf_models.modeling_modern import SwiGLU
from tests.helpers import HIDDEN, llama_config

pytestmark = pytest.mark.usefixtures("single_thread", "torch_seed")


def _new_gelu(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


@pytest.mark.parametrize(
    "activation,formula",
    [
        ("gelu", lambda x: 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))),
        ("gelu_new", _new_gelu),
        ("gelu_pytorch_tanh", _new_gelu),
    ],
)
def test_gelu_mlp_matches_formula(activation, formula):
    mlp = GELUMLP(HIDDEN, 4 * HIDDEN, bias=True, activation=activation)
    x = torch.randn(2, 5, HIDDEN)
    expected = formula(x @ mlp.up_proj.weight.T + mlp.up_proj.bias) @ mlp.down_proj.weight.T + mlp.down_proj.bias
    torch.testing.assert_close(mlp(x), expected, atol=1e-5, rtol=0)
    hidden = torch.randn(1000) * 4
    torch.testing.assert_close(mlp.act_fn(hidden), ACT2FN[activation](hidden), atol=1e-6, rtol=0)


def test_gpt_config_rejects_unknown_activation():
    from hf_models import GPTConfig

    with pytest.raises(ValueError, match=r"GPTConfig.hidden_act must be one of \['gelu', 'gelu_new', 'gelu_pytorch_tanh'\], got 'relu'"):
        GPTConfig(hidden_act="relu")


def test_swiglu_matches_formula_and_llama_mlp():
    mlp = SwiGLU(HIDDEN, 64)
    assert mlp.gate_proj.bias is None
    x = torch.randn(2, 5, HIDDEN)
    gate, up, down = mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight
    expected = (F.silu(x @ gate.T) * (x @ up.T)) @ down.T
    torch.testing.assert_close(mlp(x), expected, atol=1e-6, rtol=0)
    llama = LlamaMLP(llama_config())
    llama.load_state_dict(mlp.state_dict())
    torch.testing.assert_close(mlp(x), llama(x), atol=0, rtol=0)
