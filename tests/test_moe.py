"""Lesson 10: the mixture-of-experts decoder is Mixtral, block by block and end to end.

* with copied weights, ``SparseMoeBlock`` equals transformers' ``MixtralSparseMoeBlock`` (outputs,
  router logits, gradients), on the grouped path (prefill, training) and the decode path;
* the converters to and from ``MixtralForCausalLM`` give the same logits, aux loss, loss and greedy
  generations, and a round trip gives back the same weights;
* the router, the balancing loss and the z-loss against hand-computed values; grouped dispatch
  against a naive per-token loop; bad configs name the field; expert load is measured over training.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from safetensors import safe_open
from transformers import AutoModelForCausalLM, MixtralConfig, MixtralForCausalLM, Trainer, TrainingArguments, default_data_collator
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock, load_balancing_loss_func

from hf_models import MoEDecoderConfig, MoEDecoderForCausalLM
from hf_models.conversion import SERVING_CONVERTERS, export_for_serving, mixtral_to_moe, moe_to_mixtral
from hf_models.conversion.mixtral import mixtral_to_moe_state_dict
from hf_models.modeling_moe import MoEExperts, SparseMoeBlock, TopKRouter, load_balancing_loss, router_z_loss
from hf_models.tokenization import build_char_tokenizer
from hf_models.evaluation.expert_load import ExpertLoad, ExpertLoadCallback, imbalance

pytestmark = pytest.mark.usefixtures("single_thread")

TOLERANCE = dict(rtol=1e-5, atol=1e-5)
HIDDEN, INTER, EXPERTS, TOP_K, VOCAB = 32, 48, 4, 2, 61


def ids(batch: int = 2, length: int = 20, seed: int = 0) -> torch.LongTensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def mixtral_config(**overrides) -> MixtralConfig:
    fields = dict(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, num_local_experts=EXPERTS, num_experts_per_tok=TOP_K,
        tie_word_embeddings=False, router_aux_loss_coef=0.02,
    )
    return MixtralConfig(**{**fields, **overrides})


def block_pair(seed: int = 0) -> tuple[SparseMoeBlock, MixtralSparseMoeBlock]:
    """A Mixtral block with random weights and the zoo block holding the same weights."""
    torch.manual_seed(seed)
    reference = MixtralSparseMoeBlock(mixtral_config())
    with torch.no_grad():
        for p in reference.parameters():
            p.normal_(0, 0.3)
    ours = SparseMoeBlock(HIDDEN, INTER, EXPERTS, TOP_K)
    renamed = {f"l.mlp.{k}": v for k, v in reference.state_dict().items()}
    ours.load_state_dict({k[len("l.mlp."):]: v for k, v in mixtral_to_moe_state_dict(renamed).items()})
    return ours, reference


@pytest.mark.parametrize("dispatch", ["grouped_mm", "sorted_runs", "gathered"])
@pytest.mark.parametrize("length", [9, 1], ids=["prefill", "decode"])
@pytest.mark.parametrize("training", [False, True])
def test_block_equals_mixtral_sparse_moe_block(length, training, dispatch):
    ours, reference = block_pair()
    ours.experts.dispatch = dispatch
    ours.train(training), reference.train(training)
    x = torch.randn(3, length, HIDDEN, generator=torch.Generator().manual_seed(1))
    x_ours, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    (out, router_logits), expected = ours(x_ours), reference(x_ref)
    torch.testing.assert_close(out, expected, **TOLERANCE)
    expected_logits, _, chosen = reference.gate(x.reshape(-1, HIDDEN))
    torch.testing.assert_close(router_logits, expected_logits, **TOLERANCE)
    assert torch.equal(router_logits.topk(TOP_K, dim=-1).indices.sort(-1).values, chosen.sort(-1).values)
    # Gradients too: the router's (through the top-k weights) and the experts', in Mixtral's own layout.
    (out * torch.arange(out.numel()).reshape(out.shape).sin()).sum().backward()
    (expected * torch.arange(out.numel()).reshape(out.shape).sin()).sum().backward()
    torch.testing.assert_close(x_ours.grad, x_ref.grad, **TOLERANCE)
    torch.testing.assert_close(ours.router.weight.grad, reference.gate.weight.grad, **TOLERANCE)
    torch.testing.assert_close(ours.experts.gate_up_proj.grad, reference.experts.gate_up_proj.grad, **TOLERANCE)
    torch.testing.assert_close(ours.experts.down_proj.grad, reference.experts.down_proj.grad, **TOLERANCE)


def expert_by_hand(experts: MoEExperts, e: int, token: torch.Tensor, bias: bool) -> torch.Tensor:
    """Expert ``e`` on one token, from its slices of the fused tensors: ``down @ (silu(gate @ x) * (up @ x))``."""
    inter = experts.intermediate_size
    gate, up = experts.gate_up_proj[e, :inter] @ token, experts.gate_up_proj[e, inter:] @ token
    if bias:
        gate, up = gate + experts.gate_up_proj_bias[e, :inter], up + experts.gate_up_proj_bias[e, inter:]
    out = experts.down_proj[e] @ (torch.nn.functional.silu(gate) * up)
    return out + experts.down_proj_bias[e] if bias else out


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dispatch", ["grouped_mm", "sorted_runs", "gathered"])
def test_both_dispatches_equal_a_naive_per_token_loop(dispatch, bias):
    torch.manual_seed(3)
    block = SparseMoeBlock(HIDDEN, INTER, EXPERTS, TOP_K, bias=bias)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.3)
    block.experts.dispatch = dispatch
    tokens = torch.randn(17, HIDDEN, generator=torch.Generator().manual_seed(2))
    _, weights, experts = block.router(tokens)
    naive = torch.stack([
        sum(weights[t, j] * expert_by_hand(block.experts, int(experts[t, j]), tokens[t], bias) for j in range(TOP_K))
        for t in range(tokens.shape[0])
    ])
    torch.testing.assert_close(block.experts(tokens, weights, experts), naive, **TOLERANCE)


@pytest.mark.parametrize("bias", [False, True])
def test_under_autocast_grouped_mm_multiplies_in_bf16_like_the_other_dispatches(bias):
    """Autocast casts F.linear (sorted_runs) and bmm (gathered) to bf16 but knows nothing of the private
    _grouped_mm: left alone it multiplied in fp32 beside a dense model's bf16 matmuls (recipe 10's
    MoE/dense timing). It casts as autocast would: the same bf16 products as sorted_runs."""
    torch.manual_seed(3)
    block = SparseMoeBlock(HIDDEN, INTER, EXPERTS, TOP_K, bias=bias)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.3)
    tokens = torch.randn(33, HIDDEN, generator=torch.Generator().manual_seed(2))
    _, weights, experts = block.router(tokens)
    outputs = {}
    for dispatch in ("grouped_mm", "sorted_runs"):
        block.experts.dispatch = dispatch
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outputs[dispatch] = block.experts(tokens, weights, experts)
    in_fp32 = block.experts(tokens, weights, experts)
    scale = in_fp32.abs().max().item()
    # Equal up to bf16 rounding (F.linear adds its bias before rounding, the grouped path after: one ulp or two).
    torch.testing.assert_close(outputs["grouped_mm"], outputs["sorted_runs"], atol=2e-2 * scale, rtol=2e-2)
    assert (outputs["grouped_mm"] - in_fp32).abs().max() > 1e-4 * scale  # bf16 products, not fp32 ones


@pytest.mark.parametrize("dispatch", ["grouped_mm", "sorted_runs", "gathered"])
def test_a_decode_step_reads_only_the_chosen_experts(dispatch):
    """One token, k = 2 of 4: the weights of the two experts it is not routed to get no gradient, and NaN there changes nothing."""
    block, _ = block_pair(seed=4)
    block.eval()
    block.experts.dispatch = dispatch
    token = torch.randn(1, 1, HIDDEN, generator=torch.Generator().manual_seed(5))
    chosen = set(block.router(token.reshape(1, HIDDEN))[2].reshape(-1).tolist())
    unused = sorted(set(range(EXPERTS)) - chosen)
    before, _ = block(token)
    with torch.no_grad():
        block.experts.gate_up_proj[unused] = float("nan")
        block.experts.down_proj[unused] = float("nan")
    after, _ = block(token)
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    after.sum().backward()
    assert block.experts.gate_up_proj.grad[unused].abs().sum() == 0
    assert block.experts.gate_up_proj.grad[sorted(chosen)].abs().sum() > 0


@pytest.mark.parametrize("dispatch", ["grouped_mm", "sorted_runs", "gathered"])
def test_the_combine_puts_slots_back_by_a_copy_not_a_scatter_add(dispatch):
    """Each token's k outputs return to slot order by ``index_copy_`` (a permutation) and are summed per token: on CPU the
    scatter-add of ``index_add_`` cost as much as a grouped_mm at a decode step (benchmarks/moe_dispatch.py).
    Checked on the aten ops a decode step and a training forward/backward actually run."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class RecordOps(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.add(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    block, _ = block_pair(seed=6)
    block.experts.dispatch = dispatch
    for tokens in (1, 40):
        x = torch.randn(1, tokens, HIDDEN, requires_grad=True)
        with RecordOps() as recorded:
            block(x)[0].sum().backward()
        assert "index_copy_" in recorded.ops or "index_copy" in recorded.ops
        assert not {"index_add_", "index_add", "scatter_add_", "scatter_add"} & recorded.ops, sorted(recorded.ops)


def test_a_folder_saved_with_one_linear_per_expert_loads_into_the_fused_layout():
    """``tests/fixtures/moe_per_expert_folder`` was saved by the zoo before the experts were fused
    (``experts.<e>.{gate,up,down}_proj.weight``), with its logits; it loads, through both entry points, to the same logits."""
    folder = Path(__file__).parent / "fixtures" / "moe_per_expert_folder"
    with safe_open(folder / "model.safetensors", "pt") as f:
        assert "model.layers.0.mlp.experts.3.gate_proj.weight" in f.keys()
    expected = json.loads((folder / "expected_logits.json").read_text())
    for cls in (MoEDecoderForCausalLM, AutoModelForCausalLM):
        model = cls.from_pretrained(folder).eval()
        assert model.model.layers[0].mlp.experts.gate_up_proj.shape == (4, 2 * 24, 16)
        with torch.no_grad():
            logits = model(torch.tensor(expected["input_ids"])).logits
        torch.testing.assert_close(logits, torch.tensor(expected["logits"]), **TOLERANCE)


def test_a_saved_folder_keeps_the_fused_layout(tmp_path):
    tiny_moe().save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        names = set(f.keys())
    assert "model.layers.0.mlp.experts.gate_up_proj" in names and not any(".experts.0." in n for n in names)


def test_router_keeps_the_top_k_with_renormalised_weights():
    router = TopKRouter(hidden_size=2, num_experts=4, top_k=2)
    with torch.no_grad():
        router.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.5, 0.5]]))
    logits, weights, experts = router(torch.tensor([[2.0, 1.0]]))
    # logits (2, 1, -2, 1.5): experts 0 and 3 win, weighted e^2 : e^1.5, the softmax's denominator cancelling.
    torch.testing.assert_close(logits, torch.tensor([[2.0, 1.0, -2.0, 1.5]]))
    assert experts.tolist() == [[0, 3]]
    top = torch.tensor([math.exp(2.0), math.exp(1.5)])
    torch.testing.assert_close(weights, (top / top.sum())[None])


def test_balancing_loss_on_a_hand_computed_example():
    # One layer, 4 tokens, 2 experts, k = 1. Softmax rows: p(e0) = 0.5, 0.5, sigmoid(2), sigmoid(-2).
    logits = torch.tensor([[0.0, 0.0], [0.0, 0.0], [2.0, 0.0], [-2.0, 0.0]])
    # top-1 (ties go to expert 0): e0, e0, e0, e1 -> f = (3/4, 1/4); P = mean probabilities = (1/2, 1/2).
    # loss = E * sum f_e P_e = 2 * (3/4 * 1/2 + 1/4 * 1/2) = 1.0
    torch.testing.assert_close(load_balancing_loss((logits,), num_experts=2, top_k=1), torch.tensor(1.0))
    # With the last token as padding: f = (1, 0), P_e0 = (0.5 + 0.5 + sigmoid(2)) / 3.
    p0 = (1.0 + torch.sigmoid(torch.tensor(2.0))) / 3
    masked = load_balancing_loss((logits,), num_experts=2, top_k=1, attention_mask=torch.tensor([[1, 1, 1, 0]]))
    torch.testing.assert_close(masked, 2 * p0)
    # A uniform router gives k, its minimum.
    torch.testing.assert_close(load_balancing_loss((torch.zeros(8, 4),), num_experts=4, top_k=2), torch.tensor(2.0))


def test_mixtrals_joint_count_misses_layers_that_cancel_and_the_per_layer_loss_does_not():
    # Layer 1 sends every token to expert 0, layer 2 to expert 1 (k = 1, E = 2).
    layers = (torch.tensor([[5.0, 0.0]] * 2), torch.tensor([[0.0, 5.0]] * 2))
    # Counted together (transformers' Mixtral), f = P = (1/2, 1/2): the minimum, k = 1, as if balanced.
    torch.testing.assert_close(load_balancing_loss(layers, num_experts=2, top_k=1), torch.tensor(1.0))
    # Per layer (Switch): f = (1, 0), P = (sigmoid(5), sigmoid(-5)) -> 2 * sigmoid(5) in each layer.
    expected = 2 * torch.sigmoid(torch.tensor(5.0))
    torch.testing.assert_close(load_balancing_loss(layers, num_experts=2, top_k=1, per_layer=True), expected)


def test_balancing_loss_equals_transformers_with_padding_over_layers():
    generator = torch.Generator().manual_seed(0)
    layers = tuple(torch.randn(3 * 7, EXPERTS, generator=generator) for _ in range(3))
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[0, :4] = 0
    mask[2, :1] = 0
    for attention_mask in (None, mask):
        expected = load_balancing_loss_func(layers, EXPERTS, TOP_K, attention_mask)
        torch.testing.assert_close(load_balancing_loss(layers, EXPERTS, TOP_K, attention_mask), expected, rtol=1e-6, atol=1e-6)


def test_router_z_loss_is_the_mean_squared_logsumexp():
    logits = (torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]), torch.tensor([[5.0, -1.0, 0.0], [2.0, 2.0, 2.0]]))
    per_token = [[math.log(math.exp(1) + math.exp(2) + math.exp(3)), math.log(3)], [math.log(math.exp(5) + math.exp(-1) + 1), 2 + math.log(3)]]
    expected = sum(sum(v * v for v in layer) / 2 for layer in per_token) / 2
    torch.testing.assert_close(router_z_loss(logits), torch.tensor(expected, dtype=torch.float32))
    # Padding excluded: only the first token of each layer counts.
    masked = (per_token[0][0] ** 2 + per_token[1][0] ** 2) / 2
    torch.testing.assert_close(router_z_loss(logits, torch.tensor([[1, 0]])), torch.tensor(masked, dtype=torch.float32))


def tiny_moe(**overrides) -> MoEDecoderForCausalLM:
    torch.manual_seed(0)
    fields = dict(
        vocab_size=VOCAB, max_position_embeddings=64, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=EXPERTS, num_experts_per_tok=TOP_K,
        router_aux_loss_coef=0.02, initializer_range=0.2,  # large router logits, so routing depends on the input
    )
    return MoEDecoderForCausalLM(MoEDecoderConfig(**{**fields, **overrides})).eval()


def assert_same_outputs_and_generations(ours: MoEDecoderForCausalLM, reference: MixtralForCausalLM) -> None:
    x = ids()
    mask = torch.ones_like(x)
    mask[0, :5] = 0  # padding in one row: excluded from the balancing loss by both
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        mine = ours(x, attention_mask=mask, position_ids=positions, labels=x, output_router_logits=True)
        theirs = reference(x, attention_mask=mask, position_ids=positions, labels=x, output_router_logits=True)
        real = mask.bool()  # padded positions attend to nothing: their outputs are no one's to compare
        torch.testing.assert_close(mine.logits[real], theirs.logits[real], **TOLERANCE)
        for a, b in zip(mine.router_logits, theirs.router_logits, strict=True):
            torch.testing.assert_close(a[real.reshape(-1)], b[real.reshape(-1)], **TOLERANCE)
        torch.testing.assert_close(mine.aux_loss, theirs.aux_loss, **TOLERANCE)
        unpadded = ours(x, labels=x, output_router_logits=True)
        expected = reference(x, labels=x, output_router_logits=True)
        torch.testing.assert_close(unpadded.loss, expected.loss, **TOLERANCE)  # cross-entropy + coef * aux, as Mixtral
        torch.testing.assert_close(unpadded.aux_loss, expected.aux_loss, **TOLERANCE)
    greedy = ours.generate(x, max_new_tokens=16, do_sample=False)
    assert torch.equal(greedy, reference.generate(x, max_new_tokens=16, do_sample=False))


@pytest.mark.parametrize("tied", [True, False])
def test_moe_to_mixtral_and_back(tied):
    ours = tiny_moe(tie_word_embeddings=tied)
    mixtral = moe_to_mixtral(ours)
    assert type(mixtral) is MixtralForCausalLM and SERVING_CONVERTERS[MoEDecoderForCausalLM] is moe_to_mixtral
    assert_same_outputs_and_generations(ours, mixtral)
    back = mixtral_to_moe(mixtral)
    assert back.state_dict().keys() == ours.state_dict().keys()
    for name, tensor in ours.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name


def test_mixtral_from_transformers_converts_to_ours():
    torch.manual_seed(0)
    mixtral = MixtralForCausalLM(mixtral_config(initializer_range=0.2)).eval()
    ours = mixtral_to_moe(mixtral)
    assert_same_outputs_and_generations(ours, mixtral)
    again = moe_to_mixtral(ours)
    for name, tensor in mixtral.state_dict().items():
        assert torch.equal(again.state_dict()[name], tensor), name


def test_export_for_serving_reloads_as_plain_mixtral(tmp_path):
    model = tiny_moe()
    tokenizer = build_char_tokenizer("abcdefghijklmnopqrstuvwxyz ,.\n" + "ABCDEFGHIJKLMNOPQRSTUVWXYZ!?;:'-0123456")
    folder = export_for_serving(model, tokenizer, tmp_path / "export")
    assert "auto_map" not in (folder / "config.json").read_text() and not list(folder.glob("*.py"))  # no remote code
    reloaded = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert type(reloaded) is MixtralForCausalLM
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).logits, model(x).logits, **TOLERANCE)


def test_unsupported_mixtral_variants_are_refused_by_name():
    for field, value in (("router_jitter_noise", 0.1), ("sliding_window", 16), ("hidden_act", "gelu")):
        with pytest.raises(ValueError, match=field):
            mixtral_to_moe(MixtralForCausalLM(mixtral_config(**{field: value})))


def test_aux_loss_joins_the_loss_only_with_labels_and_router_logits():
    model = tiny_moe(router_z_loss_coef=0.5)
    x = ids()
    with torch.no_grad():
        plain = model(x, labels=x)
        assert plain.aux_loss is None and plain.router_logits is None
        with_router = model(x, labels=x, output_router_logits=True)
        assert len(with_router.router_logits) == 2 and with_router.router_logits[0].shape == (x.numel(), EXPERTS)
        z = router_z_loss(with_router.router_logits)
        torch.testing.assert_close(with_router.loss, plain.loss + 0.02 * with_router.aux_loss + 0.5 * z)
        no_labels = model(x, output_router_logits=True)
        assert no_labels.loss is None
        torch.testing.assert_close(no_labels.aux_loss, with_router.aux_loss)
        model.config.output_router_logits = True  # the config default, as Mixtral's
        torch.testing.assert_close(model(x, labels=x).loss, with_router.loss)
        as_tuple = model(x, labels=x, return_dict=False, use_cache=False)
        torch.testing.assert_close(as_tuple[0], with_router.loss)
        model.config.router_aux_loss_per_layer = True
        per_layer = model(x)
        expected = load_balancing_loss(per_layer.router_logits, EXPERTS, TOP_K, per_layer=True)
        torch.testing.assert_close(per_layer.aux_loss, expected)
        assert not torch.allclose(per_layer.aux_loss, with_router.aux_loss)


def test_trl_fused_lm_head_computes_the_same_aux_loss():
    """trl's trainers patch the model with a fused LM-head loss that takes router logits from the backbone."""
    from trl.trainer.utils import add_fused_lm_head

    model = tiny_moe(output_router_logits=True)
    x = ids()
    with torch.no_grad():
        expected = model(x, attention_mask=torch.ones_like(x), labels=x)
        add_fused_lm_head(model)
        fused = model(input_ids=x, attention_mask=torch.ones_like(x), labels=x, fused_lm_head=True)
    torch.testing.assert_close(fused.aux_loss, expected.aux_loss, **TOLERANCE)
    torch.testing.assert_close(fused.loss, expected.loss, **TOLERANCE)


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(num_local_experts=2, num_experts_per_tok=3), r"num_experts_per_tok=3 must be at most num_local_experts=2"),
        (dict(num_local_experts=0), r"num_local_experts must be a positive integer, got 0"),
        (dict(num_experts_per_tok=1.5), r"num_experts_per_tok must be a positive integer, got 1.5"),
        (dict(router_aux_loss_coef=-0.1), r"router_aux_loss_coef must be a number >= 0, got -0.1"),
        (dict(router_z_loss_coef="big"), r"router_z_loss_coef must be a number >= 0, got 'big'"),
        (dict(output_router_logits="yes"), r"output_router_logits must be True or False, got 'yes'"),
        (dict(router_aux_loss_per_layer=1), r"router_aux_loss_per_layer must be True or False, got 1"),
    ],
)
def test_bad_moe_config_names_the_field(fields, message):
    with pytest.raises(ValueError, match=message):
        MoEDecoderConfig(**fields)


def test_router_refuses_k_outside_one_to_e():
    with pytest.raises(ValueError, match=r"top_k must be in \[1, num_experts=4\], got 0"):
        TopKRouter(8, 4, 0)


def test_expert_load_counts_every_training_forward():
    model = tiny_moe().train()
    load = ExpertLoad(model)
    expected = torch.zeros(2, EXPERTS, dtype=torch.long)
    for seed in (0, 1):
        output = model(ids(seed=seed), output_router_logits=True)
        for layer, logits in enumerate(output.router_logits):
            expected[layer] += torch.bincount(logits.topk(TOP_K, dim=-1).indices.reshape(-1), minlength=EXPERTS)
    model.eval()(ids())  # evaluation forwards are not training load
    assert torch.equal(load.counts, expected)
    shares = load.snapshot(step=7)
    torch.testing.assert_close(shares, expected.double() / expected.sum(-1, keepdim=True))
    assert load.history[0][0] == 7 and load.counts.sum() == 0
    torch.testing.assert_close(imbalance(shares), shares.max(-1).values * EXPERTS)
    load.remove()


def test_expert_load_callback_snapshots_during_trainer_runs(tmp_path):
    model = tiny_moe(output_router_logits=True).train()
    x = ids(batch=4, length=16)
    dataset = Dataset.from_dict({"input_ids": x.tolist(), "labels": x.tolist()})
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=2, learning_rate=1e-2, report_to="none",
        save_strategy="no", use_cpu=True, disable_tqdm=True,
    )
    callback = ExpertLoadCallback(every=2)
    Trainer(model=model, args=args, train_dataset=dataset, data_collator=default_data_collator, callbacks=[callback]).train()
    assert [step for step, _ in callback.load.history] == [2, 4]  # nothing new is left to record at the end
    for _, shares in callback.load.history:
        torch.testing.assert_close(shares.sum(-1), torch.ones(2, dtype=torch.float64))
    assert all(not block._forward_hooks for block in model.modules() if isinstance(block, SparseMoeBlock))


def test_gradient_checkpointing_keeps_the_balancing_loss_gradients():
    """Router logits leave each layer by the side (kept on the block), so recomputation must not cut their gradient."""
    x = ids(batch=3)
    results = []
    for checkpointing in (False, True):
        model = tiny_moe(output_router_logits=True, router_z_loss_coef=0.1).train()
        if checkpointing:
            model.gradient_checkpointing_enable()
        output = model(x, labels=x)
        output.loss.backward()
        results.append((output.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (loss, grads), (loss_checkpointed, grads_checkpointed) = results
    torch.testing.assert_close(loss_checkpointed, loss, rtol=0, atol=1e-6)
    assert grads.keys() == grads_checkpointed.keys() and any("router" in name for name in grads)
    for name in grads:
        torch.testing.assert_close(grads_checkpointed[name], grads[name], rtol=0, atol=1e-6, msg=name)
