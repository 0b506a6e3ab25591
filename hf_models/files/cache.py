"""The zoo's one cache directory (trained tokenizers, packed datasets, benchmark inputs)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir(*parts: str) -> Path:
    """``$HF_MODELS_CACHE/<parts>``, by default ``~/.cache/hf_models/<parts>``.

    Read at call time, not import time, so a test or a user can point it elsewhere with the
    environment variable at any moment. Nothing is created: callers make what they write.
    """
    root = os.environ.get("HF_MODELS_CACHE") or Path.home() / ".cache" / "hf_models"
    return Path(root).expanduser().joinpath(*parts)
