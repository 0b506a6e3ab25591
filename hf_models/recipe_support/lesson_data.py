"""What a lesson trains on: the corpus, its tokenizer and the training examples.

``prepare_lesson_data`` runs the data half of every recipe, corpus -> tokenizer -> examples, and
hands back a :class:`LessonData`. A lesson that continues training a pretrained model passes that
model's own tokenizer instead (``tokenizer=``): its weights only mean something on its own token ids,
so the corpus is tokenized with it and no tokenizer is built. Lessons 2-5 train the hand-written byte-level BPE of lesson 2 on
the training split; training it takes a minute on the Shakespeare corpus, so the result is cached
under ``hf_models.files.cache_dir`` keyed by a hash of the text and the vocabulary size, and every
later run on the same text reuses it.

Under several processes every rank runs this too, and the tokenizer and the packed blocks are
written to a cache. So the main process of each machine prepares the data first, and the others
wait, then read what it cached (``TrainingArguments.main_process_first``): nothing is trained or
tokenized twice, and no two processes write the same cache file at once.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass

import torch
from datasets import Dataset, DatasetDict
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast, TrainingArguments

from ..data import RandomWindows, load_corpus, pack_for_causal_lm, split_token_ids
from ..files import cache_dir, save_folder_atomically
from ..tokenization import ByteLevelBPE, build_char_tokenizer, token_byte_lengths
from .arguments import DataArguments, global_batch_size
from .validation import check_max_steps, check_sample_prompt_fits


def load_lesson_corpus(data_args: DataArguments) -> DatasetDict:
    """The corpus named by ``--dataset`` (and ``--data_files`` / ``--dataset_path``)."""
    return load_corpus(
        data_args.dataset,
        data_files=data_args.data_files,
        dataset_path=data_args.dataset_path,
        text_column=data_args.text_column,
        validation_fraction=data_args.validation_fraction,
    )


def bpe_tokenizer_for(train_texts: list[str], vocab_size: int, retrain: bool = False) -> tuple[PreTrainedTokenizerFast, float]:
    """Train the hand-written byte-level BPE on ``train_texts`` (or reuse a cached run on the same text).

    Returns the exported fast tokenizer and the training time in seconds (0 when cached).
    """
    digest = hashlib.sha256("\x00".join(train_texts).encode()).hexdigest()[:16]
    folder = cache_dir("tokenizers", f"bpe-{vocab_size}-{digest}")
    if folder.exists() and not retrain:
        return AutoTokenizer.from_pretrained(folder), 0.0
    start = time.perf_counter()
    tokenizer = ByteLevelBPE.train(train_texts, vocab_size=vocab_size).to_fast_tokenizer()
    seconds = time.perf_counter() - start
    save_folder_atomically(folder, tokenizer.save_pretrained)
    return tokenizer, seconds


@dataclass
class LessonData:
    """What a lesson trains and evaluates on."""

    corpus: DatasetDict
    tokenizer: PreTrainedTokenizerFast
    tokenizer_description: str
    train_dataset: Dataset | RandomWindows
    eval_dataset: Dataset
    byte_lengths: torch.LongTensor
    tokenizer_seconds: float = 0.0


def prepare_lesson_data(
    data_args: DataArguments,
    training_args: TrainingArguments,
    tokenizer_kind: str,
    vocab_size: int = 2048,
    sampling: str = "blocks",
    retrain_tokenizer: bool = False,
    sample_prompt: str = "",
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> LessonData:
    """Corpus -> tokenizer -> training examples.

    Args:
        tokenizer_kind: "char", "bpe" (the hand-written BPE of lesson 2, trained on the training split
            and cached), or "auto": characters for ``--dataset text`` (nanoGPT's shakespeare_char
            set-up), BPE otherwise.
        sampling: "blocks" (packed, fixed boundaries) or "random_windows" (nanoGPT's sampling, with
            ``training_args.max_steps`` x the global batch windows).
        retrain_tokenizer: train the BPE even when a cached one exists (lesson 2 times it).
        sample_prompt: for a model whose context is ``--block_size``, the ``--sample_prompt`` to check
            fits in it with room to generate (the sample is drawn after training and saving).
        tokenizer: an existing tokenizer (a pretrained model's own) to tokenize the corpus with; then
            none is built, and ``tokenizer_kind`` and ``vocab_size`` are not read.
    """
    if sampling not in ("blocks", "random_windows"):
        raise ValueError(f"sampling (--sampling) must be one of ['blocks', 'random_windows'], got {sampling!r}.")
    if tokenizer_kind not in ("auto", "char", "bpe"):
        raise ValueError(f"tokenizer_kind (--tokenizer) must be one of ['auto', 'char', 'bpe'], got {tokenizer_kind!r}.")
    check_max_steps(training_args.max_steps, sampling, training_args.num_train_epochs)
    with training_args.main_process_first(desc="preparing the lesson's data"):
        # The other processes read what the main one just cached, even for lesson 2's timed retraining.
        retrain_tokenizer = retrain_tokenizer and training_args.local_process_index == 0
        data = _prepare_lesson_data(data_args, training_args, tokenizer_kind, vocab_size, sampling, retrain_tokenizer, tokenizer)
    check_sample_prompt_fits(data.tokenizer, sample_prompt, data_args.block_size)
    return data


def _prepare_lesson_data(
    data_args: DataArguments,
    training_args: TrainingArguments,
    tokenizer_kind: str,
    vocab_size: int,
    sampling: str,
    retrain_tokenizer: bool,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> LessonData:
    corpus = load_lesson_corpus(data_args)
    if tokenizer_kind == "auto":
        tokenizer_kind = "char" if data_args.dataset == "text" else "bpe"
    seconds = 0.0
    if tokenizer is not None:
        description = f"the pretrained model's own, {len(tokenizer)} tokens ({type(tokenizer).__name__})"
    elif tokenizer_kind == "char":
        tokenizer = build_char_tokenizer("".join(corpus["train"]["text"]))
        description = f"character level, {len(tokenizer)} tokens"
    else:
        tokenizer, seconds = bpe_tokenizer_for(list(corpus["train"]["text"]), vocab_size, retrain_tokenizer)
        description = f"byte-level BPE, {len(tokenizer)} tokens (hf_models.tokenization.bpe)"
    packed = pack_for_causal_lm(corpus, tokenizer, data_args.block_size)  # rows of block_size ids
    if sampling == "random_windows":
        windows = training_args.max_steps * global_batch_size(training_args)
        train = RandomWindows(split_token_ids(corpus["train"], tokenizer), data_args.block_size, windows, training_args.seed)
    else:
        train = packed["train"]
    return LessonData(corpus, tokenizer, description, train, packed["validation"], token_byte_lengths(tokenizer), seconds)
