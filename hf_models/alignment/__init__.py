"""Lesson 11: alignment from preferences. DPO written out, on lesson 7's hand loop, proven equal to trl.

    from hf_models.alignment import DPOTrainingLoop, dpo_loss, tokenize_preference_pair
    pairs = dataset.map(tokenize_preference_pair, fn_kwargs={"tokenizer": tokenizer})
    DPOTrainingLoop(policy, reference, pairs, args, pad_token_id=tokenizer.pad_token_id).train()

* ``dpo.py``: the loss (Rafailov et al. 2023), implicit rewards, per-sequence completion log-probs;
* ``preference_batches.py``: pairs -> token ids -> one padded chosen + rejected batch, as trl builds it;
* ``dpo_loop.py``: the DPO objective on ``hf_models.training.loop.TrainingLoop``, and the held-out
  preference accuracy.
"""

from .dpo import DPOLoss, check_dpo_settings, check_same_vocabulary, completion_log_probs, dpo_loss, preference_forward
from .dpo_loop import DPOTrainingLoop, disable_dropout, evaluate_preferences
from .preference_batches import collate_preference_pairs, is_conversational, pair_token_count, tokenize_preference_pair

__all__ = [
    "DPOLoss",
    "DPOTrainingLoop",
    "check_dpo_settings",
    "check_same_vocabulary",
    "collate_preference_pairs",
    "completion_log_probs",
    "disable_dropout",
    "dpo_loss",
    "evaluate_preferences",
    "is_conversational",
    "pair_token_count",
    "preference_forward",
    "tokenize_preference_pair",
]
