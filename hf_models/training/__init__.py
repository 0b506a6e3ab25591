"""Recipe plumbing shared by every lesson: arguments, Trainer set-up, atomic saving, model cards.

Saved models never import this package; it is for the training side only.
"""

from .arguments import DataArguments, DecoderArguments, LessonArguments
from .lesson import (
    DECODER_TRAINING_DEFAULTS,
    LessonData,
    build_trainer,
    bpe_tokenizer_for,
    evaluate_splits,
    finish_lesson,
    load_lesson_corpus,
    prepare_lesson_data,
    parse_lesson_args,
    sample_with_pipeline,
    train_and_evaluate,
)
from .model_card import build_model_card
from .throughput import ThroughputCallback

__all__ = [
    "DECODER_TRAINING_DEFAULTS",
    "LessonData",
    "DataArguments",
    "DecoderArguments",
    "LessonArguments",
    "ThroughputCallback",
    "bpe_tokenizer_for",
    "build_model_card",
    "build_trainer",
    "evaluate_splits",
    "finish_lesson",
    "load_lesson_corpus",
    "prepare_lesson_data",
    "parse_lesson_args",
    "sample_with_pipeline",
    "train_and_evaluate",
]
