"""transformers' model contract on every zoo model, checked the way the libraries that rely on it use it.

* ``AutoModel.from_pretrained(folder)`` gives the backbone, whose hidden states the LM head turns
  into the causal LM's logits;
* ``inputs_embeds`` give the same logits as ``input_ids``;
* ``gradient_checkpointing_enable()`` (transformers' own switch) gives the same loss and gradients;
* ``output_hidden_states`` and ``return_dict`` are honoured, ``output_attentions`` and unknown
  keywords are refused with an error naming them (never passed on to the loss);
* cached decoding reads nothing back to the host (no device sync per generated token);
* trl's ``SFTTrainer`` (with a peft ``LoraConfig``) and ``DPOTrainer`` train every model with a
  backbone with their **default** settings, loaded from a saved folder as a user would;
* bitsandbytes int8 and NF4 load every attention model and run ``pipeline``.
"""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from transformers import AutoModel, AutoModelForCausalLM, BitsAndBytesConfig, pipeline
from transformers.modeling_outputs import BaseModelOutputWithPast, MoeModelOutputWithPast

import hf_models
from tests.helpers import TINY_TEXT, build_tiny_model

MODEL_TYPES = sorted(hf_models.MODEL_REGISTRY)
BACKBONE_TYPES = [t for t in MODEL_TYPES if hf_models.MODEL_REGISTRY[t][1].base_model_class is not None]
# Every decoder of the registry (lesson 10's mixture of experts joins by registering).
ATTENTION_TYPES = [t for t in MODEL_TYPES if issubclass(hf_models.MODEL_REGISTRY[t][1], hf_models.decoder.DecoderForCausalLM)]


def sample_ids(tokenizer, batch: int = 2) -> torch.LongTensor:
    return torch.tensor([tokenizer(TINY_TEXT[:24])["input_ids"]] * batch)


@pytest.fixture
def saved_folder(tiny_tokenizer, tmp_path):
    """``save(model_type, **overrides)`` -> a folder holding that tiny model and the tokenizer."""

    def save(model_type: str, **overrides):
        model = build_tiny_model(model_type, len(tiny_tokenizer), **overrides)
        folder = tmp_path / model_type
        model.save_pretrained(folder)
        tiny_tokenizer.save_pretrained(folder)
        return model, folder

    return save


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


# --- real clients with their defaults ------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("model_type", BACKBONE_TYPES)
def test_trl_sft_trainer_with_peft_lora_trains_with_its_defaults(model_type, saved_folder, tiny_tokenizer, tmp_path):
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    _, folder = saved_folder(model_type)
    model = AutoModelForCausalLM.from_pretrained(folder)
    lines = [line[:40] for line in TINY_TEXT.lower().splitlines() if line]
    dataset = Dataset.from_dict({"text": lines * 4})
    args = SFTConfig(output_dir=str(tmp_path / "sft"), max_steps=2, use_cpu=True)
    assert args.gradient_checkpointing  # trl's default, which the zoo's models must support
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=dataset, processing_class=tiny_tokenizer,
        peft_config=LoraConfig(target_modules="all-linear"),
    )
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    assert before and all("lora_" in n for n in before)
    after = dict(trainer.model.named_parameters())
    assert any(not torch.equal(before[n], after[n]) for n in before)
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log] or [trainer.state.log_history[-1]["train_loss"]]
    assert all(torch.isfinite(torch.tensor(loss)) for loss in losses)


@pytest.mark.slow
@pytest.mark.parametrize("model_type", BACKBONE_TYPES)
def test_trl_dpo_trainer_trains_with_its_defaults(model_type, saved_folder, tiny_tokenizer, tmp_path):
    from trl import DPOConfig, DPOTrainer

    _, folder = saved_folder(model_type)
    policy = AutoModelForCausalLM.from_pretrained(folder)
    reference = AutoModelForCausalLM.from_pretrained(folder)
    preferences = Dataset.from_dict(
        {"prompt": ["romeo:", "juliet:"] * 4, "chosen": [" but soft", " the sun"] * 4, "rejected": [" xyz", " qqq"] * 4}
    )
    args = DPOConfig(output_dir=str(tmp_path / "dpo"), max_steps=2, use_cpu=True)
    trainer = DPOTrainer(model=policy, ref_model=reference, args=args, train_dataset=preferences, processing_class=tiny_tokenizer)
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    trainer.train()
    assert any(not torch.equal(before[n], p) for n, p in policy.named_parameters())
    assert all(torch.equal(before[n], p) for n, p in reference.named_parameters())  # the reference stays frozen
    assert torch.isfinite(torch.tensor(trainer.state.log_history[-1]["train_loss"]))


# bitsandbytes' CPU 4-bit kernel packs weights in blocks of 64 input features, so its layers need at least 64.
BNB_SIZE = dict(hidden_size=64, num_attention_heads=4)


@pytest.mark.parametrize("model_type", ATTENTION_TYPES)
@pytest.mark.parametrize(
    "quantization", [dict(load_in_8bit=True), dict(load_in_4bit=True, bnb_4bit_quant_type="nf4")], ids=["int8", "nf4"]
)
def test_bitsandbytes_loads_and_runs_pipeline(model_type, quantization, saved_folder):
    import bitsandbytes as bnb

    _, folder = saved_folder(model_type, **BNB_SIZE)
    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=BitsAndBytesConfig(**quantization), device_map="cpu")
    quantized = (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit)
    layer = model.model.layers[0]
    down_projs = [m for name, m in layer.mlp.named_modules() if name.endswith("down_proj")]  # an MoE has one per expert
    assert isinstance(layer.self_attn.o_proj, quantized) and down_projs and all(isinstance(m, quantized) for m in down_projs)
    assert type(model.lm_head) is torch.nn.Linear  # the head stays in full precision
    ids = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=6, do_sample=False)
    assert ids.shape == (1, 9)
    text = pipeline("text-generation", model=model, tokenizer=str(folder))("ROMEO:\n", max_new_tokens=8, do_sample=False)
    assert text[0]["generated_text"].startswith("ROMEO:\n") and len(text[0]["generated_text"]) > len("ROMEO:\n")


# --- folders saved before the backbones existed still load ---------------------------------------

LEGACY_NAMES = {"model.embed_tokens.": "embed_tokens.", "model.layers.": "layers.", "model.hidden.proj.": "hidden."}


@pytest.mark.parametrize("model_type", ["zoo_gru", "zoo_ngram_mlp"])
def test_folders_saved_with_top_level_weight_names_still_load(model_type, saved_folder, tiny_tokenizer):
    """GRU and n-gram folders saved before the split kept their weights at the top level."""
    from safetensors.torch import load_file, save_file

    model, folder = saved_folder(model_type)
    weights = load_file(folder / "model.safetensors")
    legacy = {}
    for key, tensor in weights.items():
        for new, old in LEGACY_NAMES.items():
            if key.startswith(new):
                key = old + key[len(new):]
        legacy[key] = tensor
    assert not any(key.startswith("model.") for key in legacy)
    save_file(legacy, folder / "model.safetensors", metadata={"format": "pt"})
    loaded = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = sample_ids(tiny_tokenizer)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_decoder_spec_refuses_unknown_blocks_by_name():
    from dataclasses import replace

    from hf_models.decoder import build_mlp, build_norm

    spec = hf_models.ModernDecoderConfig(hidden_size=32, num_attention_heads=4).decoder_spec()
    with pytest.raises(ValueError, match=r"DecoderSpec.norm must be one of \['layernorm', 'rmsnorm'\], got 'batchnorm'"):
        build_norm(replace(spec, norm="batchnorm"))
    with pytest.raises(ValueError, match=r"DecoderSpec.mlp must be one of .*got 'moe'"):
        build_mlp(replace(spec, mlp="moe"))


def test_a_new_feed_forward_drops_into_every_layer_by_registering():
    """The extension point lesson 10's mixture of experts uses: a builder registered under a name."""
    from torch import nn

    from hf_models import decoder

    class ScaledSwiGLU(nn.Module):
        _residual_projections = ("down_proj",)

        def __init__(self, spec):
            super().__init__()
            self.inner = hf_models.feed_forward.SwiGLU(spec.hidden_size, spec.intermediate_size)
            self.down_proj = self.inner.down_proj

        def forward(self, x):
            return 0.5 * self.inner(x)

    class ScaledConfig(hf_models.ModernDecoderConfig):
        def decoder_spec(self):
            from dataclasses import replace

            return replace(super().decoder_spec(), mlp="scaled_swiglu")

    decoder.register_feed_forward("scaled_swiglu", ScaledSwiGLU)
    try:
        model = hf_models.ModernDecoderForCausalLM(ScaledConfig(vocab_size=40, hidden_size=32, num_attention_heads=4))
        assert all(isinstance(layer.mlp, ScaledSwiGLU) for layer in model.model.layers)
        ids = torch.tensor([[1, 2, 3]])
        hidden = model.model.embed_tokens(ids)
        layer = model.model.layers[0]
        torch.testing.assert_close(layer.mlp(hidden), 0.5 * layer.mlp.inner(hidden))
        model(ids)
    finally:
        del decoder.FEED_FORWARD_BUILDERS["scaled_swiglu"]
