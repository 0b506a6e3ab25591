"""Held-out evaluation of a chat-tuned model: loss on the answers alone, and the answers it generates.

Fine-tuning on instructions trains on the assistant's tokens only (the prompt is given, not
predicted), so the held-out number that matches the objective is the **response loss**: the
mean cross-entropy over answer tokens, prompt tokens masked out. What a user sees, though, is
the generated answer, so :func:`generate_answers` produces it greedily from the chat template's
generation prompt and the task's own score (``hf_models.data.score_next_lines``) judges it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from transformers import PreTrainedTokenizerBase

__all__ = ["generate_answers", "response_loss", "tokenize_conversation"]


def tokenize_conversation(example: dict, tokenizer: PreTrainedTokenizerBase, max_length: int) -> dict[str, list[int]]:
    """``input_ids`` of a ``messages`` row through the chat template, ``labels`` = ids on answer tokens, -100 elsewhere.

    The answer tokens are the ones the template marks with ``{% generation %}``, the same mask trl's
    ``assistant_only_loss`` uses. Rows are cut at ``max_length`` tokens.
    """
    encoded = tokenizer.apply_chat_template(example["messages"], return_dict=True, return_assistant_tokens_mask=True)
    ids = encoded["input_ids"][:max_length]
    mask = encoded["assistant_masks"][:max_length]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": [t if m else -100 for t, m in zip(ids, mask)]}


@torch.no_grad()
def response_loss(model: torch.nn.Module, rows: Sequence[dict], pad_token_id: int, batch_size: int = 32) -> dict[str, float]:
    """Mean cross-entropy (nats) and perplexity over the answer tokens of tokenized ``rows`` (see :func:`tokenize_conversation`)."""
    model.eval()
    total, count = 0.0, 0
    device = next(model.parameters()).device
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        width = max(len(r["input_ids"]) for r in chunk)
        ids = torch.full((len(chunk), width), pad_token_id, dtype=torch.long)
        labels = torch.full((len(chunk), width), -100, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, row in enumerate(chunk):  # right padding: positions of the real tokens stay 0..n-1
            n = len(row["input_ids"])
            ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(row["input_ids"]), torch.tensor(row["labels"]), 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
        targets = labels[:, 1:].to(device)  # position t predicts token t + 1
        total += F.cross_entropy(logits[:, :-1].transpose(1, 2), targets, ignore_index=-100, reduction="sum").item()
        count += int((targets != -100).sum())
    loss = total / count
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": count}


@torch.no_grad()
def generate_answers(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[list[dict]], max_new_tokens: int = 40, batch_size: int = 32
) -> list[str]:
    """Greedy answers to chat ``prompts`` (lists of messages), decoded without special tokens.

    Prompts are rendered with the generation prompt and left-padded (so every row's next token
    follows its own last prompt token); generation stops at the end-of-text token.
    """
    model.eval()
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    answers = []
    try:
        for start in range(0, len(prompts), batch_size):
            texts = [tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False) for p in prompts[start : start + batch_size]]
            batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.eos_token_id)
            answers += tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = padding_side
    return answers
