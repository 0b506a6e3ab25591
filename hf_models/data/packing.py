"""From text to training blocks: tokenize, join the documents, cut fixed-length blocks.

A causal LM trains on windows of exactly ``block_size`` token ids. :func:`pack_for_causal_lm`
turns every split of a corpus into such blocks, the way ``run_clm.py`` in ``transformers`` does:

1. **Tokenize** each document (one ``map(batched=True)``) without per-document special tokens
   (``add_special_tokens=False``): BOS/EOS decisions are ours, not the tokenizer's post-processor's.
2. **Join the documents with the EOS token** (when the tokenizer has one), ``doc0 EOS doc1 EOS
   doc2``. The model then sees where one play or article ends and the next begins, instead of
   learning that *Hamlet* runs straight on into *Henry V*; at generation time EOS is the
   "stop" signal. A tokenizer without an EOS token joins them directly.
3. **Cut the joined stream into blocks** of exactly ``block_size`` ids (a second
   ``map(batched=True)``). The ragged tail (fewer than ``block_size`` ids) is dropped: padding it
   would waste compute on pad tokens and need an attention mask, and it is less than one block
   of text. Blocks are cut within groups of :data:`GROUP_BATCH_SIZE` documents, so a corpus of
   more documents loses one tail per group (as in ``run_clm.py``); every named corpus of the zoo
   has fewer, so its blocks are exactly the start of :func:`split_token_ids`.

``labels`` is a copy of ``input_ids``: ``transformers`` causal LMs shift the labels by one
inside ``forward``, so position ``t`` is trained to predict id ``t + 1``.

**Caching.** Tokenizing five million characters takes a while, and every run of every lesson
needs it. ``datasets`` caches ``map`` results only for datasets backed by files, and our corpora
are built in memory, so we name the cache files ourselves: under :func:`packed_cache_dir`, keyed
by a hash of the split's ``_fingerprint`` (its content), the tokenizer (its full serialized
vocabulary, merges and normalization) and ``block_size``. A second identical call reads the
Arrow files back (memory-mapped) instead of tokenizing again; change any of the three and the
key changes. Delete the folder to reclaim the space.

Whole-split evaluation uses the same joining: :func:`split_token_ids` returns a split as one
1-D tensor of ids, and :func:`split_num_bytes` the UTF-8 bytes of its text, the denominator of
bits per byte.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from itertools import chain
from pathlib import Path
from typing import Any

import datasets
import torch

from ..files import cache_dir as zoo_cache_dir

__all__ = [
    "GROUP_BATCH_SIZE",
    "pack_for_causal_lm",
    "packed_cache_dir",
    "split_num_bytes",
    "split_token_ids",
    "tokenizer_fingerprint",
]

logger = logging.getLogger(__name__)

GROUP_BATCH_SIZE = 1000
"""Documents per ``map`` batch when cutting blocks; one ragged tail is dropped per batch."""

_CACHE_FORMAT = "hf_models-packing-v2"  # bump when the packing logic changes, to orphan old caches

# Declared rather than inferred, so that an empty split still has the right columns. int64
# because that is what embeddings and cross-entropy take (no cast in the training loop).
_TOKENS_FEATURES = datasets.Features({"input_ids": datasets.List(datasets.Value("int64"))})
_BLOCKS_FEATURES = datasets.Features(
    {"input_ids": datasets.List(datasets.Value("int64")), "labels": datasets.List(datasets.Value("int64"))}
)


def packed_cache_dir() -> Path:
    """Where packed splits are cached: ``$HF_MODELS_CACHE/packed``, default ``~/.cache/hf_models/packed``."""
    return zoo_cache_dir("packed")


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of everything that decides how ``tokenizer`` turns text into ids.

    For a fast tokenizer that is its serialized ``tokenizers`` pipeline (normalizer,
    pre-tokenizer, model with vocabulary and merges, added tokens); otherwise its class and
    vocabulary. The EOS id is included because it is the document separator.
    """
    hasher = hashlib.sha256()
    hasher.update(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "to_str"):
        hasher.update(backend.to_str().encode())
    else:
        hasher.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    hasher.update(repr(getattr(tokenizer, "eos_token_id", None)).encode())
    return hasher.hexdigest()


def _check_block_size(block_size: Any) -> None:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"block_size must be a positive int (the tokens per training block), got {block_size!r}.")


def _check_text_split(split: Any, name: str = "split") -> None:
    if not isinstance(split, datasets.Dataset):
        raise TypeError(f"{name} must be a datasets.Dataset, got {type(split).__name__}.")
    if "text" not in split.column_names:
        raise ValueError(f"{name} has no 'text' column (columns: {split.column_names}); load it with load_corpus.")


def _tokenize_batch(batch: dict[str, list], indices: list[int], tokenizer: Any) -> dict[str, list[list[int]]]:
    """Token ids of each document, with the EOS separator in front of every document but the first.

    Putting the separator *in front* (rather than after each document) makes the joined stream
    exactly ``doc0 EOS doc1 EOS ... docN``: separators between documents, none at the end.
    """
    encoded = tokenizer(
        batch["text"],
        add_special_tokens=False,  # no per-document BOS/EOS from the tokenizer's post-processor
        return_attention_mask=False,
        verbose=False,  # a play is far longer than model_max_length; that is fine here
    )["input_ids"]
    eos = tokenizer.eos_token_id
    if eos is None:
        return {"input_ids": encoded}
    return {"input_ids": [ids if index == 0 else [eos, *ids] for ids, index in zip(encoded, indices)]}


def _group_batch(batch: dict[str, list[list[int]]], block_size: int) -> dict[str, list[list[int]]]:
    """Concatenate a batch of tokenized documents and cut it into ``block_size`` blocks (tail dropped)."""
    stream = list(chain.from_iterable(batch["input_ids"]))
    usable = len(stream) // block_size * block_size
    blocks = [stream[start : start + block_size] for start in range(0, usable, block_size)]
    return {"input_ids": blocks, "labels": [list(block) for block in blocks]}


def _cache_key(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:32]


def _tokenize_split(
    split: datasets.Dataset, tokenizer: Any, cache_dir: Path, num_proc: int | None, tokenizer_hash: str
) -> tuple[datasets.Dataset, str]:
    """Map :func:`_tokenize_batch` over ``split``, cached; returns the result and its cache key."""
    key = _cache_key(_CACHE_FORMAT, "tokens", split._fingerprint, tokenizer_hash)
    tokenized = split.map(
        _tokenize_batch,
        batched=True,
        with_indices=True,
        fn_kwargs={"tokenizer": tokenizer},
        remove_columns=split.column_names,
        features=_TOKENS_FEATURES,
        num_proc=num_proc,
        new_fingerprint=key,  # we know the inputs; spares datasets from hashing the tokenizer
        cache_file_name=str(cache_dir / f"{key}-tokens.arrow"),
        load_from_cache_file=True,
        desc="Tokenizing",
    )
    return tokenized, key


def pack_for_causal_lm(
    dataset: datasets.DatasetDict,
    tokenizer: Any,
    block_size: int,
    *,
    num_proc: int | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> datasets.DatasetDict:
    """Tokenize every split and cut it into blocks of exactly ``block_size`` ids.

    Args:
        dataset: splits with a ``text`` column (from :func:`hf_models.data.load_corpus`).
        tokenizer: a ``transformers`` tokenizer; its ``eos_token_id`` (if any) separates documents.
        block_size: ids per block, the model's training context length.
        num_proc: processes for tokenizing (cutting blocks always runs in one, so the blocks do
            not depend on it).
        cache_dir: the cache folder; default :func:`packed_cache_dir`.

    Returns:
        A ``DatasetDict`` with the same splits and the columns ``input_ids`` and ``labels``
        (equal), each row a list of ``block_size`` ids. A split shorter than one block comes out
        empty (with a warning).
    """
    _check_block_size(block_size)
    if not isinstance(dataset, datasets.DatasetDict):
        raise TypeError(
            f"dataset must be a datasets.DatasetDict, got {type(dataset).__name__}; wrap a single split as "
            f"DatasetDict({{'train': split}})."
        )
    cache_path = Path(cache_dir).expanduser() if cache_dir is not None else packed_cache_dir()
    cache_path.mkdir(parents=True, exist_ok=True)
    tokenizer_hash = tokenizer_fingerprint(tokenizer)

    packed = {}
    for name, split in dataset.items():
        _check_text_split(split, f"dataset[{name!r}]")
        if len(split) == 0:  # `map` hands an empty split back untouched, without our columns
            packed[name] = datasets.Dataset.from_dict({"input_ids": [], "labels": []}, features=_BLOCKS_FEATURES)
        else:
            tokenized, tokens_key = _tokenize_split(split, tokenizer, cache_path, num_proc, tokenizer_hash)
            key = _cache_key(_CACHE_FORMAT, "blocks", tokens_key, str(block_size), str(GROUP_BATCH_SIZE))
            packed[name] = tokenized.map(
                _group_batch,
                batched=True,
                batch_size=GROUP_BATCH_SIZE,
                fn_kwargs={"block_size": block_size},
                remove_columns=tokenized.column_names,
                features=_BLOCKS_FEATURES,
                new_fingerprint=key,
                cache_file_name=str(cache_path / f"{key}-blocks{block_size}.arrow"),
                load_from_cache_file=True,
                desc=f"Packing {name} into blocks of {block_size}",
            )
        if len(packed[name]) == 0:
            logger.warning(
                "split %r holds fewer than block_size=%d tokens: it packs into no block at all.", name, block_size
            )
    return datasets.DatasetDict(packed)


def split_token_ids(split: datasets.Dataset, tokenizer: Any) -> torch.LongTensor:
    """The whole split as one 1-D ``LongTensor`` of ids, documents joined exactly as in packing.

    This is what whole-split evaluation walks over: no tail is dropped and no block boundary
    interrupts the context, so every token of held-out text is scored.
    """
    _check_text_split(split)
    if len(split) == 0:
        return torch.empty(0, dtype=torch.long)
    ids = _tokenize_batch({"text": list(split["text"])}, list(range(len(split))), tokenizer)["input_ids"]
    return torch.tensor(list(chain.from_iterable(ids)), dtype=torch.long)


def split_num_bytes(split: datasets.Dataset) -> int:
    """UTF-8 bytes of the split's text: the denominator of bits per byte.

    What is counted: the bytes of every document's ``text``, nothing else. The document
    separators add none: packing joins documents with the EOS *special token* (or with nothing
    when the tokenizer has no EOS), and a special token stands for no text, which is also how
    ``hf_models.tokenization.token_byte_lengths`` counts it (0 bytes). So, for text the
    tokenizer covers, ``token_byte_lengths(tok)[split_token_ids(split, tok)].sum() ==
    split_num_bytes(split)``.
    """
    _check_text_split(split)
    return sum(len(text.encode("utf-8")) for text in split["text"])
