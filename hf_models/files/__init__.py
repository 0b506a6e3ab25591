"""Files the zoo writes: atomic JSON results and folders, the one cache directory, the output folder's
lock, and the checks that a checkpoint reads back whole before a run resumes from it.

Everything that writes to disk goes through here (recipes, benchmarks, the training loop, the
converters), so a crash never leaves a half-written file behind, a save never deletes what it did
not write, what is written is readable by the people and servers a plain write would let read it,
and every cache sits under one root. Saved models never import this package.
"""

from .atomic import SAVE_MARKER, save_folder_atomically, write_json_atomically
from .cache import cache_dir
from .checkpoints import (
    batch_layout,
    check_batch_layout,
    latest_checkpoint,
    resolve_checkpoint,
    unreadable_file,
    write_batch_layout,
)
from .lock import lock_output_dir

__all__ = [
    "SAVE_MARKER",
    "batch_layout",
    "cache_dir",
    "check_batch_layout",
    "latest_checkpoint",
    "lock_output_dir",
    "resolve_checkpoint",
    "save_folder_atomically",
    "unreadable_file",
    "write_batch_layout",
    "write_json_atomically",
]
