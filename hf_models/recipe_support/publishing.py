"""The end of every lesson: save the model folder with its card, read a sample back, push to the Hub.

The folder is what a user downloads, so it is written the way transformers writes one
(``save_pretrained`` for the weights, config, modeling code and tokenizer, ``README.md`` for the
card) and moved into place atomically (``hf_models.files``): a crash mid-save leaves the previous
folder, never half of a new one. The sample is read back through ``pipeline`` *from the saved
folder*, so every lesson proves that what it saved loads and generates the way a Hub user would
load it.
"""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path

import torch
from huggingface_hub import HfApi
from transformers import PreTrainedTokenizerFast, TrainingArguments, pipeline, set_seed

from ..files import SAVE_MARKER, save_folder_atomically, write_json_atomically
from ..tokenization import tokenizer_for_saving
from .arguments import DataArguments, LessonArguments, check_model_name
from .model_card import build_model_card


def sample_with_pipeline(folder: str | os.PathLike, prompt: str, max_new_tokens: int, seed: int = 0) -> str:
    """Read the saved folder back through ``pipeline("text-generation")`` and sample from it.

    The sample stops at the model's context (``max_position_embeddings``), prompt included.
    """
    set_seed(seed)
    generator = pipeline("text-generation", model=str(folder), device="cpu")
    room = generator.model.config.max_position_embeddings - len(generator.tokenizer(prompt)["input_ids"])
    out = generator(prompt, max_new_tokens=max(1, min(max_new_tokens, room)), do_sample=True, top_k=50, temperature=0.8)
    return out[0]["generated_text"]


def push_folder_to_hub(folder: str | os.PathLike, repo_id: str, token: str | None = None, private: bool | None = None) -> str:
    """Upload a saved model folder (weights, code, tokenizer, card) to ``repo_id`` on the Hub.

    The lesson pushes the finished folder itself, in one commit, rather than through ``Trainer``'s
    ``push_to_hub`` (which would open a repo at the start and push checkpoints without the card).
    Returns the URL of the commit.
    """
    api = HfApi(token=token)
    api.create_repo(repo_id, exist_ok=True, private=private)
    return api.upload_folder(
        repo_id=repo_id, folder_path=folder, commit_message=f"Upload {Path(folder).name}", ignore_patterns=[SAVE_MARKER]
    ).commit_url


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
    write ``results.json``, copy the card if ``--card_copy`` names a path, and push to the Hub if
    ``--push_to_hub`` was given.

    The saved tokenizer's ``model_max_length`` is the model's context
    (``config.max_position_embeddings``), so ``pipeline`` and ``tokenizer(..., truncation=True)``
    stop where the model does; the caller's tokenizer is left as it was.

    ``card`` holds the text fields of :func:`build_model_card` (summary, lesson, limitations, ...).
    Prints the held-out bits per byte, where the model was saved and the sample; returns
    ``(folder, results)``.
    """
    check_model_name(lesson_args.model_name)  # parse_lesson_args checked it already; a caller that built the args may not have
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
    saved_tokenizer = tokenizer_for_saving(tokenizer, model)

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        saved_tokenizer.save_pretrained(tmp)
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
        push_folder_to_hub(folder, repo_id, token=training_args.hub_token, private=training_args.hub_private_repo)
    held_out = "test" if "test" in results else "validation"
    print(f"\n{held_out} bits per byte: {results[held_out]['bits_per_byte']:.4f}   (loss {results[held_out]['loss']:.4f} nats/token)")
    print(f"saved to {folder}")
    print(f"sample, read back through pipeline('text-generation') from that folder:\n{results['sample']}")
    return folder, results
