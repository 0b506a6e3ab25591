"""A character-level tokenizer (lesson 1), expressed with the ``tokenizers`` library.

The simplest possible tokenizer: one token per character, exactly like nanoGPT's
``shakespeare_char`` (``chars = sorted(set(text))``). A bigram model over ~65 characters is
the first lesson's model, and this tokenizer keeps it honest about what "a token" is.

It is built from ``tokenizers`` parts so that it behaves like any other Hugging Face tokenizer
(``save_pretrained``, ``AutoTokenizer.from_pretrained``, batching, padding):

* model: ``models.BPE`` whose vocabulary is the characters and whose merge list is empty.
  With no pre-tokenizer the whole text is one "word"; BPE splits it into characters
  (unicode code points, like Python's ``str``) and, with no merges, stops there. Spaces,
  newlines and tabs are characters like any other, so they survive untouched.
  A character missing from the vocabulary becomes ``<unk>`` (one ``<unk>`` per character).
* decoder: ``decoders.Fuse()`` concatenates the tokens with no separator.

Ids: ``0..n-1`` are the sorted distinct characters of the training text, then ``<unk>``, then
``<|endoftext|>`` (the EOS token, used as the document separator).
"""

from __future__ import annotations

from tokenizers import AddedToken, Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast

__all__ = ["CHAR_EOS_TOKEN", "CHAR_UNK_TOKEN", "build_char_tokenizer"]

CHAR_UNK_TOKEN = "<unk>"
CHAR_EOS_TOKEN = "<|endoftext|>"


def build_char_tokenizer(text: str) -> PreTrainedTokenizerFast:
    """Build a one-token-per-character tokenizer from the characters that occur in ``text``.

    Args:
        text: the training text; its sorted distinct characters become ids ``0..n-1``.

    Returns:
        A ``PreTrainedTokenizerFast`` with ``unk_token="<unk>"`` (id ``n``) and
        ``eos_token="<|endoftext|>"`` (id ``n + 1``). ``decode(encode(s)) == s`` for any ``s``
        made of characters seen in ``text``.
    """
    if not isinstance(text, str):
        raise ValueError(f"text must be a str, got {type(text).__name__}")
    if not text:
        raise ValueError("text must be a non-empty str (its characters define the vocabulary), got ''")
    chars = sorted(set(text))
    vocab = {c: i for i, c in enumerate(chars)}
    # The special tokens live in the model vocab too, so that <unk> has an id the model can emit.
    vocab[CHAR_UNK_TOKEN] = len(chars)
    vocab[CHAR_EOS_TOKEN] = len(chars) + 1

    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=CHAR_UNK_TOKEN, fuse_unk=False))
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in (CHAR_UNK_TOKEN, CHAR_EOS_TOKEN)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token=CHAR_UNK_TOKEN,
        eos_token=CHAR_EOS_TOKEN,
        clean_up_tokenization_spaces=False,  # keep " ." and " 's" exactly as written
    )
