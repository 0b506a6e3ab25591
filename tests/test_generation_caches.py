"""generate() through every KV cache gives the tokens it gives without one (lesson 6).

A KV cache is an optimisation: it must never change *what* is generated, only how fast. So each
decoder (GPT-2 style and LLaMA style) generates with no cache, with its default cache (the
hand-written growing one), with the hand-written growing and static caches passed explicitly, and
with transformers' ``DynamicCache`` and ``StaticCache``, and every variant must give the same ids,
for greedy search (eager and SDPA attention), sampling with a fixed seed, beam search and a
left-padded batch (each row must generate what its prompt generates alone). A last test checks
that, given no cache, generate() runs on the hand-written one that ``config.kv_cache`` names.

The tiny models are randomly initialised with a large ``initializer_range``: at the usual 0.02 a
random decoder repeats one token forever, and "all caches agree on 36, 36, 36, ..." would prove
little. Each test checks that the reference output is varied before comparing against it.
"""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, StaticCache

from hf_models.modeling_modern import build_causal_mask
from hf_models.kv_cache import GrowingKVCache, StaticKVCache
from tests.helpers import tiny_decoder

VOCAB = 60
CONTEXT = 64  # max_position_embeddings of the tiny models
PROMPT = 9
NEW_TOKENS = CONTEXT - PROMPT  # generate to the end of the context: a static cache ends exactly full
DECODERS = ["zoo_gpt", "zoo_modern"]
VARIED = dict(seed=2, initializer_range=0.3)  # random weights whose greedy text is not one token repeated
PAD = 0  # never in a prompt: without an attention_mask, generate() reads every PAD token as padding


pytestmark = pytest.mark.usefixtures("single_thread")


def prompt_ids(batch: int = 1, length: int = PROMPT, seed: int = 1) -> torch.LongTensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(PAD + 1, VOCAB, (batch, length), generator=generator)


# name -> generate() keyword arguments for that cache, built fresh per call (a cache holds one
# generation's state). "default" passes none: the model builds its own (config.kv_cache).
CACHES = {
    "no_cache": lambda model: dict(use_cache=False),
    "default": lambda model: dict(),
    "growing": lambda model: dict(past_key_values=GrowingKVCache()),
    "growing_doubling": lambda model: dict(past_key_values=GrowingKVCache(initial_capacity=4)),  # 4 -> 8 -> ... -> 64
    "static": lambda model: dict(past_key_values=StaticKVCache(max_cache_len=CONTEXT)),
    "dynamic": lambda model: dict(past_key_values=DynamicCache()),
    "hf_static": lambda model: dict(past_key_values=StaticCache(config=model.config, max_cache_len=CONTEXT)),
}


def generate_with(model, cache_name: str, input_ids, seed: int = 0, **generate_kwargs) -> torch.LongTensor:
    torch.manual_seed(seed)  # sampling draws from the global generator
    return model.generate(input_ids, pad_token_id=PAD, **CACHES[cache_name](model), **generate_kwargs)


def assert_varied(ids: torch.LongTensor, at_least: int = 5) -> None:
    """The reference output must not be a degenerate repeat, or agreeing with it proves nothing."""
    for row in ids:
        assert len(set(row[PROMPT:].tolist())) >= at_least, row.tolist()


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("model_type", DECODERS)
def test_greedy_is_identical_with_every_cache(model_type, attn_implementation):
    model = tiny_decoder(model_type, VOCAB, attn_implementation, **VARIED)
    ids = prompt_ids()
    outputs = {name: generate_with(model, name, ids, max_new_tokens=NEW_TOKENS, do_sample=False) for name in CACHES}
    reference = outputs["no_cache"]
    assert reference.shape == (1, CONTEXT)
    assert_varied(reference)
    for name, output in outputs.items():
        assert torch.equal(output, reference), f"{name}: {output[0, PROMPT:].tolist()} != {reference[0, PROMPT:].tolist()}"


@pytest.mark.parametrize("model_type", DECODERS)
def test_sampling_with_a_seed_is_identical_with_every_cache(model_type):
    model = tiny_decoder(model_type, VOCAB, **VARIED)
    ids = prompt_ids(batch=2)
    settings = dict(max_new_tokens=24, do_sample=True, top_k=20, temperature=1.0)
    reference = generate_with(model, "no_cache", ids, seed=7, **settings)
    assert_varied(reference, at_least=8)
    assert not torch.equal(reference, generate_with(model, "no_cache", ids, seed=8, **settings))  # it does sample
    for name in CACHES:
        assert torch.equal(generate_with(model, name, ids, seed=7, **settings), reference), name


@pytest.mark.parametrize("model_type", DECODERS)
def test_beam_search_is_identical_with_every_cache(model_type):
    """Beam search reorders the cache's batch rows after every step (``reorder_cache``)."""
    model = tiny_decoder(model_type, VOCAB, **VARIED)
    ids = prompt_ids(batch=2)
    settings = dict(max_new_tokens=16, do_sample=False, num_beams=3, num_return_sequences=2)
    reference = generate_with(model, "no_cache", ids, **settings)
    assert reference.shape == (4, PROMPT + 16)  # (batch * num_return_sequences, length)
    assert_varied(reference)
    for name in CACHES:
        assert torch.equal(generate_with(model, name, ids, **settings), reference), name


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("cache_name", ["no_cache", "default", "static", "dynamic", "hf_static"])
@pytest.mark.parametrize("model_type", DECODERS)
def test_left_padded_batch_rows_match_each_prompt_alone(model_type, cache_name, attn_implementation):
    """A batch of prompts of different lengths, left-padded: each row generates what its prompt
    generates alone (positions come from the mask, padding is never attended to)."""
    model = tiny_decoder(model_type, VOCAB, attn_implementation, **VARIED)
    lengths = [PROMPT, 4, 7]
    width, new_tokens = max(lengths), 20
    prompts = [prompt_ids(length=length, seed=10 + row)[0] for row, length in enumerate(lengths)]
    input_ids = torch.full((len(prompts), width), PAD)  # padding on the left
    attention_mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt):] = prompt
        attention_mask[row, width - len(prompt):] = 1

    batched = generate_with(model, cache_name, input_ids, attention_mask=attention_mask, max_new_tokens=new_tokens, do_sample=False)
    assert batched.shape == (len(prompts), width + new_tokens)
    for row, prompt in enumerate(prompts):
        alone = generate_with(model, cache_name, prompt[None], max_new_tokens=new_tokens, do_sample=False)
        assert len(set(alone[0, len(prompt):].tolist())) >= 5, alone.tolist()
        assert torch.equal(batched[row, width - len(prompt):], alone[0]), f"row {row} (prompt of {len(prompt)})"


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("model_type", DECODERS)
def test_forward_honours_a_4d_attention_mask(model_type, attn_implementation):
    """With a compileable cache (transformers' ``StaticCache``) generate() replaces the 2-D padding
    mask by a 4-D (B, 1, T, S) mask it builds itself, and passes the positions. A 4-D mask that says
    what the 2-D one says must give the same logits; the left-padded ``hf_static`` cases above fail
    exactly when it is ignored (the padding is then attended to)."""
    model = tiny_decoder(model_type, VOCAB, attn_implementation, **VARIED)
    input_ids = prompt_ids(batch=2, length=7)
    mask_2d = torch.ones(2, 7, dtype=torch.long)
    mask_2d[1, :3] = 0  # row 1: three padding tokens on the left
    positions = (mask_2d.cumsum(-1) - 1).clamp(min=0)  # (B, T), as generate() computes them
    mask_4d = build_causal_mask(mask_2d, query_length=7, key_length=7)  # (B, 1, T, S), True = may attend
    expected = model(input_ids, attention_mask=mask_2d, use_cache=False).logits
    got = model(input_ids, attention_mask=mask_4d, position_ids=positions, use_cache=False).logits
    real = mask_2d.bool()  # padding positions' outputs are meaningless either way
    torch.testing.assert_close(got[real], expected[real])


@pytest.mark.parametrize("model_type", DECODERS)
@pytest.mark.parametrize("kv_cache, expected", [("growing", GrowingKVCache), ("static", StaticKVCache)])
def test_generate_uses_the_hand_written_cache_by_default(model_type, kv_cache, expected):
    """With no ``past_key_values``, generate() runs on the cache ``config.kv_cache`` names, not a DynamicCache."""
    model = tiny_decoder(model_type, VOCAB, kv_cache=kv_cache, **VARIED)
    seen = []
    handle = model.register_forward_hook(lambda module, args, output: seen.append(type(output.past_key_values)))
    try:
        out = model.generate(prompt_ids(), max_new_tokens=5, do_sample=False, return_dict_in_generate=True, pad_token_id=PAD)
    finally:
        handle.remove()
    assert type(out.past_key_values) is expected
    assert seen == [expected] * 5  # the prompt forward and every decoding step
    assert out.past_key_values.get_seq_length() == PROMPT + 4  # the last token is never fed back
    if kv_cache == "static":
        # Preallocated once, at the full context, for every layer.
        assert [layer.key_buffer.shape[-2] for layer in out.past_key_values.layers] == [CONTEXT] * model.config.num_hidden_layers
