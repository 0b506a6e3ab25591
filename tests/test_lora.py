"""Lesson 8's hand-written LoRA (hf_models/adapters) proven against peft on identical weights."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora.layer import ParamWrapper
from transformers import AutoModelForCausalLM

import hf_models
from hf_models.adapters import (
    LoRAConfig,
    LoRAEmbedding,
    LoRAExpertWeights,
    LoRALinear,
    apply_lora,
    load_lora,
    lora_layers,
    lora_to_peft,
    merge_lora,
    save_lora,
    trainable_parameters,
)
from tests.helpers import build_tiny_model

VOCAB = 97
EXPERT_WEIGHTS = ["experts.gate_up_proj", "experts.down_proj"]  # lesson 10's 3-D expert stacks, by dotted suffix
# Every model type with linear layers (the bigram table has none: its LoRA is on the embedding).
LINEAR_MODEL_TYPES = [t for t in sorted(hf_models.MODEL_REGISTRY) if t != "zoo_bigram"]


def ids(batch: int = 2, length: int = 12, seed: int = 1) -> torch.LongTensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


_LORA = (LoRALinear, LoRAEmbedding, LoRAExpertWeights)


def randomise(model: torch.nn.Module) -> None:
    """Non-zero A and B in every hand adapter, so the update is visible."""
    with torch.no_grad():
        for _, layer in lora_layers(model):
            for factor in (layer.lora_A, layer.lora_B):
                torch.nn.init.normal_(factor if isinstance(factor, torch.nn.Parameter) else factor.weight, std=0.2)


def logits(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def train_a_few_steps(model: torch.nn.Module, input_ids: torch.Tensor, learning_rate: float, steps: int = 3) -> None:
    """AdamW on the trainable (adapter) parameters alone, as a user's fine-tuning does."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=learning_rate)
    for _ in range(steps):
        model(input_ids=input_ids, labels=input_ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def peft_expert_factors(peft_model: torch.nn.Module, grad: bool = False) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{"<owner>.<parameter>": (A (E, r, in), B (E, out, r))}`` of every peft ``ParamWrapper``, read as peft's own
    ``get_delta_factors`` reads them: A (E*r, in) is expert-major, B (out, r*E) rank-major. ``grad``: their gradients."""
    factors = {}
    for name, module in peft_model.named_modules():
        if isinstance(module, ParamWrapper):
            owner = name.removeprefix("base_model.model.").replace(".base_layer", "")
            A, B = module.lora_A["default"].weight, module.lora_B["default"].weight
            A, B = (A.grad, B.grad) if grad else (A, B)
            E = module.num_experts
            factors[f"{owner}.{module.parameter_name}"] = (A.reshape(E, -1, A.shape[-1]), B.reshape(B.shape[0], -1, E).permute(2, 0, 1))
    return factors


def copy_peft_factors_into(hand: torch.nn.Module, peft_model: torch.nn.Module) -> int:
    """Copy peft's A/B (adapter "default") into the hand adapters of the same modules and expert weights; returns how many."""
    peft_state = peft_model.state_dict()
    experts = peft_expert_factors(peft_model)
    copied = 0
    with torch.no_grad():
        for name, layer in lora_layers(hand):
            prefix = f"base_model.model.{name}"
            if isinstance(layer, LoRAExpertWeights):
                layer.lora_A.copy_(experts[name][0])
                layer.lora_B.copy_(experts[name][1])
            elif isinstance(layer, LoRALinear):
                layer.lora_A.weight.copy_(peft_state[f"{prefix}.lora_A.default.weight"])
                layer.lora_B.weight.copy_(peft_state[f"{prefix}.lora_B.default.weight"])
            else:
                layer.lora_A.copy_(peft_state[f"{prefix}.lora_embedding_A.default"])
                layer.lora_B.copy_(peft_state[f"{prefix}.lora_embedding_B.default"])
            copied += 1
    return copied


@pytest.mark.parametrize(
    "model_type, targets",
    [
        ("zoo_gpt", ["qkv_proj", "o_proj", "up_proj", "down_proj"]),  # fused q/k/v: one adapter for the three
        ("zoo_modern", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
        ("zoo_bigram", ["lm_head"]),  # the table is an nn.Embedding
    ],
)
def test_same_factors_give_peft_outputs(model_type, targets):
    base = build_tiny_model(model_type, VOCAB)
    if model_type == "zoo_bigram":
        targets = [name for name, m in base.named_modules() if isinstance(m, torch.nn.Embedding)]
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=12, target_modules=targets, init_lora_weights=False))
    hand = apply_lora(copy.deepcopy(base), LoRAConfig(rank=4, alpha=12, target_modules=targets, exclude_modules=[]))
    peft_adapters = [k for k in peft_model.state_dict() if k.endswith(("lora_A.default.weight", "lora_embedding_A.default"))]
    assert copy_peft_factors_into(hand, peft_model) == len(peft_adapters) > 0
    x = ids()
    assert not torch.allclose(logits(hand, x), logits(base, x), atol=1e-3)  # the adapters do change the function
    torch.testing.assert_close(logits(hand, x), logits(peft_model, x), atol=1e-6, rtol=0)


def test_expert_weights_equal_peft_target_parameters_in_outputs_and_gradients():
    """Lesson 10's experts are 3-D weights, not nn.Linear: peft reaches them with ``target_parameters``
    (``ParamWrapper``), the hand LoRA with the same names (:class:`LoRAExpertWeights`). With peft's random
    A and B (``init_lora_weights=False``: B is not zero) copied in, logits, loss and every factor's gradient agree."""
    base = build_tiny_model("zoo_moe", VOCAB)
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=12, target_modules="all-linear",
                                                                target_parameters=EXPERT_WEIGHTS, init_lora_weights=False))
    hand = apply_lora(copy.deepcopy(base), LoRAConfig(rank=4, alpha=12, target_parameters=EXPERT_WEIGHTS))
    expert_layers = {name: layer for name, layer in lora_layers(hand) if isinstance(layer, LoRAExpertWeights)}
    E, C = base.config.num_local_experts, base.config.hidden_size
    assert sorted(expert_layers) == sorted(peft_expert_factors(peft_model)) == [
        f"model.layers.{i}.mlp.experts.{p}" for i in range(base.config.num_hidden_layers) for p in ("down_proj", "gate_up_proj")]
    assert expert_layers["model.layers.0.mlp.experts.down_proj"].lora_A.shape == (E, 4, base.config.intermediate_size)
    assert expert_layers["model.layers.0.mlp.experts.down_proj"].lora_B.shape == (E, C, 4)
    assert copy_peft_factors_into(hand, peft_model) == len(list(lora_layers(hand)))
    x = ids()
    assert not torch.allclose(logits(hand, x), logits(base, x), atol=1e-3)
    torch.testing.assert_close(logits(hand, x), logits(peft_model, x), atol=1e-5, rtol=0)

    hand_loss = hand(input_ids=x, labels=x).loss
    peft_loss = peft_model(input_ids=x, labels=x).loss
    torch.testing.assert_close(hand_loss, peft_loss, atol=1e-5, rtol=0)
    hand_loss.backward()
    peft_loss.backward()
    peft_grads = peft_expert_factors(peft_model, grad=True)
    for name, layer in expert_layers.items():
        assert layer.lora_A.grad.abs().sum() > 0 and layer.lora_B.grad.abs().sum() > 0  # every expert is reached
        torch.testing.assert_close(layer.lora_A.grad, peft_grads[name][0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(layer.lora_B.grad, peft_grads[name][1], atol=1e-5, rtol=1e-5)
    assert trainable_parameters(hand) == tuple(peft_model.get_nb_trainable_parameters())


def test_expert_weights_merge_unmerge_save_and_convert_to_peft(tmp_path):
    """The expert adapters do what the linear ones do: merge equals unmerged and unmerge restores the weights;
    merge_lora leaves plain parameters that save and reload; save_lora/load_lora round-trip exactly; trained
    by hand, the adapter converts to peft's layout (A (E*r, in), B (out, r*E), nested wrappers) and reloads there."""
    base = build_tiny_model("zoo_moe", VOCAB)
    base.save_pretrained(tmp_path / "base")
    model = apply_lora(AutoModelForCausalLM.from_pretrained(tmp_path / "base"),
                       LoRAConfig(rank=4, alpha=8, target_modules=["q_proj"], target_parameters=EXPERT_WEIGHTS))
    x = ids()
    torch.testing.assert_close(logits(model, x), logits(base, x), atol=0, rtol=0)  # B = 0: starts as the base
    train_a_few_steps(model.train(), x, learning_rate=1e-2)
    model.eval()
    expected = logits(model, x)
    assert not torch.allclose(expected, logits(base, x), atol=1e-3)

    experts = model.model.layers[0].mlp.experts
    frozen = experts.parametrizations.gate_up_proj.original.clone()
    for _, layer in lora_layers(model):
        layer.merge()
    assert not torch.allclose(experts.parametrizations.gate_up_proj.original, frozen)  # the update is in the weight
    torch.testing.assert_close(logits(model, x), expected, atol=1e-5, rtol=0)
    for _, layer in lora_layers(model):
        layer.unmerge()
    torch.testing.assert_close(experts.parametrizations.gate_up_proj.original, frozen, atol=1e-6, rtol=0)

    save_lora(model, tmp_path / "hand")
    reloaded = load_lora(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "hand").eval()
    torch.testing.assert_close(logits(reloaded, x), expected, atol=0, rtol=0)

    peft_folder = lora_to_peft(model, tmp_path / "peft", base_model_name_or_path=str(tmp_path / "base"))
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), str(peft_folder)).eval()
    assert len(peft_expert_factors(peft_model)) == 2 * base.config.num_hidden_layers
    torch.testing.assert_close(logits(peft_model, x), expected, atol=1e-5, rtol=0)

    merged = merge_lora(model)
    assert not any(isinstance(m, _LORA) for m in merged.modules()) and not hasattr(merged.model.layers[0].mlp.experts, "parametrizations")
    merged.save_pretrained(tmp_path / "merged")
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "merged"), x), expected, atol=1e-5, rtol=0)


def test_expert_weights_refuse_dropout_and_name_what_is_there():
    with pytest.raises(ValueError, match=r"dropout must be 0 when target_parameters are set \(got dropout=0.05"):
        LoRAConfig(dropout=0.05, target_parameters=EXPERT_WEIGHTS)
    with pytest.raises(ValueError, match=r"matches no parameter; this model's 3-D weights are \['down_proj', 'gate_up_proj'\]"):
        apply_lora(build_tiny_model("zoo_moe", VOCAB), LoRAConfig(target_parameters=["experts.w1"]))
    with pytest.raises(ValueError, match=r"only 3-D expert weights"):
        apply_lora(build_tiny_model("zoo_moe", VOCAB), LoRAConfig(target_parameters=["router.weight"]))


@pytest.mark.parametrize("model_type", LINEAR_MODEL_TYPES)
def test_all_linear_adapts_what_peft_adapts(model_type):
    base = build_tiny_model(model_type, VOCAB)
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, target_modules="all-linear"))
    hand = apply_lora(copy.deepcopy(base), LoRAConfig(rank=4, target_modules="all-linear"))
    peft_adapted = sorted(n.removeprefix("base_model.model.").removesuffix(".lora_A") for n, _ in peft_model.named_modules() if n.endswith(".lora_A"))
    assert sorted(name for name, _ in lora_layers(hand)) == peft_adapted
    assert trainable_parameters(hand) == tuple(peft_model.get_nb_trainable_parameters())


def test_initialisation_follows_the_paper():
    base = build_tiny_model("zoo_modern", VOCAB)
    hand = apply_lora(copy.deepcopy(base), LoRAConfig(rank=4, alpha=8, target_modules=["q_proj"]))
    x = ids()
    torch.testing.assert_close(logits(hand, x), logits(base, x), atol=0, rtol=0)  # B = 0: starts as the base
    layer = hand.model.layers[0].self_attn.q_proj
    bound = 1 / math.sqrt(layer.base.in_features)  # kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in))
    assert layer.lora_A.weight.abs().max() <= bound and layer.lora_A.weight.std() > bound / 4
    assert all(not p.requires_grad for n, p in hand.named_parameters() if "lora_" not in n)
    assert all(p.requires_grad for n, p in hand.named_parameters() if "lora_" in n)


@pytest.mark.parametrize("model_type", ["zoo_modern", "zoo_bigram"])
def test_merge_equals_unmerged_and_unmerge_restores(model_type):
    base = build_tiny_model(model_type, VOCAB)
    targets = "all-linear"
    if model_type == "zoo_bigram":
        targets = [name for name, m in base.named_modules() if isinstance(m, torch.nn.Embedding)]
    hand = apply_lora(copy.deepcopy(base), LoRAConfig(rank=4, alpha=8, target_modules=targets))
    randomise(hand)
    x = ids()
    unmerged = logits(hand, x)
    weights = {n: p.clone() for n, p in hand.named_parameters() if "lora_" not in n}
    for _, layer in lora_layers(hand):
        layer.merge()
    torch.testing.assert_close(logits(hand, x), unmerged, atol=1e-5, rtol=0)
    for _, layer in lora_layers(hand):
        layer.unmerge()
    for name, parameter in hand.named_parameters():
        if name in weights:
            torch.testing.assert_close(parameter, weights[name], atol=1e-6, rtol=0)
    merged = merge_lora(hand)
    assert not any(isinstance(m, (LoRALinear, LoRAEmbedding)) for m in merged.modules())
    torch.testing.assert_close(logits(merged, x), unmerged, atol=1e-5, rtol=0)


def test_hand_trained_adapter_loads_in_peft_and_alone(tmp_path, tiny_tokenizer):
    """Train a few steps by hand; the adapter converts to peft's format and reloads there, and alone."""
    base = build_tiny_model("zoo_modern", len(tiny_tokenizer))
    base.save_pretrained(tmp_path / "base")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "base").train()
    apply_lora(model, LoRAConfig(rank=4, alpha=16, dropout=0.1, target_modules=["q_proj", "v_proj", "down_proj"]))
    x = torch.tensor([tiny_tokenizer.encode("ROMEO:\nBut soft, what light through yonder window breaks?")])
    train_a_few_steps(model, x, learning_rate=1e-2)
    model.eval()
    expected = logits(model, x)

    peft_folder = lora_to_peft(model, tmp_path / "peft", base_model_name_or_path=str(tmp_path / "base"))
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), str(peft_folder)).eval()
    torch.testing.assert_close(logits(peft_model, x), expected, atol=1e-6, rtol=0)

    save_lora(model, tmp_path / "hand")
    assert sum(f.stat().st_size for f in (tmp_path / "hand").iterdir()) < 20_000  # kilobytes, not the model
    reloaded = load_lora(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "hand").eval()
    torch.testing.assert_close(logits(reloaded, x), expected, atol=0, rtol=0)


def test_embedding_adapter_follows_peft_init_and_converts(tmp_path):
    """The bigram's table: A starts at zero and B normal (peft's embedding convention), so the adapted
    table starts as the base; trained, it converts to peft's ``lora_embedding_A/B`` and reloads there."""
    base = build_tiny_model("zoo_bigram", VOCAB)
    base.save_pretrained(tmp_path / "base")
    model = apply_lora(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), LoRAConfig(rank=4, alpha=8, target_modules=["logits_table"]))
    layer = model.logits_table
    assert isinstance(layer, LoRAEmbedding) and not layer.lora_A.any() and layer.lora_B.std() > 0.5
    x = ids()
    torch.testing.assert_close(logits(model, x), logits(base, x), atol=0, rtol=0)
    train_a_few_steps(model, x, learning_rate=1e-1)
    expected = logits(model, x)
    assert not torch.allclose(expected, logits(base, x), atol=1e-3)
    folder = lora_to_peft(model, tmp_path / "peft", base_model_name_or_path=str(tmp_path / "base"))
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), str(folder)).eval()
    torch.testing.assert_close(logits(peft_model, x), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("model_type", sorted(hf_models.MODEL_REGISTRY))
def test_peft_merge_and_unload_saves_and_reloads(model_type, tmp_path):
    """Every registered model: peft's LoRA merged with ``merge_and_unload`` is a plain zoo model again
    that saves and reloads with the adapted function. The bigram has no linear layer, so peft refuses
    ``"all-linear"`` there (and so does ``apply_lora``, naming its table); its LoRA goes on the table."""
    base = build_tiny_model(model_type, VOCAB)
    targets = "all-linear"
    if model_type == "zoo_bigram":
        with pytest.raises(ValueError, match="target_modules"):
            get_peft_model(copy.deepcopy(base), LoraConfig(r=4, target_modules="all-linear"))
        with pytest.raises(ValueError, match=r"matches no nn.Linear.*logits_table"):
            apply_lora(copy.deepcopy(base), LoRAConfig(rank=4, target_modules="all-linear"))
        targets = [name for name, m in base.named_modules() if isinstance(m, torch.nn.Embedding)]
    if model_type == "zoo_gru":
        base.config.gru_implementation = "eager"  # the fused kernel would bypass the adapters
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules=targets, init_lora_weights=False))
    x = ids()
    adapted = logits(peft_model, x)
    with peft_model.disable_adapter():
        assert not torch.allclose(logits(peft_model, x), adapted, atol=1e-4)  # the adapters do change the function
    merged = peft_model.merge_and_unload()
    merged.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(reloaded) is hf_models.MODEL_REGISTRY[model_type][1]
    torch.testing.assert_close(logits(reloaded, x), adapted, atol=1e-5, rtol=0)


def tied_weight_warnings(model: torch.nn.Module, config: LoraConfig) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        get_peft_model(model, config)
    return [str(w.message) for w in caught if "tie_word_embeddings" in str(w.message) or "ensure_weight_tying" in str(w.message)]


def test_recipe_lora_config_raises_no_tied_weight_warning():
    """peft 0.21.2 warns (``BaseTuner._check_tied_modules``) when ``target_modules`` or ``modules_to_save``
    names ``embed_tokens`` / ``lm_head`` and the model declares them tied (``_tied_weights_keys``): an
    adapter there would break the tie on merge. The fix is in the config, not in hiding the tie:
    ``"all-linear"`` leaves out the output layer (``get_output_embeddings``), so lesson 8's defaults
    warn nothing, while a config that does touch the head still warns (the check is live)."""
    assert hf_models.ModernDecoderForCausalLM._tied_weights_keys == {"lm_head.weight": "model.embed_tokens.weight"}
    recipe = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear")
    assert tied_weight_warnings(build_tiny_model("zoo_modern", VOCAB), recipe) == []
    touching_head = LoraConfig(r=16, target_modules=["q_proj", "lm_head"])
    assert tied_weight_warnings(build_tiny_model("zoo_modern", VOCAB), touching_head)
    head_saved = LoraConfig(r=16, target_modules="all-linear", modules_to_save=["lm_head"])
    assert tied_weight_warnings(build_tiny_model("zoo_modern", VOCAB), head_saved)


def test_bad_lora_input_is_named():
    model = build_tiny_model("zoo_modern", VOCAB)
    with pytest.raises(ValueError, match=r"target_modules=\['qkv'\] matches no nn.Linear.*q_proj"):
        apply_lora(model, LoRAConfig(target_modules=["qkv"]))
    with pytest.raises(ValueError, match=r"rank must be a positive integer, got 0"):
        LoRAConfig(rank=0)
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\), got 1.5"):
        LoRAConfig(dropout=1.5)
    with pytest.raises(ValueError, match=r"lm_head shares its weight with model.embed_tokens"):
        apply_lora(build_tiny_model("zoo_modern", VOCAB), LoRAConfig(target_modules=["lm_head"], exclude_modules=[]))
    with pytest.raises(ValueError, match="no adapters to save"):
        save_lora(model, "unused")
