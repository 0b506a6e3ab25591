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
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


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


def save_folder_atomically(folder: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_folder)`` to fill a temporary folder next to ``folder``, then put it in place.

    An existing ``folder`` is replaced in one step (see the module docstring); a ``folder`` that
    exists as a file is refused before anything is written.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise FileExistsError(
            f"Cannot save a folder at {folder}: a file of that name exists. Choose another output "
            f"directory or remove the file."
        )
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.tmp-"))
    try:
        umask = _umask()
        write(tmp)
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
            old = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.old-"))
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
