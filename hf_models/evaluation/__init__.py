"""Held-out evaluation shared by every lesson: loss, perplexity and bits per byte.

Also lesson 10's monitor of a mixture of experts in training, ``expert_load.py`` (the share of
routing slots each expert receives); import it from there: it is not re-exported, so that the
evaluation of dense models does not load the MoE blocks.
"""

from .language_modeling import (
    BITS_PER_BYTE_METRIC,
    evaluate_blocks,
    evaluate_splits,
    evaluate_token_stream,
    load_bits_per_byte_metric,
    trainer_metric_functions,
)
from .responses import generate_answers, response_loss, tokenize_conversation

__all__ = [
    "BITS_PER_BYTE_METRIC",
    "evaluate_blocks",
    "evaluate_splits",
    "evaluate_token_stream",
    "generate_answers",
    "load_bits_per_byte_metric",
    "response_loss",
    "tokenize_conversation",
    "trainer_metric_functions",
]
