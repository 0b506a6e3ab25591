"""The hand-written KV caches behave as transformers' caches do.

``GrowingKVCache`` and ``StaticKVCache``: incremental decoding (prompt, single tokens, a two-token
chunk) equals one full forward, as it does with ``DynamicCache`` and ``StaticCache``; every ``Cache``
operation generate() uses (reorder, crop, repeat, select, reset) leaves the same keys and values as
``DynamicCache``; and ``LlamaForCausalLM.generate`` (greedy, beam search, sampling, left-padded)
gives ``DynamicCache``'s exact tokens on them. Plus the growing cache's doubling and the static
cache's fixed, preallocated buffer.
"""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, LlamaForCausalLM, StaticCache

from hf_models.kv_cache import GrowingKVCache, GrowingKVLayer, StaticKVCache, StaticKVLayer
from hf_models.modeling_modern import RotaryEmbedding
from tests.helpers import attention_layer, ATOL, HEAD_DIM, HEADS, HIDDEN, left_padding_mask, llama_config, prepare_inputs

pytestmark = pytest.mark.usefixtures("single_thread", "torch_seed")


def make_cache(kind: str):
    if kind == "growing":
        return GrowingKVCache(initial_capacity=2)  # forces several doublings
    if kind == "static":
        return StaticKVCache(max_cache_len=24)
    if kind == "dynamic":
        return DynamicCache()
    if kind == "hf_static":
        return StaticCache(config=llama_config(), max_cache_len=24)
    raise ValueError(kind)


class TwoLayerAttention(torch.nn.Module):
    """Two residual attention layers sharing one cache, as in a decoder."""

    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList(attention_layer(HIDDEN, HEADS, 2, bias=False, layer_idx=i) for i in range(2))
        self.rope = RotaryEmbedding(HEAD_DIM)

    def forward(self, x, mask_2d, cache, implementation):
        mask, position_embeddings = prepare_inputs(x.shape[1], mask_2d, cache, self.rope)
        for layer in self.layers:
            x = x + layer(
                x,
                attention_mask=mask,
                position_embeddings=position_embeddings,
                past_key_values=cache,
                attn_implementation=implementation,
            )[0]  # (output, attention weights)
        return x


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("kind", ["growing", "static", "dynamic", "hf_static"])
@pytest.mark.parametrize("padded", [False, True], ids=["dense", "left_padded"])
def test_incremental_decoding_matches_full_forward(kind, implementation, padded):
    model = TwoLayerAttention().eval()
    length, prompt = 11, 5
    x = torch.randn(3, length, HIDDEN)
    mask_2d = left_padding_mask(3, length, [0, 2, 3]) if padded else None
    full = model(x, mask_2d, None, implementation)

    cache = make_cache(kind)
    # Prompt, then single tokens, then a two-token chunk (speculative-decoding style), then a token.
    boundaries = [0, prompt, prompt + 1, prompt + 2, prompt + 3, prompt + 5, length]
    pieces = []
    for start, end in zip(boundaries, boundaries[1:]):
        pieces.append(model(x[:, start:end], None if mask_2d is None else mask_2d[:, :end], cache, implementation))
    assert int(cache.get_seq_length()) == length
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=ATOL, rtol=0)


def fill(cache, batch=3, length=6, layers=2):
    data = [(torch.randn(batch, 2, length, HEAD_DIM), torch.randn(batch, 2, length, HEAD_DIM)) for _ in range(layers)]
    for layer_idx, (k, v) in enumerate(data):
        cache.update(k, v, layer_idx)
    return data


@pytest.mark.parametrize("kind", ["growing", "static"])
def test_cache_operations_match_dynamic_cache(kind):
    ours, reference = make_cache(kind), DynamicCache()
    data = fill(ours)
    for layer_idx, (k, v) in enumerate(data):
        reference.update(k, v, layer_idx)

    static = kind == "static"  # the static cache's keys/values are its whole buffer; compare the filled prefix

    def same():
        length = int(ours.get_seq_length())
        assert length == reference.get_seq_length()
        for mine, theirs in zip(ours.layers, reference.layers):
            torch.testing.assert_close(mine.keys[:, :, :length], theirs.keys, atol=0, rtol=0)
            torch.testing.assert_close(mine.values[:, :, :length], theirs.values, atol=0, rtol=0)
            assert static or mine.keys.shape == theirs.keys.shape

    same()
    assert ours.get_mask_sizes(1, 0) == (7, 0)  # eager: attention reads the filled prefix and the new token
    traced = torch.compile(lambda: ours.get_mask_sizes(1, 0), backend="eager", fullgraph=True)()
    assert traced == ((24, 0) if static else (7, 0))  # traced, the static cache hands over its whole buffer: one shape
    assert ours.is_compileable == static and ours.is_croppable

    buffer_address = ours.layers[0].key_buffer.data_ptr()
    beam_idx = torch.tensor([2, 0, 0])
    ours.reorder_cache(beam_idx)
    reference.reorder_cache(beam_idx)
    same()
    assert ours.layers[0].key_buffer.data_ptr() == buffer_address  # reordered in place

    ours.crop(-2)
    reference.crop(-2)
    same()
    with pytest.raises(ValueError, match="negative"):
        ours.crop(3)

    step = [(torch.randn(3, 2, 1, HEAD_DIM), torch.randn(3, 2, 1, HEAD_DIM)) for _ in range(2)]
    for layer_idx, (k, v) in enumerate(step):
        assert reference.update(k, v, layer_idx)[0].shape == (3, 2, 5, HEAD_DIM)
        assert ours.update(k, v, layer_idx)[0].shape == (3, 2, 5, HEAD_DIM)  # eager: the filled prefix, either cache
    same()

    ours.batch_repeat_interleave(2)
    reference.batch_repeat_interleave(2)
    same()
    ours.batch_select_indices(torch.tensor([1, 4, 5]))
    reference.batch_select_indices(torch.tensor([1, 4, 5]))
    same()

    ours.reset()
    assert ours.get_seq_length() == 0 and (static or ours.layers[0].keys.shape[-2] == 0)
    # A fresh sequence after reset may use another batch size.
    fill(ours, batch=1, length=3)
    assert ours.layers[1].keys.shape == (1, 2, 24 if static else 3, HEAD_DIM) and ours.get_seq_length() == 3


def test_growing_cache_doubles_capacity():
    layer = GrowingKVLayer(initial_capacity=4)
    capacities = []
    for _ in range(9):
        layer.update(torch.randn(1, 2, 1, HEAD_DIM), torch.randn(1, 2, 1, HEAD_DIM))
        capacities.append(layer.key_buffer.shape[-2])
    assert capacities == [4, 4, 4, 4, 8, 8, 8, 8, 16]
    layer.update(torch.randn(1, 2, 40, HEAD_DIM), torch.randn(1, 2, 40, HEAD_DIM))
    assert layer.key_buffer.shape[-2] == 49 and layer.get_seq_length() == 49


def test_static_cache_is_preallocated_and_bounded():
    layer = StaticKVLayer(max_cache_len=6)
    layer.update(torch.randn(2, 2, 4, HEAD_DIM), torch.randn(2, 2, 4, HEAD_DIM))
    address = layer.key_buffer.data_ptr()
    keys, _ = layer.update(torch.randn(2, 2, 2, HEAD_DIM), torch.randn(2, 2, 2, HEAD_DIM))
    assert keys.shape == (2, 2, 6, HEAD_DIM) and layer.key_buffer.shape[-2] == 6
    assert layer.key_buffer.data_ptr() == address and keys.data_ptr() == address  # a view, no copy
    with pytest.raises(ValueError, match="max_cache_len=6"):
        layer.update(torch.randn(2, 2, 1, HEAD_DIM), torch.randn(2, 2, 1, HEAD_DIM))
    assert layer.get_max_length() == 6
    cache = StaticKVCache(max_cache_len=6, num_layers=2)
    cache.early_initialization(batch_size=2, num_heads=2, head_dim=HEAD_DIM, dtype=torch.float32, device="cpu")
    assert all(layer.key_buffer.shape == (2, 2, 6, HEAD_DIM) for layer in cache.layers)


@pytest.mark.parametrize("kind", ["growing", "static"])
def test_caches_drive_transformers_generate(kind):
    """Greedy, beam search and sampling on a left-padded batch give DynamicCache's exact tokens."""
    model = LlamaForCausalLM(llama_config(num_hidden_layers=2)).eval()
    input_ids = torch.randint(3, 97, (2, 7))
    attention_mask = left_padding_mask(2, 7, [0, 3])
    settings = [
        dict(do_sample=False),
        dict(do_sample=False, num_beams=3, num_return_sequences=2),
        dict(do_sample=True, top_k=20),
    ]
    for generate_kwargs in settings:
        outputs = []
        for cache in (None, make_cache(kind)):
            torch.manual_seed(1)
            outputs.append(
                model.generate(
                    input_ids,
                    attention_mask=attention_mask,
                    max_new_tokens=6,
                    pad_token_id=0,
                    past_key_values=cache,
                    **generate_kwargs,
                )
            )
            assert cache is None or cache.get_seq_length() > input_ids.shape[1]
        assert torch.equal(outputs[0], outputs[1]), generate_kwargs
