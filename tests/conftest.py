"""Shared test set-up: offline Hub, one thread per xdist worker, shared fixtures, the ``gpu`` marker.

Fixtures and hooks only; plain helpers live in ``tests/helpers.py``.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import datasets
import pytest
import torch

from hf_models.data import load_corpus
from hf_models.tokenization import build_char_tokenizer
from tests.helpers import TINY_TEXT, save_tiny_model


if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)  # two workers on two cores


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``gpu`` run only where torch sees a CUDA device."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="marked gpu: needs a CUDA device, and torch.cuda.is_available() is False here")
    for item in items:
        if item.get_closest_marker("gpu"):
            item.add_marker(skip)


@pytest.fixture(scope="module")
def single_thread():
    """One torch thread for a module of tiny tensors: they are all per-op overhead, a second OpenMP
    thread only adds synchronisation, and on a busy 2-core machine two threads waiting on each other
    made one generate() call 50x slower. Use with ``pytestmark = pytest.mark.usefixtures("single_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def torch_seed():
    """The global torch generator seeded at 0 before the test."""
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def shakespeare() -> datasets.DatasetDict:
    """The embedded Shakespeare corpus, split by play (train / validation / test)."""
    return load_corpus("shakespeare")


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A character tokenizer over ``TINY_TEXT``, the vocabulary of the tiny zoo models."""
    return build_char_tokenizer(TINY_TEXT)


@pytest.fixture
def saved_folder(tiny_tokenizer, tmp_path):
    """``saved_folder(model_type, **overrides)`` -> ``(model, folder)``: that tiny model saved with the tiny tokenizer."""

    def save(model_type: str, **overrides):
        folder = tmp_path / model_type
        return save_tiny_model(model_type, tiny_tokenizer, folder, **overrides), folder

    return save
