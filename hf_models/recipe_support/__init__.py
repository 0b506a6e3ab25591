"""Recipe plumbing shared by every lesson, so that a recipe reads as its lesson and nothing else.

A recipe goes top to bottom, and each step has a module named for it:

* ``arguments.py``: the command line. ``HfArgumentParser`` dataclasses and :func:`parse_lesson_args`,
  which refuses flags that cannot work before anything runs, and :func:`global_batch_size`, the one
  place the global batch (per device x accumulation x processes) is computed.
* ``lesson_data.py``: corpus -> tokenizer (the hand-written BPE, cached) -> training examples,
  :func:`prepare_lesson_data` returning a :class:`LessonData`.
* ``trainer_setup.py``: the decoder lessons' shared budget (``DECODER_TRAINING_DEFAULTS``), a
  ``Trainer`` whose evaluation reports bits per byte (:func:`build_trainer`), and
  :func:`train_and_evaluate`; ``hf_models.benchmarking.ThroughputCallback`` times the steps.
* held-out measurement is not training: :func:`evaluate_splits` lives in ``hf_models.evaluation``
  (re-exported here for the recipes).
* ``publishing.py``: :func:`finish_lesson` saves the folder atomically with its card
  (``model_card.py``), writes ``results.json``, reads a sample back through ``pipeline`` from
  the saved folder and pushes to the Hub when asked.
* ``notebook.py``: the recipes are notebooks too (``# %%`` cells): plots shown under their cell,
  and ``python -m hf_models.recipe_support.notebook`` for ``make notebooks``.

Where the lessons' own pieces live:

* lesson 7, the training loop written by hand (what ``Trainer`` does for us): ``hf_models/training/loop.py``;
* lesson 8, adapters (LoRA and friends): the package ``hf_models/adapters/``;
* lesson 9, quantization: the flat ``hf_models/`` folder beside the model files, because a saved
  quantized folder must carry that code for ``trust_remote_code``;
* lesson 10's expert-load monitor: ``hf_models/evaluation/expert_load.py``;
* lesson 11, alignment (preference data, DPO): the package ``hf_models/alignment/``;
* lesson 12, experiments (ablation grids, the leaderboard): the package ``hf_models/experiments/``;
* measuring (the benchmark timer, the step clock, lesson 6's generation harness, training memory):
  ``hf_models/benchmarking/``.

* ``validation.py``: every mistake named before the first step (flags, output folder, saved model folders).

Saved models never import this package; it is for the recipes only.
"""

from ..evaluation import evaluate_splits
from .arguments import (
    DataArguments,
    DecoderArguments,
    LessonArguments,
    find_model_folder,
    flags_given,
    global_batch_size,
    in_notebook,
    parse_lesson_args,
    recipe_argv,
)
from .lesson_data import LessonData, bpe_tokenizer_for, load_lesson_corpus, prepare_lesson_data
from .model_card import build_model_card
from .model_source import (
    ModelSource,
    check_source_model_type,
    expert_weights,
    resolve_model_source,
    resolve_training_model_source,
    source_expert_weights,
)
from .notebook import show
from .publishing import finish_lesson, push_folder_to_hub, sample_with_pipeline
from .trainer_setup import DECODER_TRAINING_DEFAULTS, build_trainer, choose_bf16, train_and_evaluate

__all__ = [
    "DECODER_TRAINING_DEFAULTS",
    "DataArguments",
    "DecoderArguments",
    "LessonArguments",
    "LessonData",
    "bpe_tokenizer_for",
    "build_model_card",
    "build_trainer",
    "choose_bf16",
    "evaluate_splits",
    "find_model_folder",
    "flags_given",
    "ModelSource",
    "check_source_model_type",
    "expert_weights",
    "resolve_model_source",
    "source_expert_weights",
    "resolve_training_model_source",
    "finish_lesson",
    "global_batch_size",
    "in_notebook",
    "load_lesson_corpus",
    "parse_lesson_args",
    "prepare_lesson_data",
    "push_folder_to_hub",
    "recipe_argv",
    "sample_with_pipeline",
    "show",
    "train_and_evaluate",
]
