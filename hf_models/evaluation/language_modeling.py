"""How the zoo measures a language model on held-out text.

Two places need the same numbers, so both go through the one ``bits_per_byte`` metric module:

* :func:`evaluate_token_stream` is the held-out measure every recipe reports. It walks the whole
  split in non-overlapping windows of the model's context, ``x = ids[i : i+T]`` and
  ``y = ids[i+1 : i+T+1]``, so each token after the first is predicted exactly once (the last
  window is shorter). This is the measure nanoGPT's published numbers use, which makes the GPT
  lesson comparable with them.
  :func:`evaluate_splits` applies it to each held-out split of a corpus.
* :func:`trainer_metric_functions` plugs the same metric into ``Trainer``'s periodic evaluation
  on packed blocks (where the first token of each block has no prediction, so the numbers run a
  little higher than the whole-split measure).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import evaluate
import numpy as np
import torch
import torch.nn.functional as F
from datasets import DatasetDict
from transformers import EvalPrediction, PreTrainedTokenizerBase

from ..data import split_token_ids

BITS_PER_BYTE_METRIC = str(Path(__file__).with_name("bits_per_byte"))


def load_bits_per_byte_metric() -> evaluate.EvaluationModule:
    """The local ``evaluate`` module (no Hub download)."""
    return evaluate.load(BITS_PER_BYTE_METRIC)


@torch.no_grad()
def evaluate_token_stream(
    model: torch.nn.Module,
    token_ids: torch.LongTensor,
    byte_lengths: torch.LongTensor,
    context_length: int,
    batch_size: int = 16,
    max_tokens: int | None = None,
) -> dict[str, float]:
    """Loss, perplexity and bits per byte of ``model`` on a whole token stream.

    Args:
        token_ids: the split as one 1-D tensor of ids (``hf_models.data.split_token_ids``).
        byte_lengths: (vocab,) UTF-8 bytes each token id stands for
            (``hf_models.tokenization.token_byte_lengths``).
        context_length: window length; the model's training context.
        max_tokens: evaluate only the first ``max_tokens`` ids (for quick checks).
    """
    if token_ids.dim() != 1 or token_ids.numel() < 2:
        raise ValueError(f"token_ids must be a 1-D tensor of at least 2 ids, got shape {tuple(token_ids.shape)}.")
    if max_tokens is not None:
        token_ids = token_ids[:max_tokens]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    metric = load_bits_per_byte_metric()
    byte_lengths = byte_lengths.to(device)

    def score(x: torch.Tensor, y: torch.Tensor) -> None:
        x, y = x.to(device), y.to(device)
        logits = model(input_ids=x, use_cache=False).logits.float()  # (B, T, V)
        nll = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view_as(y)  # (B, T)
        metric.add_batch(
            nll=nll.sum(dim=1).tolist(),
            num_tokens=[y.shape[1]] * y.shape[0],
            num_bytes=byte_lengths[y].sum(dim=1).tolist(),
        )

    n_full = (token_ids.numel() - 1) // context_length
    inputs = token_ids[: n_full * context_length].view(n_full, context_length)  # (windows, T)
    targets = token_ids[1 : n_full * context_length + 1].view(n_full, context_length)
    for start in range(0, n_full, batch_size):
        score(inputs[start : start + batch_size], targets[start : start + batch_size])
    tail = n_full * context_length
    if tail < token_ids.numel() - 1:  # the last, shorter window
        score(token_ids[tail:-1].unsqueeze(0), token_ids[tail + 1 :].unsqueeze(0))
    model.train(was_training)
    return metric.compute()


def evaluate_splits(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    corpus: DatasetDict,
    byte_lengths: torch.LongTensor,
    context_length: int,
    max_tokens: int | None = None,
    splits: tuple[str, ...] = ("validation", "test"),
) -> dict[str, dict[str, float]]:
    """:func:`evaluate_token_stream` on each of ``splits`` that ``corpus`` has, keyed by split name.

    Each split's documents are tokenized and joined into one stream exactly as packing joins them
    (``split_token_ids``), so a split is measured as one long text, not document by document.
    """
    return {
        split: evaluate_token_stream(
            model, split_token_ids(corpus[split], tokenizer), byte_lengths, context_length, max_tokens=max_tokens
        )
        for split in splits
        if split in corpus
    }


def trainer_metric_functions(
    byte_lengths: torch.LongTensor,
) -> tuple[Callable[[torch.Tensor, torch.Tensor], torch.Tensor], Callable[[object], dict[str, float]]]:
    """``(preprocess_logits_for_metrics, compute_metrics)`` for ``Trainer``.

    Logits (B, T, V) are reduced to per-sequence ``[nll_sum, num_tokens]`` on the fly, so that
    evaluation never accumulates a (examples, T, V) array in memory.
    """
    table = byte_lengths.cpu().numpy()
    metric = load_bits_per_byte_metric()

    def preprocess_logits_for_metrics(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if isinstance(logits, tuple):
            logits = logits[0]
        logits, targets = logits[:, :-1].float(), labels[:, 1:]  # predict token t+1 from position t
        nll = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="none")
        nll = nll.view_as(targets).sum(dim=1)
        return torch.stack([nll, (targets != -100).sum(dim=1).to(nll.dtype)], dim=-1)  # (B, 2)

    def compute_metrics(eval_prediction) -> dict[str, float]:
        sums, labels = eval_prediction.predictions, eval_prediction.label_ids
        targets = labels[:, 1:]
        num_bytes = np.where(targets == -100, 0, table[np.clip(targets, 0, None)]).sum(axis=1)
        result = metric.compute(nll=sums[:, 0].tolist(), num_tokens=sums[:, 1].astype(np.int64).tolist(), num_bytes=num_bytes.tolist())
        return {"bits_per_byte": result["bits_per_byte"], "perplexity": result["perplexity"]}

    return preprocess_logits_for_metrics, compute_metrics


@torch.no_grad()
def evaluate_blocks(model: torch.nn.Module, blocks, byte_lengths: torch.LongTensor, batch_size: int = 16) -> dict[str, float]:
    """Loss, perplexity and bits per byte on packed blocks (rows of ``input_ids``/``labels``).

    The same numbers ``Trainer``'s periodic evaluation reports through :func:`trainer_metric_functions`
    (each block's first token has no prediction), for loops that are not ``Trainer``.
    """
    preprocess, compute = trainer_metric_functions(byte_lengths)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    sums, labels = [], []
    for start in range(0, len(blocks), batch_size):
        rows = [blocks[i] for i in range(start, min(start + batch_size, len(blocks)))]
        input_ids = torch.as_tensor([row["input_ids"] for row in rows], device=device)  # (B, T)
        targets = torch.as_tensor([row["labels"] for row in rows], device=device)
        sums.append(preprocess(model(input_ids=input_ids, use_cache=False).logits, targets).cpu())
        labels.append(targets.cpu())
    model.train(was_training)
    result = compute(EvalPrediction(predictions=torch.cat(sums).numpy(), label_ids=torch.cat(labels).numpy()))
    return {"loss": math.log(result["perplexity"]), **result}
