"""Files that are never half-written: write a temporary file, fsync, rename.

Used for checkpoints, data files, experiment results and benchmark reports alike.

What :func:`atomic_write` guarantees for ``path``:

- At every moment ``path`` holds either its previous contents or the new ones, whole,
  even if the process is killed or the machine loses power while writing.
- A write that fails (any exception: a full disk, a file size limit, Ctrl-C) leaves
  ``path`` untouched and no temporary file behind.
- A writer killed outright (SIGKILL, power loss) can leave its temporary file
  ``.<name>.<random>.tmp`` beside ``path``; the next ``atomic_write`` to the same ``path``
  removes it. Files of this exact pattern only are removed (those of other targets and
  all other names are left alone), and never one that another process is still writing:
  on POSIX every writer holds an exclusive ``flock`` on its temporary file until it is
  renamed, and a leftover is removed only if its lock can be taken (the system releases
  the locks of dead processes); on Windows a file that is open elsewhere cannot be
  deleted. On file systems without ``flock`` nothing is removed.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable, List, Optional, Tuple, Union

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

PathLike = Union[str, "os.PathLike[str]"]


def atomic_write(path: PathLike, write: Callable[[BinaryIO], object]) -> Path:
    """Writes ``path`` through ``write(file)`` so that it is always whole.

    ``write`` gets a binary file: a temporary file ``.<name>.<random>.tmp`` in ``path``'s
    directory, which is then flushed, given the permissions of the file it replaces (or
    the usual 0o666 minus the umask), fsynced and renamed onto ``path`` with
    ``os.replace``; the directory is fsynced so the rename survives a power loss. At every
    moment ``path`` holds either its previous contents or the new ones, whole. On any
    exception (Ctrl-C included) the temporary file is removed, ``path`` is untouched and
    the exception propagates (an ``OSError`` such as ENOSPC as it is). Temporary files
    that killed writers of ``path`` left behind are removed first (see the module
    docstring: never one that is still being written).

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
    remove_stale_temporaries(path)
    handle, lock = _create_temporary(path)
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
    finally:
        if lock is not None:
            os.close(lock)  # (after the rename, so that no one removes the file before)
    _fsync_directory(path.parent)
    return path


def temporary_files(path: PathLike) -> List[Path]:
    """The temporary files of writes to ``path`` now beside it, in progress or left by
    killed writers: regular files named ``.<name>.<random>.tmp``, where ``<random>`` is
    what :mod:`tempfile` makes (lowercase letters, digits and ``_``, no dot, so the files
    of a target named e.g. ``<name>.bak`` never match)."""
    path = Path(os.fspath(path))
    pattern = re.compile(re.escape(f".{path.name}.") + r"[a-z0-9_]+\.tmp")
    try:
        with os.scandir(path.parent) as entries:
            return sorted(path.parent / entry.name for entry in entries
                          if pattern.fullmatch(entry.name)
                          and entry.is_file(follow_symlinks=False))
    except OSError:
        return []


def remove_stale_temporaries(path: PathLike) -> List[Path]:
    """Removes the temporary files that killed writers of ``path`` left behind, and
    returns them; files still being written (locked, or open on Windows) are kept, and
    errors are ignored (a file that cannot be removed is left)."""
    removed = []
    for name in temporary_files(path):
        with contextlib.suppress(OSError):  # BlockingIOError: a live writer holds it
            if fcntl is None:
                os.unlink(name)
            else:
                fd = os.open(name, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    os.unlink(name)
                finally:
                    os.close(fd)
            removed.append(name)
    return removed


def _create_temporary(path: Path) -> Tuple[BinaryIO, Optional[int]]:
    """A new temporary file beside ``path``, and a descriptor that holds an exclusive
    ``flock`` on it until closed (None without ``flock``): the mark of a live writer."""
    while True:
        handle = tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.",
                                             suffix=".tmp", delete=False)
        if fcntl is None:
            return handle, None
        lock = os.dup(handle.fileno())  # outlives `handle`, which is closed before the rename
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
        except OSError:  # A file system without locks; none are removed there either.
            os.close(lock)
            return handle, None
        if os.fstat(lock).st_nlink > 0:
            return handle, lock
        # Another writer's clean-up removed the file in the instant before it was locked.
        os.close(lock)
        handle.close()


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
