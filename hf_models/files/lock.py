"""One run per output folder: an advisory lock that a second run on the same ``--output_dir`` meets at once.

Two runs writing one folder interleave their checkpoints, overwrite each other's ``results.json``
and swap model folders under each other; nothing fails, and the result is neither run. So a recipe
takes an exclusive ``flock`` on ``<output_dir>/.hf_models.lock`` before any work, and a second run
fails fast, naming the holder.

The lock belongs to the open file, hence to the process: the kernel releases it when the process
exits, normally, on an exception, or killed by SIGKILL, so a crashed run never leaves a folder
locked (a lock *file* that merely exists would). The file itself stays behind, harmlessly.
``flock`` is advisory: only programs that ask for it are kept out.
"""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path

LOCK_FILE = ".hf_models.lock"

# Folders this process holds, with their open file: a lock taken twice by one process is kept, not re-taken
# (a second open + flock from the same process would be refused like another process's).
_held: dict[Path, int] = {}


def lock_output_dir(output_dir: str | os.PathLike) -> Path:
    """Hold an exclusive lock on ``output_dir`` (created if missing) until this process ends.

    Returns the lock file. Raises ``RuntimeError`` naming the folder and the holder's pid and host
    if another process holds it.
    """
    folder = Path(output_dir).expanduser().resolve()
    if folder in _held:
        return folder / LOCK_FILE
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise RuntimeError(
            f"--output_dir {str(output_dir)!r} is in use by another run ({holder}): two runs in one folder overwrite "
            f"each other's checkpoints and model. Wait for it to finish, or pass another --output_dir."
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
    _held[folder] = fd
    return folder / LOCK_FILE
