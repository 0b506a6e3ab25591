"""Resuming only from a checkpoint that reads back whole, and with the global batch it was saved with.

Two ways a resume goes wrong without saying so, whichever loop wrote the checkpoint (``Trainer``
or lesson 7's hand loop):

* **A damaged file.** A checkpoint copied half-way or cut short by a full disk fails deep inside
  ``torch.load`` or safetensors with a message that names no file. :func:`unreadable_file` reads
  every file's structure first (safetensors header against the file size, the zip directory and
  CRCs of a ``torch.save`` file, JSON) and names the first one that is damaged. Asked for the
  latest checkpoint, :func:`latest_checkpoint` skips damaged ones and says which; asked for one
  folder, :func:`resolve_checkpoint` refuses it, naming the file.
* **Another global batch.** The data position, the learning-rate schedule and the RNG streams of
  a checkpoint are counted in global batches of the run that saved it (per-device batch x
  gradient accumulation x processes). Resumed with another layout, the run silently skips or
  repeats data. Each checkpoint records its layout (``batch_layout.json``), and
  :func:`check_batch_layout` refuses a resume that differs.
"""

from __future__ import annotations

import json
import logging
import os
import zipfile
from pathlib import Path

from safetensors import SafetensorError, safe_open

from .atomic import write_json_atomically

logger = logging.getLogger(__name__)

BATCH_LAYOUT_FILE = "batch_layout.json"
# What each recorded number is called on the command line, for the refusal.
_LAYOUT_FLAGS = {
    "world_size": "processes (accelerate launch --num_processes)",
    "per_device_train_batch_size": "--per_device_train_batch_size",
    "gradient_accumulation_steps": "--gradient_accumulation_steps",
}


def unreadable_file(folder: Path) -> str | None:
    """``"<file>: <why>"`` for the first file of ``folder`` that does not read back whole; None if all do.

    Checks structure, not every byte: enough to catch truncation, the usual damage. Files of other
    kinds (code, text) are not read.
    """
    for path in sorted(Path(folder).iterdir()):
        try:
            if path.suffix == ".safetensors":
                with safe_open(str(path), "pt"):  # checks the header against the file's size
                    pass
            elif path.suffix == ".json":
                json.loads(path.read_text())
            elif path.suffix in (".pt", ".pth", ".bin"):  # torch.save writes a zip archive
                with zipfile.ZipFile(path) as archive:
                    bad_member = archive.testzip()
                if bad_member is not None:
                    raise zipfile.BadZipFile(f"{bad_member} fails its CRC check")
        except (SafetensorError, ValueError, zipfile.BadZipFile, OSError) as error:
            return f"{path}: {error}"
    return None


def checkpoint_folders(output_dir: str | os.PathLike) -> list[Path]:
    """The ``checkpoint-<step>`` folders in ``output_dir``, newest (highest step) first."""
    folders = [p for p in Path(output_dir).glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return sorted(folders, key=lambda p: int(p.name.split("-")[-1]), reverse=True)


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest ``checkpoint-<step>`` in ``output_dir`` that reads back whole, if any.

    A newer, damaged one is skipped with a warning naming its bad file and the checkpoint used
    instead: falling back loses a few steps, resuming from damage loses the run.
    """
    damaged = []
    for folder in checkpoint_folders(output_dir):
        problem = unreadable_file(folder)
        if problem is None:
            if damaged:
                logger.warning("Skipping damaged checkpoint(s) (%s); resuming from %s instead.", "; ".join(damaged), folder)
            return folder
        damaged.append(problem)
    if damaged:
        logger.warning("Every checkpoint in %s is damaged: %s", output_dir, "; ".join(damaged))
    return None


def resolve_checkpoint(output_dir: str | os.PathLike, requested: bool | str | os.PathLike) -> Path:
    """The folder ``--resume_from_checkpoint`` means: ``True`` for :func:`latest_checkpoint`, else the folder given.

    Raises:
        ValueError: no readable checkpoint to take, or the named folder is missing or damaged (naming the file).
    """
    if requested is True:
        folder = latest_checkpoint(output_dir)
        if folder is None:
            raise ValueError(
                f"--resume_from_checkpoint true: no readable checkpoint-<step> folder in {output_dir} to resume from."
            )
        return folder
    folder = Path(requested)
    if not folder.is_dir():
        raise ValueError(f"--resume_from_checkpoint {str(requested)!r}: no such folder; pass a checkpoint-<step> folder, or true.")
    problem = unreadable_file(folder)
    if problem is not None:
        raise ValueError(
            f"--resume_from_checkpoint {str(requested)!r} is damaged, {problem}. Resume from an earlier checkpoint, "
            f"or pass --resume_from_checkpoint true to take the newest one that reads back whole."
        )
    return folder


def batch_layout(per_device_train_batch_size: int, gradient_accumulation_steps: int, world_size: int) -> dict[str, int]:
    """The three numbers whose product is the global batch, as a checkpoint records them."""
    return {
        "world_size": world_size,
        "per_device_train_batch_size": per_device_train_batch_size,
        "gradient_accumulation_steps": gradient_accumulation_steps,
    }


def write_batch_layout(folder: Path, layout: dict[str, int]) -> None:
    write_json_atomically(Path(folder) / BATCH_LAYOUT_FILE, layout)


def check_batch_layout(folder: Path, layout: dict[str, int]) -> None:
    """Refuse to resume from ``folder`` with a global batch laid out otherwise than when it was saved.

    A checkpoint that records no layout (written before this check existed) is not checked.

    Raises:
        ValueError: naming each number that changed, its flag, and both values.
    """
    path = Path(folder) / BATCH_LAYOUT_FILE
    if not path.exists():
        return
    saved = json.loads(path.read_text())
    changed = [f"{_LAYOUT_FLAGS[key]}: {saved[key]} in the checkpoint, {value} now"
               for key, value in layout.items() if key in saved and saved[key] != value]
    if changed:
        raise ValueError(
            f"Cannot resume from {folder} with another global batch ({'; '.join(changed)}). The data position, "
            f"learning-rate schedule and random streams are counted in the checkpoint's global batches: resume with "
            f"its values, or start afresh in another --output_dir."
        )
