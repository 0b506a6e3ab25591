"""A tokenizer next to its model: does it fit, the copy that is saved with it, and the record that pairs them.

A model's ids mean nothing without the tokenizer it was trained with, and a wrong pairing does not
fail: a smaller tokenizer's ids all have embeddings, they just stand for other strings, so the
model answers with fluent-looking garbage. So when a model is saved with its tokenizer, the model's
config records which tokenizer that was (:func:`tokenizer_identity`: vocabulary size and a hash of
the vocabulary), and :func:`load_tokenizer_for` refuses a tokenizer that does not match the record.
Training-side: saved models never import this module; the record is a plain config attribute.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from pathlib import Path

from torch import nn

TOKENIZER_IDENTITY = "tokenizer_identity"
"""The config attribute (``config.json`` key) holding the saved tokenizer's ``{"vocab_size", "vocab_sha256"}``."""

# Written by from_pretrained into init_kwargs and echoed by save_pretrained: true only on the machine that loaded it.
_LOAD_TIME_KWARGS = ("is_local", "local_files_only", "_commit_hash")


def check_tokenizer_matches_model(tokenizer, model: nn.Module) -> None:
    """Raise when a tokenizer can produce ids the model has no embedding for."""
    vocab_size = model.config.vocab_size
    if len(tokenizer) > vocab_size:
        raise ValueError(
            f"The tokenizer has {len(tokenizer)} tokens but the model's config.vocab_size is {vocab_size}: "
            f"ids >= {vocab_size} would have no embedding. Use the tokenizer the model was trained with, "
            f"or build the model with vocab_size=len(tokenizer)."
        )


def tokenizer_identity(tokenizer) -> dict:
    """``{"vocab_size": len(tokenizer), "vocab_sha256": ...}``: the hash of every (token, id) pair, special tokens included."""
    vocab = json.dumps(sorted(tokenizer.get_vocab().items(), key=lambda item: item[1]), ensure_ascii=False)
    return {"vocab_size": len(tokenizer), "vocab_sha256": hashlib.sha256(vocab.encode("utf-8")).hexdigest()[:16]}


def tokenizer_for_saving(tokenizer, model: nn.Module):
    """The copy of ``tokenizer`` saved next to ``model``, and the record of it in ``model.config``.

    * ``model_max_length`` is the model's context: a freshly built tokenizer says ``1e30`` ("no
      limit"), so ``pipeline`` and ``tokenizer(..., truncation=True)`` would feed a saved model
      sequences longer than it accepts.
    * A pad token (the EOS token, as GPT-2 and Llama do) and left padding: batched generation
      (``pipeline(..., batch_size=8)``) pads prompts, and a decoder continues from the last position,
      so the padding must go on the left.
    * No load-time keys (``is_local``, ``local_files_only``): a tokenizer loaded from a cache folder
      would otherwise write them into the folder a user downloads.
    * ``model.config.tokenizer_identity`` records the tokenizer (:func:`tokenizer_identity`), so a
      loader can refuse a different one (:func:`load_tokenizer_for`).

    The caller's tokenizer is left as it was.
    """
    saved = copy.deepcopy(tokenizer)
    saved.model_max_length = model.config.max_position_embeddings
    if saved.pad_token is None:
        saved.pad_token = saved.eos_token
    saved.padding_side = saved.init_kwargs["padding_side"] = "left"  # init_kwargs: what save_pretrained writes
    for key in _LOAD_TIME_KWARGS:
        saved.init_kwargs.pop(key, None)
    setattr(model.config, TOKENIZER_IDENTITY, tokenizer_identity(saved))
    return saved


def check_tokenizer_identity(tokenizer, config, tokenizer_folder: str | os.PathLike, model_folder: str | os.PathLike) -> None:
    """Raise when ``config`` records a tokenizer (``tokenizer_identity``) other than ``tokenizer``.

    A config without the record (a folder saved before it existed) is only checked for ids beyond
    its embedding table, as before.
    """
    recorded = getattr(config, TOKENIZER_IDENTITY, None) if not isinstance(config, dict) else config.get(TOKENIZER_IDENTITY)
    vocab_size = config["vocab_size"] if isinstance(config, dict) else config.vocab_size
    found = tokenizer_identity(tokenizer)
    if recorded is None:
        if found["vocab_size"] > vocab_size:
            raise ValueError(f"The tokenizer of {tokenizer_folder} has {found['vocab_size']} tokens but the model in "
                             f"{model_folder} has vocab_size {vocab_size}: ids >= {vocab_size} have no embedding.")
        return
    if found != recorded:
        raise ValueError(
            f"The tokenizer of {tokenizer_folder} ({found['vocab_size']} tokens, vocabulary sha256 {found['vocab_sha256']}) "
            f"is not the one the model in {model_folder} was saved with ({recorded['vocab_size']} tokens, vocabulary "
            f"sha256 {recorded['vocab_sha256']}): its ids would mean other strings. Load the tokenizer saved with the model."
        )


def load_tokenizer_for(model_folder: str | os.PathLike, tokenizer_folder: str | os.PathLike | None = None):
    """``AutoTokenizer.from_pretrained(tokenizer_folder or model_folder)``, refused if it is not the model's tokenizer."""
    from transformers import AutoTokenizer

    model_folder = Path(model_folder)
    tokenizer_folder = Path(tokenizer_folder) if tokenizer_folder is not None else model_folder
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)
    config = json.loads((model_folder / "config.json").read_text())
    check_tokenizer_identity(tokenizer, config, tokenizer_folder, model_folder)
    return tokenizer
