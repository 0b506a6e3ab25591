"""Shared test set-up: offline Hub, one thread per xdist worker, and the tiny model of each zoo type."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest
import torch

import hf_models
from hf_models.tokenization import build_char_tokenizer

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)  # two workers on two cores

# The tiny configuration of every registered model type. A model joins the integration matrix by
# registering in hf_models.MODEL_REGISTRY and adding its line here (a test checks none is missing).
TINY_CONFIGS: dict[str, dict] = {
    "zoo_bigram": dict(initializer_range=0.5),
    "zoo_ngram_mlp": dict(context_size=3, embedding_dim=8, hidden_size=16),
    "zoo_gru": dict(hidden_size=16, num_hidden_layers=2),
    "zoo_gpt": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4),
    "zoo_modern": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
}

TINY_TEXT = "ROMEO:\nBut soft, what light through yonder window breaks?\nIt is the east, and Juliet is the sun.\n"


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_char_tokenizer(TINY_TEXT)


def build_tiny_model(model_type: str, vocab_size: int, seed: int = 0, **overrides) -> torch.nn.Module:
    config_class, model_class = hf_models.MODEL_REGISTRY[model_type]
    torch.manual_seed(seed)
    config = config_class(vocab_size=vocab_size, max_position_embeddings=64, **{**TINY_CONFIGS[model_type], **overrides})
    return model_class(config).eval()
