"""Tokenizers of lessons 1 and 2: a character tokenizer and a hand-written byte-level BPE.

Both end up as ``transformers`` fast tokenizers (``save_pretrained`` / ``AutoTokenizer``), and
:func:`token_byte_lengths` maps any of them to bytes-per-token so that models with different
vocabularies can be compared in bits per byte.
"""

from .bpe import GPT2_SPLIT_PATTERN, ByteLevelBPE, bytes_to_unicode, pretokenize, unicode_to_bytes
from .byte_lengths import token_byte_lengths
from .char_tokenizer import CHAR_EOS_TOKEN, CHAR_UNK_TOKEN, build_char_tokenizer
from .model_match import (
    TOKENIZER_IDENTITY,
    check_tokenizer_identity,
    check_tokenizer_matches_model,
    load_tokenizer_for,
    tokenizer_for_saving,
    tokenizer_identity,
)

__all__ = [
    "CHAR_EOS_TOKEN",
    "CHAR_UNK_TOKEN",
    "GPT2_SPLIT_PATTERN",
    "TOKENIZER_IDENTITY",
    "ByteLevelBPE",
    "build_char_tokenizer",
    "bytes_to_unicode",
    "check_tokenizer_identity",
    "check_tokenizer_matches_model",
    "load_tokenizer_for",
    "pretokenize",
    "token_byte_lengths",
    "tokenizer_for_saving",
    "tokenizer_identity",
    "unicode_to_bytes",
]
