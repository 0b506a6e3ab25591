"""Lesson 11: Direct Preference Optimization (DPO), written out.

RLHF (Ouyang et al. 2022) fits a reward model to human preferences, then trains the policy with PPO
to maximise that reward minus ``beta`` times its KL divergence from a frozen reference (the SFT
model). Rafailov et al. 2023 ("Direct Preference Optimization: Your Language Model is Secretly a
Reward Model") solve that KL-regularised problem in closed form: the optimal policy satisfies

    r(x, y) = beta * log pi(y | x) / pi_ref(y | x) + beta * log Z(x)

so the reward is *implicit* in the policy. Putting it into the Bradley-Terry preference model
``p(y_w > y_l | x) = sigmoid(r(x, y_w) - r(x, y_l))`` cancels the intractable ``Z(x)`` and leaves a
classification loss on preference pairs, with no reward model and no sampling:

    L = -log sigmoid(beta * [(log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x))])

``log pi(y | x)`` is the *sum* of the completion tokens' log-probabilities (the prompt's tokens are
context, not scored). ``beta`` sets how far the policy may move from the reference: small beta
lets the margin grow with little KL cost, large beta keeps the policy close.

**Label smoothing (conservative DPO).** If a fraction ``eps`` of the labels is believed flipped,
the expected loss over the label noise is ``(1 - eps) L(y_w, y_l) + eps L(y_l, y_w)``
(Mitchell 2023, "A note on DPO with noisy preferences", cDPO): the loss no longer pushes the margin
to infinity, it has a finite optimum at ``beta * margin = log((1 - eps) / eps)``. trl 1.16 computes
this form for its ``aot`` losses; its ``sigmoid`` loss ignores ``label_smoothing`` (only ``robust``,
``exo_pair`` and ``aot*`` read it), so cDPO in trl is the plain loss on the pair and on the flipped
pair, mixed, which is what ``tests/test_dpo.py`` compares against.

**What the logs mean.** ``beta * (log pi - log pi_ref)`` of a completion is its implicit reward.
Reward accuracy is the fraction of pairs whose chosen reward beats the rejected one (the held-out
preference accuracy of the policy read as a reward model); the margin is their mean difference.

Frontier post-training (Llama 3, Tulu 3, Qwen 2.5) runs DPO or its variants (IPO, SimPO, length
normalised DPO) on the SFT model with beta around 0.1 and learning rates around 1e-6 to 5e-7 for
billion-parameter models; the step is this one, batched over GPUs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def check_dpo_settings(beta: float, label_smoothing: float) -> None:
    """Refuse a ``beta`` or ``label_smoothing`` for which the DPO loss means nothing.

    Raises:
        ValueError: ``beta <= 0`` (the loss would not prefer the chosen completion, or be constant),
            or ``label_smoothing`` outside ``[0, 0.5)`` (at 0.5 both labels weigh the same and the
            loss no longer tells chosen from rejected; above it the preference is reversed).
    """
    if not beta > 0:
        raise ValueError(f"beta={beta} is not allowed: the DPO temperature must be > 0 (0.1 is the usual value).")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(
            f"label_smoothing={label_smoothing} is not allowed: it is the probability that a preference label is "
            f"flipped and must lie in [0, 0.5) (0 = plain DPO; 0.5 would make chosen and rejected the same)."
        )


def check_same_vocabulary(policy: torch.nn.Module, reference: torch.nn.Module) -> None:
    """Refuse a reference whose vocabulary differs from the policy's.

    The DPO ratio ``pi(y|x) / pi_ref(y|x)`` compares two distributions over the *same* tokens; with
    another vocabulary the same ids name other strings, and the "log ratio" would be noise.
    """
    sizes = {name: model.get_output_embeddings().weight.shape[0] for name, model in (("policy", policy), ("reference", reference))}
    if sizes["policy"] != sizes["reference"]:
        raise ValueError(
            f"The reference model's vocabulary has {sizes['reference']} tokens but the policy's has {sizes['policy']}: "
            f"DPO compares their probabilities of the same token ids, so the reference must share the policy's "
            f"tokenizer (usually it is the SFT model the policy starts from)."
        )


def completion_log_probs(
    model: torch.nn.Module, input_ids: torch.LongTensor, attention_mask: torch.Tensor, completion_mask: torch.Tensor
) -> torch.Tensor:
    """Summed log-probability of each sequence's completion tokens: ``log pi(y | x)``, shape (B,).

    Args:
        input_ids: (B, T) prompt followed by completion, right-padded.
        attention_mask: (B, T) 1 on real tokens.
        completion_mask: (B, T) 1 on the completion's tokens, 0 on prompt and padding.

    Token ``t`` is predicted by the logits at ``t - 1``, so the logits drop their last position and
    the targets and mask drop their first. The log-softmax is taken in fp32: under bf16 autocast the
    logits are bf16, and a sum of a hundred bf16 log-probabilities loses the margin it measures.
    """
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits  # (B, T, V)
    log_probs = F.log_softmax(logits[:, :-1].float(), dim=-1)  # (B, T-1, V): predictions of tokens 1..T-1
    targets = input_ids[:, 1:].unsqueeze(-1)  # (B, T-1, 1)
    token_log_probs = log_probs.gather(-1, targets).squeeze(-1)  # (B, T-1)
    return (token_log_probs * completion_mask[:, 1:]).sum(-1)


@dataclass
class DPOLoss:
    """Per-pair DPO losses and implicit rewards of one batch; the means are what trainers log."""

    losses: torch.Tensor  # (B,)
    chosen_rewards: torch.Tensor  # (B,) beta * (log pi - log pi_ref) of the chosen completion, detached
    rejected_rewards: torch.Tensor  # (B,)
    chosen_logps: torch.Tensor  # (B,) log pi(chosen | prompt) under the policy, detached
    rejected_logps: torch.Tensor  # (B,)

    @property
    def loss(self) -> torch.Tensor:
        return self.losses.mean()

    @property
    def margins(self) -> torch.Tensor:
        return self.chosen_rewards - self.rejected_rewards

    @property
    def accuracies(self) -> torch.Tensor:
        """1.0 where the chosen completion's implicit reward is strictly higher (ties count as wrong, as in trl)."""
        return (self.chosen_rewards > self.rejected_rewards).float()

    @property
    def likelihood_accuracies(self) -> torch.Tensor:
        """1.0 where the policy itself gives the chosen completion the higher probability.

        Before training the implicit rewards are all 0 (policy = reference), so reward accuracy
        starts at 0 by construction; this is the starting model's real preference to compare with.
        """
        return (self.chosen_logps > self.rejected_logps).float()


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> DPOLoss:
    """The sigmoid DPO loss (Rafailov et al. 2023, eq. 7), with cDPO label smoothing.

    All inputs are (B,) summed completion log-probabilities (:func:`completion_log_probs`).
    ``logsigmoid`` rather than ``log(sigmoid(.))``: the latter underflows to ``-inf`` once the
    margin is large and negative.
    """
    check_dpo_settings(beta, label_smoothing)
    chosen_log_ratios = policy_chosen_logps - reference_chosen_logps
    rejected_log_ratios = policy_rejected_logps - reference_rejected_logps
    logits = beta * (chosen_log_ratios - rejected_log_ratios)  # the Bradley-Terry reward difference
    losses = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    return DPOLoss(
        losses, beta * chosen_log_ratios.detach(), beta * rejected_log_ratios.detach(),
        policy_chosen_logps.detach(), policy_rejected_logps.detach(),
    )


def preference_forward(
    policy: torch.nn.Module,
    reference: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> DPOLoss:
    """DPO on one concatenated batch (``collate_preference_pairs``: B chosen rows, then B rejected rows).

    Chosen and rejected go through the policy in *one* forward of 2B rows, as trl does: one pass
    instead of two, and under data parallelism both halves of a pair are on the same process.
    The reference runs without gradients; it is never trained.
    """
    inputs = (batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    policy_logps = completion_log_probs(policy, *inputs)  # (2B,)
    with torch.no_grad():
        reference_logps = completion_log_probs(reference, *inputs)
    policy_chosen, policy_rejected = policy_logps.chunk(2)
    reference_chosen, reference_rejected = reference_logps.chunk(2)
    return dpo_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta, label_smoothing)


__all__ = [
    "DPOLoss",
    "check_dpo_settings",
    "check_same_vocabulary",
    "completion_log_probs",
    "dpo_loss",
    "preference_forward",
]
