"""The integration matrix: every registered model passes the same checks a Hub user relies on.

Parametrized over ``hf_models.MODEL_REGISTRY``: a new lesson's model joins by registering. Each check
here is what a client does with a model or its saved folder: load it (from the zoo, by remote code,
from an old folder), ``generate`` and ``pipeline``, train it with ``Trainer``, peft, trl's trainers
with their defaults, and quantize it with bitsandbytes. The forward contract itself (backbone,
``inputs_embeds``, checkpointing, output flags, host syncs) is ``tests/test_model_contract.py``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, Trainer, TrainingArguments, default_data_collator, pipeline

import hf_models
from hf_models.adapters import LoRAConfig, apply_lora, lora_layers
from hf_models.tokenization import check_tokenizer_matches_model
from tests.helpers import BACKBONE_TYPES, TINY_CONFIGS, TINY_TEXT, build_tiny_model, sample_ids

MODEL_TYPES = sorted(hf_models.MODEL_REGISTRY)


def test_every_registered_model_has_a_tiny_config():
    assert set(TINY_CONFIGS) == set(hf_models.MODEL_REGISTRY)


def test_model_types_do_not_clash_with_transformers():
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    assert not set(hf_models.MODEL_REGISTRY) & set(CONFIG_MAPPING_NAMES)


@pytest.fixture(params=MODEL_TYPES)
def model_type(request):
    return request.param


@pytest.fixture
def saved(model_type, saved_folder):
    """A tiny model saved with its tokenizer: (model, folder)."""
    return saved_folder(model_type)


def test_save_load_round_trip_safetensors_only(saved, tiny_tokenizer):
    model, folder = saved
    files = {p.name for p in folder.iterdir()}
    assert "model.safetensors" in files
    # The folder carries its code (tests/test_carried_code.py checks what that code may import).
    assert {"configuration", "modeling"} <= {p.stem.split("_")[0] for p in folder.glob("*.py")}
    assert not {f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt"))}
    loaded = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert type(loaded) is type(model)
    ids = sample_ids(tiny_tokenizer)
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_loads_with_trust_remote_code_where_hf_models_is_not_importable(saved, tiny_tokenizer, tmp_path):
    model, folder = saved
    config = json.loads((folder / "config.json").read_text())
    has_backbone = type(model).base_model_class is not None
    assert set(config["auto_map"]) == {"AutoConfig", "AutoModelForCausalLM"} | ({"AutoModel"} if has_backbone else set())
    ids = sample_ids(tiny_tokenizer)
    torch.save(ids, tmp_path / "ids.pt")
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["hf_models"] = None  # any `import hf_models` now raises ImportError
        import torch
        from transformers import AutoModelForCausalLM
        try:
            import hf_models
            raise SystemExit("hf_models should not be importable here")
        except ImportError:
            pass
        model = AutoModelForCausalLM.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()
        assert "hf_models" not in type(model).__module__, type(model).__module__
        ids = torch.load({str(tmp_path / "ids.pt")!r})
        with torch.no_grad():
            torch.save(model(ids).logits, {str(tmp_path / "remote_logits.pt")!r})
        if {has_backbone!r}:
            from transformers import AutoModel
            backbone = AutoModel.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()
            assert "hf_models" not in type(backbone).__module__, type(backbone).__module__
            with torch.no_grad():
                torch.save(backbone(ids).last_hidden_state, {str(tmp_path / "remote_hidden_states.pt")!r})
        """
    )
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"), "HOME": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    with torch.no_grad():
        torch.testing.assert_close(torch.load(tmp_path / "remote_logits.pt"), model(ids).logits, rtol=0, atol=0)
        if has_backbone:  # the same backbone as the installed one (that its hidden states give the logits: the contract's test)
            installed = model.model(input_ids=ids).last_hidden_state
            torch.testing.assert_close(torch.load(tmp_path / "remote_hidden_states.pt"), installed, rtol=0, atol=0)


def test_pipeline_text_generation_from_folder(saved):
    _, folder = saved
    generator = pipeline("text-generation", model=str(folder), device="cpu")
    out = generator("ROMEO:\n", max_new_tokens=10, do_sample=False)
    text = out[0]["generated_text"]
    assert isinstance(text, str) and text.startswith("ROMEO:\n") and len(text) > len("ROMEO:\n")


# --- the variant axis: each check below runs on the model as built and as a user wraps it ------------


def lora_targets(model: torch.nn.Module) -> list[str]:
    """Every Linear layer; a model with none (the bigram table) gets LoRA on its embedding table."""
    linears = sorted({name.split(".")[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
    return linears or sorted({name.split(".")[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Embedding)})


def with_lora(model: torch.nn.Module) -> torch.nn.Module:
    """peft LoRA on every linear layer, with non-zero B so the adapters change the function."""
    if model.config.model_type == "zoo_gru":
        model.config.gru_implementation = "eager"  # the fused kernel would bypass the adapters
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=lora_targets(model), init_lora_weights=False))


def with_hand_lora(model: torch.nn.Module) -> torch.nn.Module:
    """Lesson 8's hand-written LoRA on the same layers, both factors random so the adapters change the function."""
    if model.config.model_type == "zoo_gru":
        model.config.gru_implementation = "eager"
    apply_lora(model, LoRAConfig(rank=4, alpha=8, target_modules=lora_targets(model)))
    with torch.no_grad():
        for _, layer in lora_layers(model):
            for factor in (layer.lora_A, layer.lora_B):
                torch.nn.init.normal_(factor if isinstance(factor, torch.nn.Parameter) else factor.weight, std=0.1)
    return model


# name -> (model -> the model a user runs). Lessons 8 (adapters) and 9 (quantization) add theirs here.
VARIANTS = {"base": lambda model: model, "lora": with_lora, "hand_lora": with_hand_lora}


@pytest.fixture(params=sorted(VARIANTS))
def variant(request):
    return VARIANTS[request.param]


def test_greedy_generate_is_the_same_with_and_without_cache(model_type, variant, tiny_tokenizer):
    model = variant(build_tiny_model(model_type, len(tiny_tokenizer)))
    ids = sample_ids(tiny_tokenizer)
    with_cache = model.generate(ids, max_new_tokens=20, do_sample=False, use_cache=True)
    without = model.generate(ids, max_new_tokens=20, do_sample=False, use_cache=False)
    assert with_cache.shape == (2, ids.shape[1] + 20)
    assert torch.equal(with_cache, without)


def test_cached_generation_feeds_one_new_token_per_step(model_type, tiny_tokenizer):
    """With the cache, each step after the prompt runs the model on the newest token only."""
    model = build_tiny_model(model_type, len(tiny_tokenizer))
    lengths = []
    handle = model.register_forward_pre_hook(lambda m, args, kwargs: lengths.append(kwargs["input_ids"].shape[1]), with_kwargs=True)
    ids = sample_ids(tiny_tokenizer, batch=1)
    model.generate(ids, max_new_tokens=6, do_sample=False)
    handle.remove()
    assert lengths == [ids.shape[1]] + [1] * 5


def test_one_trainer_step_lowers_the_loss(model_type, variant, tiny_tokenizer, tmp_path):
    model = variant(build_tiny_model(model_type, len(tiny_tokenizer))).train()
    ids = sample_ids(tiny_tokenizer, batch=4)
    batch = {"input_ids": ids, "labels": ids}
    with torch.no_grad():
        before = model(**batch).loss.item()
    dataset = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=4, learning_rate=1e-2,
        lr_scheduler_type="constant", report_to="none", save_strategy="no", use_cpu=True, disable_tqdm=True,
    )
    Trainer(model=model, args=args, train_dataset=dataset, data_collator=default_data_collator).train()
    with torch.no_grad():
        after = model(**batch).loss.item()
    assert after < before


def test_peft_lora_runs_forward_and_backward(model_type, tiny_tokenizer):
    peft_model = with_lora(build_tiny_model(model_type, len(tiny_tokenizer)).train())
    ids = sample_ids(tiny_tokenizer)
    loss = peft_model(input_ids=ids, labels=ids).loss
    loss.backward()
    lora_grads = [p.grad for n, p in peft_model.named_parameters() if "lora_" in n]
    assert lora_grads and all(g is not None and g.abs().sum() > 0 for g in lora_grads)
    assert all(p.grad is None for n, p in peft_model.named_parameters() if "lora_" not in n)


# --- bad input gets a clear error that names the field -------------------------------------------


def test_bad_config_value_names_the_field(model_type):
    config_class, _ = hf_models.MODEL_REGISTRY[model_type]
    with pytest.raises(ValueError, match=r"vocab_size.*-3"):
        config_class(vocab_size=-3)
    with pytest.raises(ValueError, match=r"max_position_embeddings.*'long'"):
        config_class(max_position_embeddings="long")


def test_sequence_longer_than_context_names_the_limit(model_type, tiny_tokenizer):
    model = build_tiny_model(model_type, len(tiny_tokenizer))
    ids = torch.zeros(1, 65, dtype=torch.long)
    if model.context_limit() is None:  # rotary positions and recurrences run past it, as Llama does
        assert model(ids).logits.shape[1] == 65
        return
    with pytest.raises(ValueError, match=r"65 tokens.*max_position_embeddings=64"):
        model(ids)


def test_tokenizer_and_model_vocab_mismatch(model_type, tiny_tokenizer):
    model = build_tiny_model(model_type, len(tiny_tokenizer) - 5)
    with pytest.raises(ValueError, match=rf"tokenizer has {len(tiny_tokenizer)} tokens.*vocab_size is {len(tiny_tokenizer) - 5}"):
        check_tokenizer_matches_model(tiny_tokenizer, model)
    with pytest.raises(ValueError, match=r"token id \d+, outside the model's vocabulary"):
        model(sample_ids(tiny_tokenizer) * 0 + len(tiny_tokenizer) - 1)


@pytest.mark.parametrize("missing", ["model.safetensors", "config.json"])
def test_folder_with_missing_files_names_the_file(saved, missing):
    _, folder = saved
    (folder / missing).unlink()
    with pytest.raises((OSError, ValueError), match=missing.replace(".", r"\.")):
        AutoModelForCausalLM.from_pretrained(folder)


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


# Every decoder of the registry (lesson 10's mixture of experts joins by registering).
ATTENTION_TYPES = [t for t in MODEL_TYPES if t in ("zoo_gpt", "zoo_modern", "zoo_moe", "zoo_configurable")]
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
    assert isinstance(layer.self_attn.o_proj, quantized)
    experts = [m for m in layer.mlp.modules() if getattr(getattr(m, "gate_up_proj", None), "ndim", 0) == 3]
    if experts:  # an MoE: bitsandbytes swaps nn.Linear only, so the 3-D expert weights stay in full precision (lesson 9)
        assert all(type(m.down_proj) is torch.nn.Parameter and m.gate_up_proj.dtype == m.down_proj.dtype == torch.float32 for m in experts)
    else:
        assert isinstance(layer.mlp.down_proj, quantized)
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
