"""Files that are never half-written: write a temporary file, fsync, rename.

Used for checkpoints, data files, experiment results and benchmark reports alike.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable, Union

PathLike = Union[str, "os.PathLike[str]"]


def atomic_write(path: PathLike, write: Callable[[BinaryIO], object]) -> Path:
    """Writes ``path`` through ``write(file)`` so that it is always whole.

    ``write`` gets a binary file: a temporary file in ``path``'s directory, which is then
    flushed, given the permissions of the file it replaces (or the usual 0o666 minus the
    umask), fsynced and renamed onto ``path`` with ``os.replace``; the directory is fsynced
    so the rename survives a power loss. At every moment ``path`` holds either its previous
    contents or the new ones, whole. On any exception (Ctrl-C included) the temporary file
    is removed and ``path`` is untouched; a process killed outright may leave a
    ``.<name>.<random>.tmp`` beside it, which never affects ``path``.

    Example:
      >>> import os, tempfile
      >>> from funcnet.atomic import atomic_write
      >>> target = os.path.join(tempfile.mkdtemp(), "notes.txt")
      >>> _ = atomic_write(target, lambda f: f.write(b"all or nothing"))
      >>> open(target).read()
      'all or nothing'
    """
    path = Path(os.fspath(path))
    mode = _file_mode(path)
    handle = tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.",
                                         suffix=".tmp", delete=False)
    try:
        with handle:
            write(handle)
            handle.flush()
            if hasattr(os, "fchmod"):
                os.fchmod(handle.fileno(), mode)
            os.fsync(handle.fileno())
        os.replace(handle.name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(handle.name)
        raise
    _fsync_directory(path.parent)
    return path


def _file_mode(path: Path) -> int:
    """The existing file's permissions, else 0o666 minus the umask (the temporary file
    is created 0o600)."""
    with contextlib.suppress(OSError):
        return stat.S_IMODE(os.stat(path).st_mode)
    umask = None
    with contextlib.suppress(OSError, ValueError):  # Linux: read it without changing it.
        with open("/proc/self/status") as status:
            umask = next((int(line.split()[1], 8) for line in status
                          if line.startswith("Umask:")), None)
    if umask is None:
        umask = os.umask(0o022)
        os.umask(umask)
    return 0o666 & ~umask


def _fsync_directory(directory: Path) -> None:
    """Makes the rename durable; not possible on Windows, and some file systems refuse it
    (the rename has happened by then, so a refusal only weakens durability)."""
    if os.name != "posix":
        return
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
