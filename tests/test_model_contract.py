"""transformers' model contract on every zoo model, checked the way the libraries that rely on it use it.

* ``AutoModel.from_pretrained(folder)`` gives the backbone, whose hidden states the LM head turns
  into the causal LM's logits;
* ``inputs_embeds`` give the same logits as ``input_ids``;
* ``gradient_checkpointing_enable()`` (transformers' own switch) gives the same loss and gradients;
* ``output_hidden_states`` and ``return_dict`` are honoured, ``output_attentions`` (without attention) and unknown
  keywords are refused with an error naming them (never passed on to the loss);
* cached decoding reads nothing back to the host (no device sync per generated token).

What clients do with the saved folders (``pipeline``, ``Trainer``, peft, trl, bitsandbytes, remote
code, old folders) is the integration matrix, ``tests/test_model_matrix.py``.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModel
from transformers.modeling_outputs import BaseModelOutputWithPast, MoeModelOutputWithPast

import hf_models
from tests.helpers import BACKBONE_TYPES, build_tiny_model, sample_ids

MODEL_TYPES = sorted(hf_models.MODEL_REGISTRY)


def test_every_model_but_the_bigram_table_has_a_backbone():
    assert set(MODEL_TYPES) - set(BACKBONE_TYPES) == {"zoo_bigram"}


@pytest.mark.parametrize("model_type", BACKBONE_TYPES)
def test_automodel_loads_the_backbone_whose_hidden_states_give_the_logits(model_type, saved_folder, tiny_tokenizer):
    model, folder = saved_folder(model_type)
    backbone = AutoModel.from_pretrained(folder).eval()
    assert type(backbone) is type(model).base_model_class
    ids = sample_ids(tiny_tokenizer)
    with torch.no_grad():
        outputs = backbone(input_ids=ids, use_cache=False)
        assert isinstance(outputs, (BaseModelOutputWithPast, MoeModelOutputWithPast))  # the MoE backbone: as Mixtral's
        assert outputs.last_hidden_state.shape[:2] == ids.shape
        torch.testing.assert_close(model.lm_head(outputs.last_hidden_state), model(ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_inputs_embeds_give_the_same_logits_as_input_ids(model_type, tiny_tokenizer):
    model = build_tiny_model(model_type, len(tiny_tokenizer))
    ids = sample_ids(tiny_tokenizer)
    with torch.no_grad():
        embeds = model.get_input_embeddings()(ids)
        torch.testing.assert_close(model(inputs_embeds=embeds).logits, model(input_ids=ids).logits, rtol=0, atol=0)
    with pytest.raises(ValueError, match="exactly one of input_ids or inputs_embeds"):
        model(input_ids=ids, inputs_embeds=embeds)


@pytest.mark.parametrize("model_type", BACKBONE_TYPES)
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(model_type, tiny_tokenizer):
    ids = sample_ids(tiny_tokenizer, batch=3)
    results = []
    for checkpointing in (False, True):
        model = build_tiny_model(model_type, len(tiny_tokenizer)).train()
        if checkpointing:
            model.gradient_checkpointing_enable()
            assert model.is_gradient_checkpointing
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (loss, grads), (loss_checkpointed, grads_checkpointed) = results
    torch.testing.assert_close(loss_checkpointed, loss, rtol=0, atol=1e-6)
    assert grads.keys() == grads_checkpointed.keys() and grads
    for name in grads:
        torch.testing.assert_close(grads_checkpointed[name], grads[name], rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize("model_type", BACKBONE_TYPES)
def test_gradient_checkpointing_keeps_fewer_activations(model_type, tiny_tokenizer):
    """The switch reaches the layers: the forward saves fewer tensors for the backward with it on."""

    def saved_tensors(checkpointing: bool) -> int:
        model = build_tiny_model(model_type, len(tiny_tokenizer)).train()
        if checkpointing:
            model.gradient_checkpointing_enable()
        count = 0

        def pack(tensor):
            nonlocal count
            count += 1
            return tensor

        ids = sample_ids(tiny_tokenizer)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return count

    assert saved_tensors(checkpointing=True) < saved_tensors(checkpointing=False)


def test_the_bigram_table_refuses_gradient_checkpointing_with_a_reason(tiny_tokenizer):
    model = build_tiny_model("zoo_bigram", len(tiny_tokenizer))
    with pytest.raises(ValueError, match="one table lookup"):
        model.gradient_checkpointing_enable()


@pytest.mark.parametrize("model_type", BACKBONE_TYPES)
def test_output_hidden_states_and_return_dict_are_honoured(model_type, tiny_tokenizer):
    model = build_tiny_model(model_type, len(tiny_tokenizer))
    ids = sample_ids(tiny_tokenizer)
    with torch.no_grad():
        outputs = model(input_ids=ids, output_hidden_states=True, use_cache=False)
        hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state
        layers = getattr(model.config, "num_hidden_layers", 1)
        assert len(outputs.hidden_states) == layers + 1
        torch.testing.assert_close(outputs.hidden_states[-1], hidden, rtol=0, atol=0)
        assert model(input_ids=ids).hidden_states is None
        as_tuple = model(input_ids=ids, labels=ids, return_dict=False, use_cache=False)
        assert isinstance(as_tuple, tuple)
        as_dict = model(input_ids=ids, labels=ids, use_cache=False)
        torch.testing.assert_close(as_tuple[0], as_dict.loss, rtol=0, atol=0)
        torch.testing.assert_close(as_tuple[1], as_dict.logits, rtol=0, atol=0)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_unsupported_flags_and_unknown_keywords_are_refused_by_name(model_type, tiny_tokenizer):
    model = build_tiny_model(model_type, len(tiny_tokenizer))
    ids = sample_ids(tiny_tokenizer)
    if not model.has_attention_weights:  # the decoders return them (tests/test_generation_features.py)
        with pytest.raises(ValueError, match="output_attentions=True is not supported"):
            model(input_ids=ids, output_attentions=True)
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) \['temprature'\]"):
        model(input_ids=ids, labels=ids, temprature=0.7)
    # The loss's own keywords still reach it: summing over tokens, then dividing by a given count.
    total = model(input_ids=ids, labels=ids, num_items_in_batch=torch.tensor(1)).loss
    mean = model(input_ids=ids, labels=ids).loss
    torch.testing.assert_close(total, mean * ids[:, 1:].numel(), rtol=1e-6, atol=1e-5)


class HostReads(torch.overrides.TorchFunctionMode):
    """Counts reads of tensor values back to Python (each one a device sync on a GPU) while ``active``."""

    READS = {torch.Tensor.__bool__, torch.Tensor.item, torch.Tensor.__int__, torch.Tensor.__float__, torch.Tensor.tolist}

    def __init__(self):
        super().__init__()
        self.active = False
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if self.active and func in self.READS:
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_cached_decode_steps_read_nothing_back_to_the_host(model_type, tiny_tokenizer):
    """Padding is decided once, on the prefill: the decode steps make no host sync inside the model."""
    model = build_tiny_model(model_type, len(tiny_tokenizer))
    ids = sample_ids(tiny_tokenizer)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding in one row: the masked path, not only the fast one
    reads = HostReads()
    per_step = []

    def before(module, args, kwargs):
        reads.active, reads.count = True, 0

    def after(module, args, kwargs, output):
        reads.active = False
        per_step.append(reads.count)

    model.register_forward_pre_hook(before, with_kwargs=True)
    model.register_forward_hook(after, with_kwargs=True)
    with reads:
        model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert len(per_step) == 5
    assert per_step[1:] == [0, 0, 0, 0], per_step
