"""Random training windows over a token stream, nanoGPT's way of sampling a small corpus.

Packing (``packing.py``) cuts the text into fixed blocks, so every epoch shows the model the same
block boundaries. nanoGPT instead draws each training example at a random offset ``i``:
``x = ids[i : i+T]`` and ``y = ids[i+1 : i+T+1]``, so every window position is a prediction target
and the boundaries move every time. On a 1 MB corpus trained for ~1.5 epochs, that difference is
measurable, and it is what nanoGPT's published numbers use.

Each example carries ``shift_labels`` (``y``, already shifted): transformers' causal LM loss and
``Trainer``'s token counting use them as given, so all ``T`` positions are trained, where plain
``labels`` would train ``T - 1``.
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset


class RandomWindows(Dataset):
    """``num_samples`` windows of ``block_size`` tokens at random offsets (fixed by ``seed``).

    Args:
        token_ids: the training split as one 1-D tensor (``split_token_ids``).
        block_size: tokens per window, the model's context.
        num_samples: examples in the dataset (e.g. steps x batch size).
        seed: the offsets are drawn once, so the dataset is deterministic and indexable.
    """

    def __init__(self, token_ids: torch.LongTensor, block_size: int, num_samples: int, seed: int = 0):
        if token_ids.dim() != 1 or token_ids.numel() <= block_size:
            raise ValueError(f"token_ids must be 1-D and longer than block_size={block_size}, got shape {tuple(token_ids.shape)}.")
        if not isinstance(num_samples, int) or num_samples <= 0:
            raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}.")
        self.token_ids = token_ids
        self.block_size = block_size
        generator = torch.Generator().manual_seed(seed)
        self.offsets = torch.randint(0, token_ids.numel() - block_size, (num_samples,), generator=generator)

    def __len__(self) -> int:
        return self.offsets.numel()

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        start = int(self.offsets[index])
        window = self.token_ids[start : start + self.block_size + 1]  # T + 1 tokens
        inputs = window[:-1]
        return {"input_ids": inputs, "labels": inputs, "shift_labels": window[1:]}
