"""Writing results so that a crash never leaves a half-written folder or file behind.

A file or folder is built next to its destination under a temporary name and moved into place
with one rename, which is atomic on one filesystem: readers see the old version or the new one,
never a mix. Three details make that true in practice:

* **Durability.** Data is flushed and ``fsync``-ed before the rename, and the parent directory
  after it; otherwise a power cut can leave the new name pointing at an empty file.
* **Permissions.** ``tempfile`` creates ``0600`` files and ``0700`` folders (it must, since other
  users could read them while they are being written), and so does safetensors >= 0.8 for
  ``model.safetensors`` (it writes through a private temporary file, safetensors#782). A plain
  ``open`` gives ``0644``/``0755`` under the usual umask, and a teammate or a serving process
  running as another user expects to read the model. So everything moved into place gets the mode
  a plain write would have given: ``0666`` / ``0777`` less the process's umask.
* **Replacing a folder.** Renaming the old folder away and the new one in leaves a moment where
  neither exists. On Linux, ``renameat2(RENAME_EXCHANGE)`` swaps the two names in one step; the
  old contents, now under the temporary name, are then removed. Elsewhere the two-rename fallback
  is used (the window is a few microseconds).

Two rules keep a save from destroying what it did not write:

* **Only an earlier save is replaced.** Every saved folder gets a marker file (``SAVE_MARKER``);
  an existing folder is replaced only if it holds that marker or a ``config.json`` (a model folder
  saved before the marker existed). Anything else, say ``--model_name .`` pointing the save at a
  run folder full of results, is refused with the list of what is there.
* **A killed save's temporaries are cleaned by the next save, and only those.** Temporary names
  carry the host and the process id of their writer (``.NAME.tmp-HOST-PID-xxxx``). The next save of
  the same destination removes the ones whose writer is dead; another process's temporary, still
  being written, is left alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import re
import shutil
import socket
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100

SAVE_MARKER = ".hf_models-save"
_MARKER_TEXT = "This folder was written by hf_models.files.save_folder_atomically; a later save may replace it whole.\n"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _exchange(a: Path, b: Path) -> bool:
    """Swap the names ``a`` and ``b`` in one atomic step; False where the OS cannot."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    result = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if result != 0:
        errno = ctypes.get_errno()
        if errno in (38, 22, 95):  # ENOSYS, EINVAL (filesystem without exchange), EOPNOTSUPP
            return False
        raise OSError(errno, os.strerror(errno), str(b))
    return True


def write_json_atomically(path: str | os.PathLike, payload: dict) -> Path:
    """Write ``payload`` as indented, key-sorted JSON to ``path``, atomically and durably."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_dir():
        raise IsADirectoryError(f"Cannot write JSON to {path}: it is a directory.")
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False) as f:
        try:
            json.dump(payload, f, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
            os.fchmod(f.fileno(), 0o666 & ~_umask())
        except BaseException:
            os.unlink(f.name)
            raise
    os.replace(f.name, path)
    _fsync_path(path.parent)
    return path


def _host() -> str:
    """This machine's name, reduced to characters that are safe in a file name and cannot be confused with the pid."""
    return re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname())


def _temporary_prefix(folder: Path, kind: str) -> str:
    """``.NAME.tmp-HOST-PID-``: whose temporary it is, so that a later save knows when its writer died."""
    return f".{folder.name}.{kind}-{_host()}-{os.getpid()}-"


def _process_is_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)  # signal 0 checks that the process exists, and sends nothing
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, run by another user
        return True
    return True


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Remove the temporaries a killed save of ``folder`` left beside it, and only those.

    A temporary is stale when it is named for ``folder`` on this host and its writer's process is
    gone (SIGKILL, power cut). Temporaries of other destinations, of other hosts (a shared disk),
    of live processes, and old unnamed ones (whose owner cannot be known) are left alone.
    """
    pattern = re.compile(re.escape(f".{folder.name}.") + r"(?:tmp|old)-" + re.escape(_host()) + r"-(\d+)-[A-Za-z0-9_]+")
    removed = []
    for entry in folder.parent.iterdir() if folder.parent.is_dir() else ():
        match = pattern.fullmatch(entry.name)
        if match and entry.is_dir() and not entry.is_symlink() and not _process_is_alive(int(match.group(1))):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def check_replaceable(folder: Path) -> None:
    """Refuse to replace ``folder`` unless replacing it loses nothing a save did not write.

    Replacing swaps the whole folder, so every file in it goes. That is right for an earlier save
    (it holds ``SAVE_MARKER``, or the ``config.json`` of a model folder saved before the marker
    existed) and for an empty folder; anything else is the user's, and stays.
    """
    if folder.name in ("", ".", ".."):
        raise ValueError(f"Cannot save a folder at {str(folder)!r}: the last part of the path must be a plain folder name.")
    if not folder.exists():
        return
    if not folder.is_dir():
        raise FileExistsError(
            f"Cannot save a folder at {folder}: a file of that name exists. Choose another output "
            f"directory or remove the file."
        )
    contents = sorted(p.name for p in folder.iterdir())
    if contents and SAVE_MARKER not in contents and "config.json" not in contents:
        shown = ", ".join(contents[:8]) + (f" and {len(contents) - 8} more" if len(contents) > 8 else "")
        raise FileExistsError(
            f"Will not replace {folder}: it holds files no earlier save wrote ({shown}); saving would delete them. "
            f"Move them away, or save elsewhere (another --output_dir or --model_name)."
        )


def save_folder_atomically(folder: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_folder)`` to fill a temporary folder next to ``folder``, then put it in place.

    An existing ``folder`` is replaced in one step (see the module docstring) if it is an earlier
    save or empty; any other existing folder, or a file, is refused before anything is written
    (:func:`check_replaceable`). Temporaries left by a killed save of ``folder`` are removed first.
    """
    folder = Path(folder)
    check_replaceable(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(folder)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=_temporary_prefix(folder, "tmp")))
    try:
        umask = _umask()
        write(tmp)
        (tmp / SAVE_MARKER).write_text(_MARKER_TEXT)
        for path in sorted(tmp.rglob("*")):
            if path.is_symlink():
                continue
            if path.is_file():
                os.chmod(path, 0o666 & ~umask)
                _fsync_path(path)
            elif path.is_dir():
                os.chmod(path, 0o777 & ~umask)
        os.chmod(tmp, 0o777 & ~umask)
        _fsync_path(tmp)
        if folder.exists() and _exchange(tmp, folder):
            shutil.rmtree(tmp)  # tmp now holds the old folder
        elif folder.exists():
            old = Path(tempfile.mkdtemp(dir=folder.parent, prefix=_temporary_prefix(folder, "old")))
            os.replace(folder, old / folder.name)
            os.replace(tmp, folder)
            shutil.rmtree(old)
        else:
            os.replace(tmp, folder)
        _fsync_path(folder.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder
