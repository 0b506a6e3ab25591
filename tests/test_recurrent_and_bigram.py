"""Lessons 1-3: the bigram learns the counting answer; the hand-written GRU equals torch.nn.GRU."""

from __future__ import annotations

import math

import pytest
import torch
from datasets import Dataset
from transformers import Trainer, TrainingArguments, default_data_collator

from hf_models import BigramConfig, BigramForCausalLM, GRULMConfig, GRULMForCausalLM
from hf_models.evaluation import evaluate_token_stream
from hf_models.modeling_gru import GRULayer


def test_counted_bigram_is_the_add_one_closed_form():
    ids = torch.tensor([0, 1, 1, 2, 0, 1, 2, 2, 0])
    model = BigramForCausalLM.from_counts(ids, BigramConfig(vocab_size=4), smoothing=1.0)
    probs = model.logits_table.weight.exp()
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(4))
    # count(1 -> 2) = 2, count(1) = 3: (2 + 1) / (3 + 4)
    assert probs[1, 2].item() == pytest.approx(3 / 7)
    assert probs[3, 0].item() == pytest.approx(1 / 4)  # an unseen row is uniform


def test_gradient_descent_lands_on_the_counting_answer(tmp_path):
    """Lesson 1's claim, on a small synthetic Markov chain: within 0.02 nats of the count model."""
    generator = torch.Generator().manual_seed(0)
    vocab = 12
    transition = torch.softmax(torch.randn(vocab, vocab, generator=generator) * 2, dim=-1)
    ids = [0]
    for _ in range(60_000):
        ids.append(torch.multinomial(transition[ids[-1]], 1, generator=generator).item())
    ids = torch.tensor(ids)
    train, held_out = ids[:50_000], ids[50_000:]
    config = BigramConfig(vocab_size=vocab)
    counted = BigramForCausalLM.from_counts(train, config)
    model = BigramForCausalLM(config)
    blocks = train[: 50_000 // 100 * 100].view(-1, 100).tolist()
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=300, per_device_train_batch_size=50, learning_rate=0.2, lr_scheduler_type="cosine",
        report_to="none", save_strategy="no", use_cpu=True, disable_tqdm=True, weight_decay=0.0,
    )
    Trainer(model=model, args=args, train_dataset=Dataset.from_dict({"input_ids": blocks, "labels": blocks}), data_collator=default_data_collator).train()
    bytes_per_token = torch.ones(vocab, dtype=torch.long)
    learned_loss = evaluate_token_stream(model, held_out, bytes_per_token, 100)["loss"]
    counted_loss = evaluate_token_stream(counted, held_out, bytes_per_token, 100)["loss"]
    assert abs(learned_loss - counted_loss) < 0.02
    assert counted_loss < math.log(vocab) - 0.3  # and both are far better than uniform


def gru_pair(input_size=12, hidden=16, seed=0):
    torch.manual_seed(seed)
    ours = GRULayer(input_size, hidden)
    reference = torch.nn.GRU(input_size, hidden, batch_first=True)
    with torch.no_grad():
        reference.weight_ih_l0.copy_(ours.input_proj.weight)
        reference.weight_hh_l0.copy_(ours.hidden_proj.weight)
        reference.bias_ih_l0.copy_(ours.input_proj.bias)
        reference.bias_hh_l0.copy_(ours.hidden_proj.bias)
    return ours, reference


@pytest.mark.parametrize("implementation", ["eager", "torch"])
def test_gru_layer_equals_torch_nn_gru(implementation):
    ours, reference = gru_pair()
    x, h0 = torch.randn(3, 17, 12), torch.randn(3, 16)
    expected, expected_last = reference(x, h0[None])
    outputs, last = ours(x, h0, None, implementation)
    torch.testing.assert_close(outputs, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(last, expected_last[0], rtol=1e-5, atol=1e-5)
    # and the gradients agree too
    outputs.sum().backward()
    expected.sum().backward()
    torch.testing.assert_close(ours.hidden_proj.weight.grad, reference.weight_hh_l0.grad, rtol=1e-4, atol=1e-5)


def test_gru_model_implementations_agree_and_padding_keeps_the_state():
    torch.manual_seed(0)
    model = GRULMForCausalLM(GRULMConfig(vocab_size=30, hidden_size=16, num_hidden_layers=2, gru_implementation="eager")).eval()
    ids = torch.randint(0, 30, (2, 11))
    eager = model(ids).logits
    model.config.gru_implementation = "torch"
    torch.testing.assert_close(model(ids).logits, eager, rtol=1e-5, atol=1e-5)
    # A left-padded row gives the same last logits as the unpadded sequence.
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids[:1]], dim=1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 11, dtype=torch.long)], dim=1)
    torch.testing.assert_close(model(padded, attention_mask=mask).logits[:, -1], eager[:1, -1], rtol=1e-5, atol=1e-5)


def test_gru_generation_carries_state_not_prefix():
    torch.manual_seed(0)
    model = GRULMForCausalLM(GRULMConfig(vocab_size=30, hidden_size=16)).eval()
    ids = torch.randint(0, 30, (1, 9))
    out = model.generate(ids, max_new_tokens=5, do_sample=False, return_dict_in_generate=True)
    cache = out.past_key_values
    assert cache.get_seq_length() == 9 + 4 and cache.get_state(0).shape == (1, 16)
