"""Lesson 11's hand-written DPO against trl 1.16's ``DPOTrainer``, on the same weights and the same batch.

* tokenization and batching: our pairs -> ids -> padded batch equal the trainer's own dataset and
  collator output, truncation included;
* per-sequence completion log-probs equal trl's fused LM head's, for policy and reference;
* loss, chosen/rejected rewards, reward accuracy and margin equal the metrics ``compute_loss``
  logs, to 1e-5, and so do the loss's gradients;
* label smoothing is cDPO: the expected trl loss when the label is flipped with probability eps;
* the hand loop (lesson 7's ``TrainingLoop`` with the DPO objective) follows ``DPOTrainer``'s loss
  curve step for step, and leaves the reference untouched;
* bad settings are refused by name.

``DPOTrainer`` with its own defaults (bf16, gradient checkpointing, no explicit settings) on a
zoo model loaded from a saved folder is ``tests/test_model_contract.py``'s
``test_trl_dpo_trainer_trains_with_its_defaults``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from datasets import Dataset

from hf_models.alignment import (
    DPOTrainingLoop,
    collate_preference_pairs,
    completion_log_probs,
    dpo_loss,
    evaluate_preferences,
    preference_forward,
    tokenize_preference_pair,
)
from tests.helpers import build_tiny_model

pytestmark = pytest.mark.usefixtures("single_thread")

TOLERANCE = dict(atol=1e-5, rtol=1e-5)
MODEL_TYPE = "zoo_modern"

# Plain-text pairs in the tiny tokenizer's characters; lengths differ so that padding and masks matter.
PAIRS = {
    "prompt": ["romeo:\n", "juliet:\n", "it is the ", "but soft, "],
    "chosen": ["but soft", "the sun", "east", "what light"],
    "rejected": ["xyz is", "window breaks", "s", "juliet"],
}


# A minimal chat template in the tiny tokenizer's characters (the recipe uses the zoo's, from lesson 8).
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'][0] }}: {{ m['content'] }}{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "\n{% endfor %}{% if add_generation_prompt %}a: {% endif %}"
)


def conversational(pairs: dict[str, list[str]]) -> dict[str, list[list[dict]]]:
    """The same pairs in trl's conversational format: a user turn, then the assistant's completions."""
    return {
        "prompt": [[{"role": "user", "content": p}] for p in pairs["prompt"]],
        "chosen": [[{"role": "assistant", "content": c}] for c in pairs["chosen"]],
        "rejected": [[{"role": "assistant", "content": r}] for r in pairs["rejected"]],
    }


def trl_trainer(policy, reference, tokenizer, tmp_path, pairs=PAIRS, **settings):
    """``DPOTrainer`` in fp32 with an explicit reference (a model built in memory has no ``_name_or_path``)."""
    from trl import DPOConfig, DPOTrainer

    settings = {"per_device_train_batch_size": len(PAIRS["prompt"]), **settings}
    args = DPOConfig(output_dir=str(tmp_path / "trl"), use_cpu=True, bf16=False, gradient_checkpointing=False, report_to="none", **settings)
    return DPOTrainer(model=policy, ref_model=reference, args=args, train_dataset=Dataset.from_dict(pairs), processing_class=tokenizer)


@pytest.fixture
def models(tiny_tokenizer):
    """A policy and a reference with different weights, so that rewards and margins are not 0."""
    policy = build_tiny_model(MODEL_TYPE, len(tiny_tokenizer), seed=1)
    reference = build_tiny_model(MODEL_TYPE, len(tiny_tokenizer), seed=0)
    return policy, reference


def trl_batch(trainer) -> dict[str, torch.Tensor]:
    return trainer.data_collator([trainer.train_dataset[i] for i in range(len(trainer.train_dataset))])


@pytest.mark.parametrize("chat", [False, True], ids=["plain", "conversational"])
def test_tokenization_and_batches_equal_trl(chat, models, tiny_tokenizer, tmp_path):
    pairs = conversational(PAIRS) if chat else PAIRS
    if chat:
        tiny_tokenizer = copy.deepcopy(tiny_tokenizer)
        tiny_tokenizer.chat_template = CHAT_TEMPLATE
    cut = 20 if chat else 12  # cuts some prompt + completion sequences (keep_start), no prompt
    trainer = trl_trainer(*models, tiny_tokenizer, tmp_path, pairs=pairs, max_length=cut)
    ours = [tokenize_preference_pair(dict(zip(pairs, values)), tiny_tokenizer) for values in zip(*pairs.values())]
    theirs = [{k: trainer.train_dataset[i][k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for i in range(len(ours))]
    assert ours == theirs
    assert all(tiny_tokenizer.eos_token_id in pair["chosen_ids"] for pair in ours)  # the EOS trl appends / the template closes with
    for max_length in (None, cut):
        trainer.data_collator.max_length = max_length
        expected = trl_batch(trainer)
        batch = collate_preference_pairs(ours, tiny_tokenizer.pad_token_id, max_length)
        assert batch.keys() == expected.keys()
        for key in batch:
            torch.testing.assert_close(batch[key], expected[key], rtol=0, atol=0)
    assert batch["input_ids"].shape[1] == cut and len(trainer.train_dataset) == len(ours)


def test_loss_rewards_metrics_and_gradients_equal_trl(models, tiny_tokenizer, tmp_path):
    policy, reference = models
    beta = 0.3
    trainer = trl_trainer(policy, reference, tiny_tokenizer, tmp_path, beta=beta)
    batch = trl_batch(trainer)

    # Per-sequence completion log-probs against trl's fused LM head (its reference-log-prob helper).
    for model in (policy, reference):
        chosen, rejected = trainer.compute_ref_log_probs(model, batch)
        torch.testing.assert_close(completion_log_probs(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"]),
                                   torch.cat([chosen, rejected]), **TOLERANCE)

    policy.train()
    trl_loss = trainer.compute_loss(policy, batch)
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    trl_loss.backward()
    trl_grads = {n: p.grad.clone() for n, p in policy.named_parameters()}
    policy.zero_grad()

    ours = preference_forward(policy, reference, batch, beta=beta)
    ours.loss.backward()
    torch.testing.assert_close(ours.loss, trl_loss, **TOLERANCE)
    assert abs(ours.loss.item() - torch.log(torch.tensor(2.0)).item()) > 1e-3  # the models differ: not the trivial loss
    assert ours.margins.abs().min() > 0  # every pair has a non-zero margin to rank
    for name, value in [
        ("rewards/chosen", ours.chosen_rewards.mean()),
        ("rewards/rejected", ours.rejected_rewards.mean()),
        ("rewards/accuracies", ours.accuracies.mean()),
        ("rewards/margins", ours.margins.mean()),
        ("logps/chosen", ours.chosen_logps.mean()),
        ("logps/rejected", ours.rejected_logps.mean()),
    ]:
        assert value.item() == pytest.approx(metrics[name], abs=1e-5), name
    for name, parameter in policy.named_parameters():
        torch.testing.assert_close(parameter.grad, trl_grads[name], **TOLERANCE, msg=name)
    assert all(p.grad is None for p in reference.parameters())

    # The held-out measure reports the same numbers, and a policy equal to its reference has rewards of 0.
    held_out = evaluate_preferences(policy, reference, trainer.train_dataset, tiny_tokenizer.pad_token_id, beta=beta)
    assert held_out["loss"] == pytest.approx(trl_loss.item(), abs=1e-5)
    assert held_out["rewards/margins"] == pytest.approx(metrics["rewards/margins"], abs=1e-5)
    itself = evaluate_preferences(reference, reference, trainer.train_dataset, tiny_tokenizer.pad_token_id, beta=beta)
    assert itself["rewards/margins"] == 0 and itself["rewards/accuracies"] == 0 and itself["loss"] == pytest.approx(0.6931472)


def test_label_smoothing_is_the_expected_trl_loss_over_flipped_labels(models, tiny_tokenizer, tmp_path):
    policy, reference = models
    trainer = trl_trainer(policy, reference, tiny_tokenizer, tmp_path, beta=0.5)
    batch = trl_batch(trainer)
    flipped = {k: torch.cat(v.chunk(2)[::-1]) for k, v in batch.items()}  # rejected rows first: every label flipped
    with torch.no_grad():
        plain, reversed_ = trainer.compute_loss(policy, batch), trainer.compute_loss(policy, flipped)
        for eps in (0.0, 0.1, 0.3):
            ours = preference_forward(policy, reference, batch, beta=0.5, label_smoothing=eps)
            torch.testing.assert_close(ours.loss, (1 - eps) * plain + eps * reversed_, **TOLERANCE)
    # cDPO's loss has its minimum at a finite margin, beta * margin = log((1 - eps) / eps).
    margin = torch.linspace(-5, 15, 2001, requires_grad=False)
    losses = dpo_loss(margin, torch.zeros_like(margin), torch.zeros_like(margin), torch.zeros_like(margin), beta=1.0, label_smoothing=0.1).losses
    assert margin[losses.argmin()].item() == pytest.approx(torch.log(torch.tensor(9.0)).item(), abs=0.01)


def test_hand_loop_follows_dpo_trainer_step_for_step(tiny_tokenizer, tmp_path):
    settings = dict(
        max_steps=4, learning_rate=5e-3, warmup_steps=1, lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr": 1e-4}, logging_steps=1, train_sampling_strategy="sequential", beta=0.2,
        disable_tqdm=True, save_strategy="no", per_device_train_batch_size=2,
    )
    new = lambda seed: build_tiny_model(MODEL_TYPE, len(tiny_tokenizer), seed=seed)  # noqa: E731
    trainer = trl_trainer(new(0), new(0), tiny_tokenizer, tmp_path, **settings)
    trainer.train()
    theirs = [log["loss"] for log in trainer.state.log_history if "loss" in log]

    policy, reference = new(0), new(0)
    before = {n: p.detach().clone() for n, p in reference.named_parameters()}
    loop = DPOTrainingLoop(policy, reference, trainer.train_dataset, trainer.args, tiny_tokenizer.pad_token_id, beta=0.2, shuffle=False)
    hand = loop.train()
    ours = [hand.losses[s] for s in sorted(hand.losses)]
    assert len(ours) == len(theirs) == 4
    assert ours[0] == pytest.approx(0.6931472, abs=1e-6)  # policy == reference at step 0
    assert ours == pytest.approx(theirs, abs=1e-5)
    assert ours[-1] < ours[0]
    for name, parameter in policy.named_parameters():
        torch.testing.assert_close(parameter, trainer.model.get_parameter(name), atol=1e-5, rtol=1e-4, msg=name)
    assert all(torch.equal(before[n], p.cpu()) for n, p in reference.named_parameters())
    assert hand.tokens_per_second > 0


def test_bad_settings_are_refused_by_name(models, tiny_tokenizer, tmp_path):
    policy, reference = models
    logps = torch.zeros(2)
    for beta in (0.0, -0.1):
        with pytest.raises(ValueError, match=rf"beta={beta}.*> 0"):
            dpo_loss(logps, logps, logps, logps, beta=beta)
    for eps in (-0.1, 0.5, 0.7):
        with pytest.raises(ValueError, match=rf"label_smoothing={eps}.*\[0, 0.5\)"):
            dpo_loss(logps, logps, logps, logps, label_smoothing=eps)
    other = build_tiny_model(MODEL_TYPE, len(tiny_tokenizer) + 7)
    pairs = [tokenize_preference_pair(dict(zip(PAIRS, values)), tiny_tokenizer) for values in zip(*PAIRS.values())]
    from transformers import TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path / "loop"), max_steps=1, use_cpu=True, report_to="none")
    with pytest.raises(ValueError, match=rf"{len(tiny_tokenizer) + 7} tokens but the policy's has {len(tiny_tokenizer)}"):
        DPOTrainingLoop(policy, other, pairs, args, tiny_tokenizer.pad_token_id)
    with pytest.raises(ValueError, match="beta=0"):
        DPOTrainingLoop(policy, reference, pairs, args, tiny_tokenizer.pad_token_id, beta=0)
