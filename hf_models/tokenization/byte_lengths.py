"""How many bytes of the original text each token id stands for -- the bridge to bits per byte.

Cross-entropy per *token* cannot compare a character model with a 4096-token BPE model: a
BPE token carries several characters, so its loss is naturally higher. Dividing the summed
loss (in bits) by the number of UTF-8 *bytes* of text instead gives bits per byte (bpb), a
scale on which any tokenizers of the same text compare. ``token_byte_lengths`` provides the
per-id byte counts, so the evaluator can do ``lengths[target_ids].sum()`` on any batch.

Rules, per id:

* byte-level BPE tokens (``Ġthe``): the GPT-2 byte-level unicode alphabet is mapped back to
  bytes and counted; exact, even for tokens holding only part of a multi-byte UTF-8 character.
* other tokens (the character tokenizer): ``len(token.encode("utf-8"))``.
* special tokens (``<|endoftext|>``, padding, ...): 0 -- they are not text.
* ``<unk>``: 1. The character it replaced is unknown, so its true length is unknowable; one
  byte is the right value for the ASCII text the lessons use and only matters for text
  outside the training alphabet (rare for the char tokenizer, impossible for byte-level BPE).
"""

from __future__ import annotations

import json
from typing import Any

import torch

from .bpe import ByteLevelBPE, unicode_to_bytes

__all__ = ["token_byte_lengths"]

UNK_BYTE_LENGTH = 1


def _is_byte_level(backend: Any) -> bool:
    """True if the ``tokenizers.Tokenizer`` uses GPT-2's byte-level alphabet (ByteLevel pre-tokenizer/decoder)."""
    config = json.loads(backend.to_str())

    def has_byte_level(component: Any) -> bool:
        if isinstance(component, dict):
            if component.get("type") == "ByteLevel":
                return True
            return any(has_byte_level(v) for v in component.values())
        if isinstance(component, list):
            return any(has_byte_level(v) for v in component)
        return False

    return has_byte_level(config.get("pre_tokenizer")) or has_byte_level(config.get("decoder"))


def token_byte_lengths(tokenizer: Any) -> torch.LongTensor:
    """Return a ``LongTensor`` of size ``len(tokenizer)``: UTF-8 bytes of text per token id.

    Args:
        tokenizer: a ``transformers`` fast tokenizer (e.g. from :func:`build_char_tokenizer` or
            :meth:`ByteLevelBPE.to_fast_tokenizer`, or loaded with ``AutoTokenizer``), or a
            :class:`ByteLevelBPE`.

    For any text without special-token strings or unknown characters,
    ``lengths[tokenizer.encode(text)].sum() == len(text.encode("utf-8"))``.
    """
    if isinstance(tokenizer, ByteLevelBPE):
        return torch.tensor([len(tokenizer.token_bytes(i)) for i in range(tokenizer.vocab_size)], dtype=torch.long)

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(
            f"tokenizer must be a transformers fast tokenizer or a ByteLevelBPE, got {type(tokenizer).__name__}"
        )
    byte_level = _is_byte_level(backend)
    u2b = unicode_to_bytes()
    special_ids = set(tokenizer.all_special_ids)
    for token_id, added in tokenizer.added_tokens_decoder.items():
        if added.special:
            special_ids.add(token_id)
    unk_id = tokenizer.unk_token_id
    added_ids = set(tokenizer.added_tokens_decoder)

    n = len(tokenizer)
    lengths = torch.zeros(n, dtype=torch.long)
    for token_id, token in enumerate(tokenizer.convert_ids_to_tokens(list(range(n)))):
        if token is None:  # a hole in the id space: no text maps to it
            continue
        if token_id == unk_id:
            lengths[token_id] = UNK_BYTE_LENGTH
        elif token_id in special_ids:
            lengths[token_id] = 0
        elif byte_level and token_id not in added_ids and all(c in u2b for c in token):
            lengths[token_id] = len(token)  # one byte-level character == one byte
        else:
            # Plain characters, and added (non-special) tokens, which are matched on raw text.
            lengths[token_id] = len(token.encode("utf-8"))
    return lengths
