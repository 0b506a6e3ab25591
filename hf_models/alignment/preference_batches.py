"""Preference pairs -> token ids -> one padded batch, the way trl's ``DPOTrainer`` prepares them.

A pair is a prompt and two completions. In trl's *conversational* format each is a list of
messages (``prompt=[{"role": "user", ...}]``, ``chosen=[{"role": "assistant", ...}]``); the chat
template renders them (the prompt with the generation prompt, that is the opening of the
assistant's turn) and closes the assistant's turn with its end-of-text token. Plain-text pairs get
the tokenizer's EOS appended to each completion instead, so that the model also learns where the
preferred answer *stops*.

The completion starts where the tokenized prompt and the tokenized prompt + completion diverge:
a BPE merge across the boundary, or a template that renders the prompt alone differently, would
otherwise shift the mask by a token.

The batch holds the B chosen sequences, then the B rejected ones (2B rows), right-padded, with a
``completion_mask`` that marks the tokens DPO scores. Sequences longer than ``max_length`` keep
their start (trl's default ``keep_start``): the prompt stays whole and the completion's end is cut.
"""

from __future__ import annotations

import torch
from torch.nn.utils.rnn import pad_sequence
from transformers import PreTrainedTokenizerBase


def is_conversational(example: dict) -> bool:
    """True when the pair's prompt is a list of chat messages rather than a string."""
    return isinstance(example["prompt"], list)


def _common_prefix_length(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def tokenize_preference_pair(example: dict, tokenizer: PreTrainedTokenizerBase) -> dict[str, list[int]]:
    """``{"prompt_ids", "chosen_ids", "rejected_ids"}`` of one pair, as trl 1.16's ``DPOTrainer`` tokenizes it."""
    prompt, chosen, rejected = example["prompt"], example["chosen"], example["rejected"]
    if is_conversational(example):

        def ids(messages: list[dict], **kwargs) -> list[int]:
            return tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kwargs)["input_ids"]

        prompt_ids = ids(prompt, add_generation_prompt=True)
        prompt_chosen_ids, prompt_rejected_ids = ids(prompt + chosen), ids(prompt + rejected)
    else:
        eos = tokenizer.eos_token
        chosen, rejected = (c if c.endswith(eos) else c + eos for c in (chosen, rejected))
        prompt_ids = tokenizer(prompt)["input_ids"]
        prompt_chosen_ids, prompt_rejected_ids = tokenizer(prompt + chosen)["input_ids"], tokenizer(prompt + rejected)["input_ids"]
    start = min(_common_prefix_length(prompt_ids, prompt_chosen_ids), _common_prefix_length(prompt_ids, prompt_rejected_ids))
    return {"prompt_ids": prompt_ids[:start], "chosen_ids": prompt_chosen_ids[start:], "rejected_ids": prompt_rejected_ids[start:]}


def collate_preference_pairs(
    examples: list[dict[str, list[int]]], pad_token_id: int, max_length: int | None = None
) -> dict[str, torch.Tensor]:
    """Tokenized pairs -> ``input_ids``, ``attention_mask``, ``completion_mask``, each (2B, T): chosen rows, then rejected."""
    rows, completion_masks = [], []
    for side in ("chosen_ids", "rejected_ids"):
        for example in examples:
            ids = example["prompt_ids"] + example[side]
            mask = [0] * len(example["prompt_ids"]) + [1] * len(example[side])
            rows.append(torch.tensor(ids[:max_length], dtype=torch.long))
            completion_masks.append(torch.tensor(mask[:max_length], dtype=torch.long))
    return {
        "input_ids": pad_sequence(rows, batch_first=True, padding_value=pad_token_id),
        "attention_mask": pad_sequence([torch.ones_like(r) for r in rows], batch_first=True, padding_value=0),
        "completion_mask": pad_sequence(completion_masks, batch_first=True, padding_value=0),
    }


def pair_token_count(example: dict[str, list[int]]) -> int:
    """Tokens one pair puts through the model: prompt + chosen and prompt + rejected."""
    return 2 * len(example["prompt_ids"]) + len(example["chosen_ids"]) + len(example["rejected_ids"])


__all__ = ["collate_preference_pairs", "is_conversational", "pair_token_count", "tokenize_preference_pair"]
