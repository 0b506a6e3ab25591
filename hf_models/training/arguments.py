"""Command-line arguments every recipe shares, as ``HfArgumentParser`` dataclasses.

Each recipe adds its own ``ModelArguments`` dataclass and transformers' ``TrainingArguments``,
and sets its defaults with ``parse_lesson_args(..., defaults={...})``, so ``--help`` shows the
values the lesson actually runs with.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class DataArguments:
    dataset: str = field(
        default="shakespeare",
        metadata={
            "help": "A named corpus (shakespeare: 38 plays, offline; wikitext-2; text: local files via "
            "--data_files), a Hub dataset id, or a local dataset folder."
        },
    )
    data_files: list[str] | None = field(default=None, metadata={"help": "Local text files for --dataset text."})
    dataset_path: str | None = field(
        default=None, metadata={"help": "A local copy of a Hub dataset (e.g. wikitext) with the Hub repo's layout."}
    )
    text_column: str = field(default="text", metadata={"help": "The column that holds the text."})
    validation_fraction: float = field(
        default=0.1, metadata={"help": "Held-out fraction for corpora without a validation split."}
    )
    block_size: int = field(default=128, metadata={"help": "Training context: tokens per packed block."})
    max_eval_tokens: int | None = field(
        default=None, metadata={"help": "Evaluate held-out splits on their first N tokens only (default: all)."}
    )
    max_eval_blocks: int = field(
        default=64, metadata={"help": "Validation blocks used by the periodic evaluation during training."}
    )


@dataclass
class LessonArguments:
    model_name: str = field(default="", metadata={"help": "Name of the saved model (folder name and card title)."})
    card_copy: str = field(
        default="",
        metadata={"help": "Also write the model card to this path (the recipes default to model_cards/<model>.md)."},
    )
    sample_prompt: str = field(default="ROMEO:\n", metadata={"help": "Prompt for the generated sample."})
    sample_tokens: int = field(default=200, metadata={"help": "New tokens in the generated sample."})
    # Filled from TrainingArguments.push_to_hub by parse_lesson_args: the recipe pushes its finished
    # folder (weights, code, tokenizer, card) itself, so Trainer must not open a Hub repo of its own.
    push_to_hub: bool = field(default=False, init=False)


@dataclass
class DecoderArguments:
    """What the decoder lessons (4, 5) share; each recipe subclasses it with its own blocks' options."""

    tokenizer: str = field(default="auto", metadata={"help": "char, bpe, or auto (char for --dataset text, else bpe)."})
    vocab_size: int = field(default=2048, metadata={"help": "BPE vocabulary size."})
    sampling: str = field(default="random_windows", metadata={"help": "random_windows (nanoGPT) or blocks (packed)."})
    num_hidden_layers: int = field(default=4, metadata={"help": "Decoder layers."})
    num_attention_heads: int = field(default=4, metadata={"help": "Attention (query) heads."})
    hidden_size: int = field(default=192, metadata={"help": "Width of the residual stream."})
    dropout: float = field(default=0.0, metadata={"help": "Dropout on embeddings and residual branches."})
    export_for_serving: bool = field(
        default=True, metadata={"help": "Also save the model converted to GPT2LMHeadModel / LlamaForCausalLM."}
    )
