"""The steps every lesson recipe shares, so that a recipe reads as its lesson and nothing else.

A recipe goes top to bottom: data -> tokenizer -> model -> :func:`build_trainer` + train ->
:func:`evaluate_splits` -> :func:`finish_lesson` (save the folder atomically with its model card,
write ``results.json``, read a sample back through ``pipeline`` from the saved folder, push to the
Hub when asked).
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from datasets import Dataset, DatasetDict
from huggingface_hub import HfApi
from transformers import (
    AutoTokenizer,
    HfArgumentParser,
    PreTrainedTokenizerFast,
    Trainer,
    TrainingArguments,
    default_data_collator,
    pipeline,
    set_seed,
)

from ..data import RandomWindows, load_corpus, pack_for_causal_lm, split_token_ids
from ..files import cache_dir, save_folder_atomically, write_json_atomically
from ..evaluation import evaluate_token_stream, trainer_metric_functions
from ..tokenization import check_tokenizer_matches_model, ByteLevelBPE, build_char_tokenizer, token_byte_lengths
from .arguments import DataArguments, LessonArguments
from .model_card import build_model_card
from .throughput import ThroughputCallback

def parse_lesson_args(model_arguments_type: type, defaults: dict, args: list[str] | None = None):
    """Parse ``(model args, DataArguments, LessonArguments, TrainingArguments)`` with the recipe's defaults."""
    parser = HfArgumentParser((model_arguments_type, DataArguments, LessonArguments, TrainingArguments))
    parser.set_defaults(
        report_to="none", save_strategy="no", eval_strategy="steps", logging_first_step=True,
        dataloader_pin_memory=torch.cuda.is_available(), **defaults,
    )
    model_args, data_args, lesson_args, training_args = parser.parse_args_into_dataclasses(args=args)
    lesson_args.push_to_hub, training_args.push_to_hub = training_args.push_to_hub, False
    set_seed(training_args.seed)
    return model_args, data_args, lesson_args, training_args


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
) -> LessonData:
    """Corpus -> tokenizer -> training examples.

    Args:
        tokenizer_kind: "char", "bpe" (the hand-written BPE of lesson 2, trained on the training split
            and cached), or "auto": characters for ``--dataset text`` (nanoGPT's shakespeare_char
            set-up), BPE otherwise.
        sampling: "blocks" (packed, fixed boundaries) or "random_windows" (nanoGPT's sampling, with
            ``training_args.max_steps`` x the global batch windows).
        retrain_tokenizer: train the BPE even when a cached one exists (lesson 2 times it).
    """
    corpus = load_lesson_corpus(data_args)
    if tokenizer_kind == "auto":
        tokenizer_kind = "char" if data_args.dataset == "text" else "bpe"
    seconds = 0.0
    if tokenizer_kind == "char":
        tokenizer = build_char_tokenizer("".join(corpus["train"]["text"]))
        description = f"character level, {len(tokenizer)} tokens"
    elif tokenizer_kind == "bpe":
        tokenizer, seconds = bpe_tokenizer_for(list(corpus["train"]["text"]), vocab_size, retrain_tokenizer)
        description = f"byte-level BPE, {len(tokenizer)} tokens (hf_models.tokenization.bpe)"
    else:
        raise ValueError(f"tokenizer must be one of ['auto', 'char', 'bpe'], got {tokenizer_kind!r}.")
    packed = pack_for_causal_lm(corpus, tokenizer, data_args.block_size)  # rows of block_size ids
    if sampling == "random_windows":
        global_batch = training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps * training_args.world_size
        train = RandomWindows(split_token_ids(corpus["train"], tokenizer), data_args.block_size, training_args.max_steps * global_batch, training_args.seed)
    elif sampling == "blocks":
        train = packed["train"]
    else:
        raise ValueError(f"sampling must be one of ['blocks', 'random_windows'], got {sampling!r}.")
    return LessonData(corpus, tokenizer, description, train, packed["validation"], token_byte_lengths(tokenizer), seconds)


# The decoder lessons' budget and optimisation, in one place because lessons 4 and 5 are compared
# at the same budget: 1000 steps of 16 x 128 tokens (about five minutes here), and nanoGPT's
# optimiser: AdamW (0.9, 0.99), weight decay 0.1 on matrices, linear warm-up then cosine decay to
# 1e-4, gradient clipping at 1. The peak is 2e-3, twice nanoGPT's, because nanoGPT runs 2000
# steps; the nanoGPT comparison passes --max_steps 2000 --learning_rate 1e-3.
DECODER_TRAINING_DEFAULTS = dict(
    block_size=128,
    max_steps=1000,
    per_device_train_batch_size=16,
    eval_steps=250,
    logging_steps=100,
    learning_rate=2e-3,
    lr_scheduler_type="cosine_with_min_lr",
    lr_scheduler_kwargs='{"min_lr": 1e-4}',
    warmup_steps=100,
    weight_decay=0.1,
    adam_beta2=0.99,
    max_grad_norm=1.0,
)


def build_trainer(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerFast,
    train_dataset: Dataset,
    eval_dataset: Dataset,
    training_args: TrainingArguments,
    byte_lengths: torch.LongTensor,
    max_eval_blocks: int = 64,
) -> tuple[Trainer, ThroughputCallback]:
    """A ``Trainer`` whose evaluation reports bits per byte, plus a callback that times the steps.

    ``train_dataset`` holds packed blocks (``pack_for_causal_lm``) or random windows
    (``RandomWindows``); the periodic evaluation uses the first ``max_eval_blocks`` of ``eval_dataset``.
    """
    check_tokenizer_matches_model(tokenizer, model)
    block_size = len(train_dataset[0]["input_ids"])
    tokens_per_step = (
        block_size
        * training_args.per_device_train_batch_size
        * training_args.gradient_accumulation_steps
        * training_args.world_size
    )
    throughput = ThroughputCallback(tokens_per_step)
    preprocess_logits_for_metrics, compute_metrics = trainer_metric_functions(byte_lengths)
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset.select(range(min(max_eval_blocks, len(eval_dataset)))),
        processing_class=tokenizer,
        data_collator=default_data_collator,
        compute_metrics=compute_metrics,
        preprocess_logits_for_metrics=preprocess_logits_for_metrics,
        callbacks=[throughput],
    )
    return trainer, throughput


def evaluate_splits(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerFast,
    corpus: DatasetDict,
    byte_lengths: torch.LongTensor,
    context_length: int,
    max_tokens: int | None = None,
    splits: tuple[str, ...] = ("validation", "test"),
) -> dict[str, dict[str, float]]:
    """Whole-split held-out metrics for each of ``splits`` the corpus has."""
    return {
        split: evaluate_token_stream(
            model, split_token_ids(corpus[split], tokenizer), byte_lengths, context_length, max_tokens=max_tokens
        )
        for split in splits
        if split in corpus
    }


def train_and_evaluate(
    model: torch.nn.Module, data: LessonData, training_args: TrainingArguments, data_args: DataArguments
) -> tuple[Trainer, dict]:
    """Train with ``Trainer``, then measure the whole held-out splits.

    Returns the trainer and the results: per-split metrics, training throughput and a ``training``
    summary for the model card.
    """
    trainer, throughput = build_trainer(
        model, data.tokenizer, data.train_dataset, data.eval_dataset, training_args, data.byte_lengths, data_args.max_eval_blocks
    )
    trainer.train()
    results = evaluate_splits(model, data.tokenizer, data.corpus, data.byte_lengths, data_args.block_size, data_args.max_eval_tokens)
    args = training_args
    results.update(
        train_tokens_per_second=throughput.tokens_per_second,
        train_steps=trainer.state.global_step,
        parameters=model.num_parameters(),
        training={
            "parameters": f"{model.num_parameters():,}",
            "steps": trainer.state.global_step,
            "batch": f"{args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size} x {data_args.block_size} tokens",
            "optimizer": f"AdamW (betas {args.adam_beta1}, {args.adam_beta2}), lr {args.learning_rate}, warm-up "
            f"{args.warmup_steps} steps, {args.lr_scheduler_type} schedule, weight decay {args.weight_decay}, clip {args.max_grad_norm}",
            "training throughput": f"{throughput.tokens_per_second:,.0f} tokens/s on {args.world_size} process(es), {args.device.type}",
        },
    )
    return trainer, results


def sample_with_pipeline(folder: str | os.PathLike, prompt: str, max_new_tokens: int, seed: int = 0) -> str:
    """Read the saved folder back through ``pipeline("text-generation")`` and sample from it.

    The sample stops at the model's context (``max_position_embeddings``), prompt included.
    """
    set_seed(seed)
    generator = pipeline("text-generation", model=str(folder), device="cpu")
    room = generator.model.config.max_position_embeddings - len(generator.tokenizer(prompt)["input_ids"])
    out = generator(prompt, max_new_tokens=max(1, min(max_new_tokens, room)), do_sample=True, top_k=50, temperature=0.8)
    return out[0]["generated_text"]


def finish_lesson(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerFast,
    training_args: TrainingArguments,
    lesson_args: LessonArguments,
    data_args: DataArguments,
    results: dict,
    card: dict,
) -> tuple[Path, dict]:
    """Save the model folder (weights, config, code, tokenizer, card) atomically, sample from it,
    write ``results.json``, copy the card, and push to the Hub if ``--push_to_hub`` was given.

    ``card`` holds the text fields of :func:`build_model_card` (summary, lesson, limitations, ...).
    Prints the held-out bits per byte, where the model was saved and the sample; returns
    ``(folder, results)``.
    """
    output_dir = Path(training_args.output_dir)
    folder = output_dir / lesson_args.model_name
    if not training_args.process_index == 0:
        return folder, results
    card = dict(card)
    training = {**results.get("training", {}), **card.pop("training", {})}
    model_card = build_model_card(
        model_name=lesson_args.model_name,
        dataset=data_args.dataset,
        results={k: v for k, v in results.items() if k in ("validation", "test")},
        training=training,
        repo_hint=training_args.hub_model_id,
        **card,
    )

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        model_card.save(tmp / "README.md")

    save_folder_atomically(folder, write)
    results = dict(results, model_folder=str(folder), data=asdict(data_args))
    write_json_atomically(output_dir / "results.json", results)
    results["sample"] = sample_with_pipeline(folder, lesson_args.sample_prompt, lesson_args.sample_tokens, training_args.seed)
    write_json_atomically(output_dir / "results.json", results)
    if lesson_args.card_copy:
        Path(lesson_args.card_copy).parent.mkdir(parents=True, exist_ok=True)
        model_card.save(lesson_args.card_copy)
    if lesson_args.push_to_hub:
        repo_id = training_args.hub_model_id or lesson_args.model_name
        api = HfApi(token=training_args.hub_token)
        api.create_repo(repo_id, exist_ok=True, private=training_args.hub_private_repo)
        api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=f"Upload {lesson_args.model_name}")
    held_out = "test" if "test" in results else "validation"
    print(f"\n{held_out} bits per byte: {results[held_out]['bits_per_byte']:.4f}   (loss {results[held_out]['loss']:.4f} nats/token)")
    print(f"saved to {folder}")
    print(f"sample, read back through pipeline('text-generation') from that folder:\n{results['sample']}")
    return folder, results
