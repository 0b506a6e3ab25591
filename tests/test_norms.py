"""The hand-written norms equal their references on the same weights.

``LayerNorm`` (fused and explicit, with and without bias) against ``torch.nn.LayerNorm``; ``RMSNorm``
against ``torch.nn.RMSNorm`` and, bit for bit, transformers' ``LlamaRMSNorm``.
"""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from hf_models.modeling_gpt import LayerNorm
from hf_models.modeling_modern import RMSNorm
from tests.helpers import HIDDEN

pytestmark = pytest.mark.usefixtures("single_thread", "torch_seed")


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_layer_norm_matches_torch(fused, bias):
    ours = LayerNorm(HIDDEN, eps=1e-5, bias=bias, fused=fused)
    reference = torch.nn.LayerNorm(HIDDEN, eps=1e-5, bias=bias)
    with torch.no_grad():
        reference.weight.normal_()
        if bias:
            reference.bias.normal_()
    assert ours.state_dict().keys() == reference.state_dict().keys()
    ours.load_state_dict(reference.state_dict())
    x = torch.randn(3, 7, HIDDEN) * 3 + 1
    torch.testing.assert_close(ours(x), reference(x), atol=1e-6, rtol=0)


def test_rms_norm_matches_torch_and_llama():
    ours = RMSNorm(HIDDEN, eps=1e-6)
    reference = torch.nn.RMSNorm(HIDDEN, eps=1e-6)
    llama = LlamaRMSNorm(HIDDEN, eps=1e-6)
    with torch.no_grad():
        reference.weight.normal_()
    assert ours.state_dict().keys() == reference.state_dict().keys() == llama.state_dict().keys()
    ours.load_state_dict(reference.state_dict())
    llama.load_state_dict(reference.state_dict())
    x = torch.randn(3, 7, HIDDEN) * 3 + 1
    torch.testing.assert_close(ours(x), reference(x), atol=1e-6, rtol=0)
    torch.testing.assert_close(ours(x), llama(x), atol=0, rtol=0)
    x16 = x.to(torch.bfloat16)
    assert ours.to(torch.bfloat16)(x16).dtype == torch.bfloat16
