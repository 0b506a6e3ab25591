"""The zoo's blocks compute on a CUDA device what they compute on the CPU (marked ``gpu``: skipped without one).

The reference is the same block on the CPU with the same weights and inputs: the norms, and the
attention layer (GQA, RoPE, left padding; eager and SDPA) through a prompt and a two-token step on
the hand-written growing KV cache, whose buffers must follow the keys onto the device.
"""

from __future__ import annotations

import pytest
import torch

from hf_models.kv_cache import GrowingKVCache
from hf_models.modeling_gpt import LayerNorm
from hf_models.modeling_modern import RMSNorm
from hf_models.modeling_modern import RotaryEmbedding
from tests.helpers import attention_layer, HEAD_DIM, HEADS, HIDDEN, left_padding_mask, run_attention

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("torch_seed")]

DEVICE = "cuda"
TOLERANCE = dict(atol=1e-5, rtol=1e-5)  # float32 on both; kernels differ only in summation order


def test_norms_on_cuda_match_cpu():
    x = torch.randn(3, 7, HIDDEN) * 3 + 1
    for norm in (RMSNorm(HIDDEN, eps=1e-6), LayerNorm(HIDDEN, eps=1e-5, bias=True)):
        with torch.no_grad():
            norm.weight.normal_()
        expected = norm(x)
        torch.testing.assert_close(norm.to(DEVICE)(x.to(DEVICE)).cpu(), expected, **TOLERANCE)


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_attention_with_kv_cache_on_cuda_matches_cpu(implementation):
    attention, rope = attention_layer(HIDDEN, HEADS, 2, bias=True).eval(), RotaryEmbedding(HEAD_DIM)
    prompt, length = 7, 9
    x = torch.randn(3, length, HIDDEN)
    mask_2d = left_padding_mask(3, length, [0, 2, 5])
    outputs = {}
    for device in ("cpu", DEVICE):
        attention.to(device)
        rope.to(device)
        cache = GrowingKVCache(initial_capacity=2)  # grows on the device it was fed
        with torch.no_grad():
            pieces = [
                run_attention(attention, x[:, start:end].to(device), mask_2d[:, :end].to(device), cache, rope, implementation)
                for start, end in ((0, prompt), (prompt, length))
            ]
        assert cache.layers[0].key_buffer.device.type == torch.device(device).type
        outputs[device] = torch.cat(pieces, dim=1).cpu()
    real = mask_2d.bool()  # padded query rows are garbage by design
    torch.testing.assert_close(outputs[DEVICE][real], outputs["cpu"][real], **TOLERANCE)


DECODERS = ["zoo_gpt", "zoo_modern", "zoo_moe", "zoo_configurable"]


@pytest.mark.parametrize("model_type", DECODERS)
def test_decoder_trains_and_generates_on_the_sdpa_flash_path(model_type):
    """With SDPA allowed only its flash kernel, each attention decoder trains a step in bf16 and generates
    with its cache; torch raises "No available kernel" if the model hands SDPA anything flash cannot
    take (an explicit mask where ``is_causal`` would do, fp32, an odd head size). The logits must be
    those of the math kernel, to bf16's precision. (The GPU check runs these as its ``sdpa_flash`` step.)"""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from tests.helpers import tiny_decoder

    vocab = 97
    model = tiny_decoder(model_type, vocab).to(DEVICE, torch.bfloat16)
    ids = torch.randint(0, vocab, (2, 24), device=DEVICE)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        reference = model(input_ids=ids).logits.float()
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        model.train()
        output = model(input_ids=ids, labels=ids)
        output.loss.backward()
        model.eval()
        with torch.no_grad():
            flash = model(input_ids=ids).logits.float()
            generated = model.generate(ids[:1, :8], max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.isfinite(output.loss) and all(p.grad is not None for p in model.parameters() if p.requires_grad)
    torch.testing.assert_close(flash, reference, atol=2e-2, rtol=2e-2)  # bf16: 8 mantissa bits, summation order differs
    assert generated.shape == (1, 16)
