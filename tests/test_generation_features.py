"""transformers' own generation features and model contract on the zoo's models, as a transformers user reaches for them.

Every generation test compares tokens with plain greedy decoding of the same model; the attention
weights are compared with ``LlamaForCausalLM``'s on the same weights.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.modeling_utils import AttentionInterface

from hf_models.causal_lm import RecurrentStateCache
from hf_models.conversion.llama import modern_to_llama
from hf_models.kv_cache import StaticKVCache
from hf_models.tokenization.bpe import ByteLevelBPE
from tests.helpers import TINY_TEXT, build_tiny_model, sample_ids

DECODERS = ["zoo_gpt", "zoo_modern", "zoo_moe", "zoo_configurable"]
RECURRENT = ["zoo_gru", "zoo_ngram_mlp", "zoo_bigram"]
# Positions a model can run past its trained context: rotary (modern, MoE, the tiny configurable) and recurrences.
UNBOUNDED = ["zoo_modern", "zoo_moe", "zoo_configurable", "zoo_gru", "zoo_ngram_mlp"]


def greedy(model, ids, **kwargs):
    with torch.no_grad():
        return model.generate(ids, do_sample=False, max_new_tokens=kwargs.pop("max_new_tokens", 12), **kwargs)


def prompt(tokenizer, length: int = 10) -> torch.LongTensor:
    return sample_ids(tokenizer, batch=1)[:, :length]


# ----------------------------------------------------------------------------- assisted decoding


@pytest.mark.parametrize("model_type", DECODERS + RECURRENT)
def test_assisted_generation_gives_the_greedy_tokens(model_type, tiny_tokenizer):
    model = build_tiny_model(model_type, len(tiny_tokenizer))
    assistant = build_tiny_model(model_type, len(tiny_tokenizer), seed=1)  # other weights: some drafts are rejected
    ids = prompt(tiny_tokenizer)
    expected = greedy(model, ids)
    torch.testing.assert_close(greedy(model, ids, assistant_model=assistant), expected, rtol=0, atol=0)


@pytest.mark.parametrize("model_type", ["zoo_gpt", "zoo_modern"])
def test_a_recurrent_draft_model_rolls_back_its_state(model_type, tiny_tokenizer):
    # The GRU as the *assistant*: the main model rejects some of its drafts, and the GRU's state must roll back.
    model = build_tiny_model(model_type, len(tiny_tokenizer))
    assistant = build_tiny_model("zoo_gru", len(tiny_tokenizer), seed=1)
    ids = prompt(tiny_tokenizer)
    torch.testing.assert_close(greedy(model, ids, assistant_model=assistant), greedy(model, ids), rtol=0, atol=0)


@pytest.mark.parametrize("model_type", DECODERS + RECURRENT)
def test_prompt_lookup_gives_the_greedy_tokens(model_type, tiny_tokenizer):
    model = build_tiny_model(model_type, len(tiny_tokenizer))
    ids = sample_ids(tiny_tokenizer, batch=1)  # the sample repeats itself, so lookups find candidates
    ids = torch.cat([ids, ids], dim=1)
    torch.testing.assert_close(greedy(model, ids, prompt_lookup_num_tokens=3), greedy(model, ids), rtol=0, atol=0)


def test_the_recurrent_state_rolls_back_to_the_state_of_the_shorter_prefix(tiny_tokenizer):
    model = build_tiny_model("zoo_gru", len(tiny_tokenizer))
    ids = prompt(tiny_tokenizer, 12)
    with torch.no_grad():
        cache = RecurrentStateCache(num_layers=model.config.num_hidden_layers)
        cache.activate_past_recording()
        model(ids[:, :5], past_key_values=cache)
        model(ids[:, 5:], past_key_values=cache)
        cache.crop(-4)  # back to 8 tokens: the state is that of the first 8 tokens read in one go
        reference = model(ids[:, :8], use_cache=True).past_key_values
        assert cache.get_seq_length() == 8
        for layer in range(model.config.num_hidden_layers):
            torch.testing.assert_close(cache.get_state(layer), reference.get_state(layer), rtol=1e-6, atol=1e-6)
        with pytest.raises(RuntimeError, match="Cannot roll the recurrent state back by 9 tokens"):
            cache.crop(-9)


# ----------------------------------------------------------------------------- generate() arguments


@pytest.fixture(scope="module")
def bpe_tokenizer():
    """Lesson 2's byte-level BPE, the tokenizer the recipes save, trained on a few lines."""
    return ByteLevelBPE.train([TINY_TEXT * 4], vocab_size=256 + 40 + 1, min_frequency=1).to_fast_tokenizer()


@pytest.mark.parametrize("model_type", ["zoo_gpt", "zoo_modern", "zoo_gru"])
def test_stop_strings_with_a_tokenizer(model_type, bpe_tokenizer):
    model = build_tiny_model(model_type, len(bpe_tokenizer))
    ids = torch.tensor([bpe_tokenizer(TINY_TEXT[:30])["input_ids"]])
    full = greedy(model, ids, max_new_tokens=16)[0, ids.shape[1]:]

    def text_after(k: int) -> str:  # prompt and the first k new tokens, as the stop-string check reads them
        return bpe_tokenizer.decode(torch.cat([ids[0], full[:k]]))

    # A stop string the greedy text reaches: two plain characters it ends with after a few new tokens.
    stop = next(text_after(k)[-2:] for k in range(3, 17) if text_after(k)[-2:].isascii() and text_after(k)[-2:].isprintable())
    first = next(k for k in range(1, 17) if text_after(k).endswith(stop))  # where generation must stop
    stopped = greedy(model, ids, max_new_tokens=16, stop_strings=[stop], tokenizer=bpe_tokenizer)[0, ids.shape[1]:]
    assert first < len(full)
    torch.testing.assert_close(stopped, full[:first], rtol=0, atol=0)


@pytest.mark.parametrize("model_type", DECODERS)
def test_cache_implementation_static_is_lesson_6s_static_cache(model_type, tiny_tokenizer):
    model = build_tiny_model(model_type, len(tiny_tokenizer))
    ids = prompt(tiny_tokenizer)
    with torch.no_grad():
        out = model.generate(
            ids, do_sample=False, max_new_tokens=12, cache_implementation="static", return_dict_in_generate=True
        )
    cache = out.past_key_values if hasattr(out, "past_key_values") else out.cache
    assert isinstance(cache, StaticKVCache) and cache.max_cache_len == ids.shape[1] + 12 - 1
    torch.testing.assert_close(out.sequences, greedy(model, ids), rtol=0, atol=0)
    with pytest.raises(ValueError, match="cache_implementation='offloaded' is not supported"):
        greedy(model, ids, cache_implementation="offloaded")


@pytest.mark.parametrize("model_type", UNBOUNDED)
def test_unbounded_positions_generate_past_the_context(model_type, tiny_tokenizer):
    model = build_tiny_model(model_type, len(tiny_tokenizer), max_position_embeddings=16)
    ids = prompt(tiny_tokenizer)
    out = greedy(model, ids, max_new_tokens=20)
    assert out.shape[1] == ids.shape[1] + 20 > model.config.max_position_embeddings


def test_rotary_positions_past_the_context_match_llama(tiny_tokenizer):
    model = build_tiny_model("zoo_modern", len(tiny_tokenizer), max_position_embeddings=16)
    llama = modern_to_llama(model).eval()
    ids = prompt(tiny_tokenizer)
    torch.testing.assert_close(greedy(model, ids, max_new_tokens=20), greedy(llama, ids, max_new_tokens=20), rtol=0, atol=0)
    torch.testing.assert_close(
        greedy(model, ids, max_new_tokens=20, cache_implementation="static"), greedy(llama, ids, max_new_tokens=20), rtol=0, atol=0
    )


@pytest.mark.parametrize("overrides", [{}, {"positions": "learned"}], ids=["gpt", "configurable-learned"])
def test_learned_positions_refuse_past_the_context_before_any_forward(overrides, tiny_tokenizer):
    model_type = "zoo_configurable" if overrides else "zoo_gpt"
    model = build_tiny_model(model_type, len(tiny_tokenizer), max_position_embeddings=16, **overrides)
    calls = []
    model.register_forward_pre_hook(lambda *args: calls.append(1))
    ids = prompt(tiny_tokenizer)
    with pytest.raises(ValueError, match=r"max_new_tokens: a prompt of 10 tokens plus 20 new ones .* context of 16 positions"):
        greedy(model, ids, max_new_tokens=20)
    assert calls == []
    assert greedy(model, ids, max_new_tokens=6).shape[1] == 16  # exactly the context is fine


# ----------------------------------------------------------------------------- the model contract


def test_attention_weights_equal_llamas_on_the_same_weights(tiny_tokenizer):
    model = build_tiny_model("zoo_modern", len(tiny_tokenizer))
    llama = modern_to_llama(model).eval()
    llama.config._attn_implementation = "eager"
    ids = sample_ids(tiny_tokenizer)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding
    with torch.no_grad():
        ours = model(ids, attention_mask=mask, output_attentions=True).attentions
        theirs = llama(ids, attention_mask=mask, output_attentions=True).attentions
    assert len(ours) == len(theirs) == model.config.num_hidden_layers
    for a, b in zip(ours, theirs):
        assert a.shape == (2, model.config.num_attention_heads, ids.shape[1], ids.shape[1])
        torch.testing.assert_close(a[1], b[1], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a[0, :, 3:], b[0, :, 3:], rtol=1e-5, atol=1e-5)  # padding queries: any valid row


@pytest.mark.parametrize("model_type", DECODERS)
def test_attention_weights_in_forward_and_generate(model_type, tiny_tokenizer):
    model = build_tiny_model(model_type, len(tiny_tokenizer))
    ids = prompt(tiny_tokenizer)
    with torch.no_grad():
        weights = model(ids, output_attentions=True).attentions
        out = model.generate(
            ids, do_sample=False, max_new_tokens=3, output_attentions=True, return_dict_in_generate=True
        )
    for layer in weights:
        torch.testing.assert_close(layer.sum(-1), torch.ones(layer.shape[:-1]), rtol=1e-5, atol=1e-5)  # softmax rows
        assert torch.all(layer.triu(1) == 0)  # causal: nothing above the diagonal
    assert len(out.attentions) == 3 and out.attentions[1][0].shape[-2:] == (1, ids.shape[1] + 1)
    torch.testing.assert_close(out.sequences, greedy(model, ids, max_new_tokens=3), rtol=0, atol=0)


@pytest.mark.parametrize("model_type", RECURRENT)
def test_models_without_attention_refuse_output_attentions(model_type, tiny_tokenizer):
    model = build_tiny_model(model_type, len(tiny_tokenizer))
    with pytest.raises(ValueError, match="has no attention"):
        model(prompt(tiny_tokenizer), output_attentions=True)


@pytest.mark.parametrize("model_type", DECODERS + ["zoo_gru", "zoo_ngram_mlp"])
def test_output_flags_fall_back_to_the_config(model_type, saved_folder):
    _, folder = saved_folder(model_type)
    model = AutoModelForCausalLM.from_pretrained(folder, output_hidden_states=True).eval()
    ids = torch.zeros(1, 5, dtype=torch.long)
    with torch.no_grad():
        assert model(ids).hidden_states is not None
        assert model(ids, output_hidden_states=False).hidden_states is None
        model.config.return_dict = False
        assert isinstance(model(ids), tuple)
        if model_type in DECODERS:
            model.config._attn_implementation = "eager"  # transformers refuses output_attentions in the config with SDPA
            model.config.output_attentions = True
            model.config.return_dict = True
            assert len(model(ids).attentions) == model.config.num_hidden_layers


@pytest.mark.parametrize("model_type", DECODERS + ["zoo_gru"])
def test_torch_export_of_the_forward(model_type, tiny_tokenizer):
    # As for LlamaForCausalLM: no data-dependent branch (the padding check, MoE's host-read split) under export.
    model = build_tiny_model(model_type, len(tiny_tokenizer))
    ids = sample_ids(tiny_tokenizer)
    mask = torch.ones_like(ids)
    program = torch.export.export(model, (ids,), kwargs={"attention_mask": mask, "use_cache": False})
    with torch.no_grad():
        expected = model(ids, attention_mask=mask, use_cache=False).logits
        padded = mask.clone()
        padded[0, :4] = 0  # the exported graph honours padding too: it never dropped the mask
        expected_padded = model(ids, attention_mask=padded, use_cache=False).logits
    torch.testing.assert_close(program.module()(ids, attention_mask=mask, use_cache=False).logits, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        program.module()(ids, attention_mask=padded, use_cache=False).logits[:, 4:], expected_padded[:, 4:], rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("model_type", DECODERS)
def test_torch_export_of_a_generation_step(model_type):
    """transformers' own export wrapper (a ``StaticCache`` held by the module, ``cache_position`` as input)
    exports one decoding step, as for Llama; run token by token, its greedy tokens equal plain ``generate``'s."""
    from transformers.integrations.executorch import TorchExportableModuleForDecoderOnlyLM

    model = build_tiny_model(model_type, 60, seed=2, initializer_range=0.3).eval().requires_grad_(False)
    model.generation_config.cache_implementation = "static"
    model.generation_config.cache_config = {"batch_size": 1, "max_cache_len": 24}
    wrapper = TorchExportableModuleForDecoderOnlyLM(model, batch_size=1, max_cache_len=24)
    step = wrapper.export(input_ids=torch.tensor([[1]]), cache_position=torch.tensor([0]), strict=False).module()
    prompt, new = [5, 17, 3, 42, 9], 12
    ids = list(prompt)
    for position in range(len(prompt) + new - 1):  # the prompt one token at a time, then greedy steps
        logits = step(input_ids=torch.tensor([[ids[position]]]), cache_position=torch.tensor([position]))
        if position >= len(prompt) - 1:
            ids.append(int(logits[0, -1].argmax()))
    expected = model.generate(torch.tensor([prompt]), max_new_tokens=new, do_sample=False, pad_token_id=0)[0].tolist()
    assert len(set(expected[len(prompt):])) > 1  # weights varied enough that the check means something
    assert ids == expected


@pytest.mark.parametrize("model_type", DECODERS)
def test_flex_attention_backend_equals_the_hand_written_attention(model_type, tiny_tokenizer):
    model = build_tiny_model(model_type, len(tiny_tokenizer))
    model.config._attn_implementation = "eager"
    ids = sample_ids(tiny_tokenizer)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    with torch.no_grad():  # flex attention has no backward on CPU
        expected = model(ids, attention_mask=mask).logits
        model.config._attn_implementation = "flex_attention"
        got = model(ids, attention_mask=mask).logits
    torch.testing.assert_close(got[1], expected[1], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got[0, 3:], expected[0, 3:], rtol=1e-4, atol=1e-4)


def test_a_registered_attention_function_is_used(tiny_tokenizer):
    calls = []

    def counting_sdpa(module, query, key, value, attention_mask, **kwargs):
        calls.append(attention_mask.shape)
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("zoo_test_counting_sdpa", counting_sdpa)
    model = build_tiny_model("zoo_modern", len(tiny_tokenizer))
    ids = prompt(tiny_tokenizer)
    with torch.no_grad():
        expected = greedy(model, ids)
        model.config._attn_implementation = "zoo_test_counting_sdpa"
        got = greedy(model, ids)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert len(calls) == 12 * model.config.num_hidden_layers  # every layer of every step
    assert calls[0] == (1, 1, ids.shape[1], ids.shape[1])  # the mask spelled out for a backend that is not the lesson's
    with pytest.raises(ValueError, match="attn_implementation must be one of .*'nonsense'"):
        model.config._attn_implementation = "nonsense"
        model(ids)



@pytest.mark.parametrize("model_type", DECODERS)
def test_compiled_static_cache_decoding_traces_once(model_type):
    """``cache_implementation="static"`` with a ``compile_config``, as transformers documents it for its own
    models: ``generate`` compiles the forward (fullgraph: no graph break), the greedy tokens equal the eager
    path's, and decoding never recompiles: one graph for every token of two prompts, left-padded batches
    included (``error_on_recompile`` turns any recompilation into an error)."""
    from torch._dynamo.utils import counters
    from transformers import CompileConfig

    model = build_tiny_model(model_type, 60, seed=2, initializer_range=0.3).eval().requires_grad_(False)
    compile_config = CompileConfig(backend="eager", fullgraph=True, dynamic=False)  # dynamo's tracing, no codegen: fast
    compile_config._compile_all_devices = True  # transformers' switch to compile on a CPU too
    batch = torch.tensor([[0, 0, 5, 17, 3], [4, 42, 9, 11, 8]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    settings = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    torch._dynamo.reset()
    counters.clear()
    with torch._dynamo.config.patch(error_on_recompile=True):
        for ids, attention_mask in ((batch, mask), (batch.flip(0), mask.flip(0))):
            expected = model.generate(ids, attention_mask=attention_mask, **settings)
            got = model.generate(ids, attention_mask=attention_mask, cache_implementation="static", compile_config=compile_config, **settings)
            assert torch.equal(got, expected)
    assert len(set(expected[0, 5:].tolist())) > 1  # weights varied enough that the check means something
    assert counters["stats"]["unique_graphs"] == 1  # traced once, replayed for the other 9 decoding steps
    assert counters["stats"]["calls_captured"] > 0
    assert type(model)._can_compile_fullgraph


def test_every_forward_signature_is_computed_once():
    """generate() asks ``inspect.signature(model.forward)`` at every decoding step of a remote-code model;
    the zoo stores each forward's signature on it once (ZooPreTrainedModel.__init_subclass__), where
    ``inspect`` finds it without re-deriving it: 6% of a compiled decoding step of lesson 5's model."""
    import inspect

    import hf_models
    from hf_models.causal_lm import ZooPreTrainedModel

    classes = [cls for cls in vars(hf_models).values() if isinstance(cls, type) and issubclass(cls, ZooPreTrainedModel)]
    with_forward = [cls for cls in classes if "forward" in vars(cls)]
    assert len(with_forward) == 13  # <Name>Model and <Name>ForCausalLM of seven architectures, less the bigram's Model (it has none)
    for cls in with_forward:
        stored = vars(cls.forward).get("__signature__")
        assert stored is not None and stored == inspect.signature(cls.forward, follow_wrapped=False), cls.__name__
