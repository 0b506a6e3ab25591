"""DPO on lesson 7's hand-written training loop, and the held-out preference measure.

:class:`DPOTrainingLoop` is :class:`~hf_models.training.loop.TrainingLoop` with another objective:
everything else (AdamW, warm-up + cosine, accumulation, clipping, mixed precision, logging,
checkpoints) is lesson 7's. It overrides the loop's seams:

* ``count_items``: a step's loss is the mean over its *preference pairs* (DPO's loss is per
  sequence pair, not per token), so under accumulation each micro-batch divides its summed pair
  losses by the pairs of the whole step;
* ``compute_loss``: one concatenated forward of chosen and rejected through the policy, the same
  batch through the frozen reference without gradients (``preference_forward``);
* ``evaluate``: held-out reward accuracy and margins (:func:`evaluate_preferences`) instead of
  bits per byte;
* ``tokens_per_example``: the mean tokens a pair puts through the model (pairs vary in length).

Dropout is switched off in policy and reference, as trl does by default: with dropout the
"reference" log-probabilities of the same sequence would change from call to call, and the
policy's log ratio at step 0 would not be 0.
"""

from __future__ import annotations

from functools import partial

import torch
from transformers import TrainingArguments

from ..training.loop import TrainingLoop
from .dpo import DPOLoss, check_dpo_settings, check_same_vocabulary, preference_forward
from .preference_batches import collate_preference_pairs, pair_token_count


def disable_dropout(model: torch.nn.Module) -> None:
    """Set every dropout layer's probability to 0 (trl's ``disable_dropout=True``)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


@torch.no_grad()
def evaluate_preferences(
    policy: torch.nn.Module,
    reference: torch.nn.Module,
    pairs,
    pad_token_id: int,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    batch_size: int = 16,
    max_length: int | None = None,
) -> dict[str, float]:
    """DPO loss, implicit rewards, reward accuracy and margin of ``policy`` over all tokenized ``pairs``,
    and how often the policy's own likelihood prefers the chosen completion (``likelihood_accuracy``).

    Reward accuracy on held-out pairs is how often the policy, read as a reward model
    ``beta * log pi / pi_ref``, ranks the chosen completion above the rejected one. The means are
    over pairs (trl averages per batch, which is the same when all batches are full).
    """
    was_training = policy.training
    policy.eval()
    device = next(policy.parameters()).device
    results: list[DPOLoss] = []
    for start in range(0, len(pairs), batch_size):
        examples = [pairs[i] for i in range(start, min(start + batch_size, len(pairs)))]
        batch = {k: v.to(device) for k, v in collate_preference_pairs(examples, pad_token_id, max_length).items()}
        results.append(preference_forward(policy, reference, batch, beta, label_smoothing))
    policy.train(was_training)
    fields = ("losses", "chosen_rewards", "rejected_rewards", "chosen_logps", "rejected_logps")
    everything = DPOLoss(*(torch.cat([getattr(r, name) for r in results]) for name in fields))
    return {
        "loss": everything.loss.item(),
        "rewards/chosen": everything.chosen_rewards.mean().item(),
        "rewards/rejected": everything.rejected_rewards.mean().item(),
        "rewards/accuracies": everything.accuracies.mean().item(),
        "rewards/margins": everything.margins.mean().item(),
        "logps/chosen": everything.chosen_logps.mean().item(),
        "logps/rejected": everything.rejected_logps.mean().item(),
        "likelihood_accuracy": everything.likelihood_accuracies.mean().item(),
    }


class DPOTrainingLoop(TrainingLoop):
    """Train ``model`` (the policy) with DPO against the frozen ``reference`` on tokenized preference pairs.

    ``train_dataset`` / ``eval_dataset`` hold ``{"prompt_ids", "chosen_ids", "rejected_ids"}``
    (``tokenize_preference_pair``). ``args`` are transformers' ``TrainingArguments`` (a trl
    ``DPOConfig`` works too, so the two trainers can run on one settings object).

    Raises:
        ValueError: ``beta <= 0``, ``label_smoothing`` outside ``[0, 0.5)``, or a reference whose
            vocabulary differs from the policy's.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        reference: torch.nn.Module,
        train_dataset,
        args: TrainingArguments,
        pad_token_id: int,
        eval_dataset=None,
        beta: float = 0.1,
        label_smoothing: float = 0.0,
        max_length: int | None = 1024,
        eval_batch_size: int = 16,
        shuffle: bool = True,
    ):
        check_dpo_settings(beta, label_smoothing)
        check_same_vocabulary(model, reference)
        disable_dropout(model)
        disable_dropout(reference)
        self.beta, self.label_smoothing, self.pad_token_id, self.max_length = beta, label_smoothing, pad_token_id, max_length
        collate = partial(collate_preference_pairs, pad_token_id=pad_token_id, max_length=max_length)
        super().__init__(model, train_dataset, args, eval_dataset=eval_dataset, shuffle=shuffle, collate=collate, eval_batch_size=eval_batch_size)
        self.reference = reference.to(self.device).eval().requires_grad_(False)

    def count_items(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return batch["input_ids"].new_tensor(batch["input_ids"].shape[0] // 2)  # rows are chosen + rejected

    def compute_loss(self, batch: dict[str, torch.Tensor], num_items_in_batch: torch.Tensor) -> torch.Tensor:
        return preference_forward(self.model, self.reference, batch, self.beta, self.label_smoothing).losses.sum() / num_items_in_batch

    def tokens_per_example(self) -> float:
        dataset = self.batches.dataset
        return sum(pair_token_count(dataset[i]) for i in range(len(dataset))) / len(dataset)

    def evaluate(self) -> dict[str, float]:
        model = self.accelerator.unwrap_model(self.model)
        with self.autocast():
            return evaluate_preferences(
                model, self.reference, self.eval_dataset, self.pad_token_id, self.beta, self.label_smoothing,
                self.eval_batch_size, self.max_length,
            )


__all__ = ["DPOTrainingLoop", "disable_dropout", "evaluate_preferences"]
