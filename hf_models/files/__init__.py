"""Files the zoo writes: atomic JSON results and folders, and the one cache directory.

Everything that writes to disk goes through here (recipes, benchmarks, the training loop, the
converters), so a crash never leaves a half-written file behind, what is written is readable by
the people and servers a plain write would let read it, and every cache sits under one root.
Saved models never import this package.
"""

from .atomic import save_folder_atomically, write_json_atomically
from .cache import cache_dir

__all__ = ["cache_dir", "save_folder_atomically", "write_json_atomically"]
