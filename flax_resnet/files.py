"""Atomic file writes: the one way this package writes a file (or a checkpoint directory) that a reader, a crash or a
full disk must never see half written.

The data is written to a temporary beside the target, then renamed over it (``os.replace``: atomic on one file
system), so the target is the old file or the new one, never a mixture; a failure, or an interrupt, removes the
temporary and leaves the target as it was. ``fsync=True`` (the checkpoint store) also flushes the temporary and then
the directory that holds the rename to the disk, so a power cut after the call cannot undo it.

The new file gets the mode any new file gets here (``0o666`` less the umask, as ``open`` gives): writers that make
their own temporary (safetensors 0.8 writes 0600) and ``tempfile.mkstemp`` (0600) would otherwise leave a file
only its owner can read.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_path", "fsync_path", "temporary_name", "write_atomic"]


def temporary_name(name: str, *, unique: bool = False) -> str:
    """The hidden temporary beside ``name``: ``.name.tmp``, or with ``unique`` ``.name.tmp-<pid>-<8 hex digits>``
    (for directories several processes may write into at once)."""
    return f".{name}.tmp-{os.getpid()}-{secrets.token_hex(4)}" if unique else f".{name}.tmp"


def fsync_path(path: str | os.PathLike[str]) -> None:
    """Flush ``path`` (a file, or a directory: its entries, e.g. a rename into it) to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], *, directory: bool = False, unique: bool = False, fsync: bool = False,
                mode: int | None = None) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; on leaving the block it is renamed to ``path``.

    The temporary is a new empty file (``directory``: a new empty directory) named by ``temporary_name``. If the
    block or the rename fails, the temporary is removed (a directory with what it holds) and the error propagates;
    the target is unchanged. ``fsync``: the temporary (for a directory, its entries: the caller syncs the files it
    writes into it) before the rename, and the parent directory after it. ``mode``: the final file's permission
    bits; default what ``open`` would give a new file here (the umask's), whatever the writer's own temporary had.
    Renaming a directory onto an existing non-empty one fails (``OSError``), so a checkpoint is never replaced.
    """
    path = Path(path)
    tmp = path.with_name(temporary_name(path.name, unique=unique))
    if directory:
        tmp.mkdir()
        created_mode = None
    else:
        if not unique:
            tmp.unlink(missing_ok=True)  # a stale temporary of a crashed write (a directory there: IsADirectoryError)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            created_mode = os.fstat(fd).st_mode & 0o7777  # 0o666 less the umask, read without changing the umask
        finally:
            os.close(fd)
    try:
        yield tmp
        final_mode = created_mode if mode is None else mode
        if final_mode is not None:
            os.chmod(tmp, final_mode)
        if fsync:
            fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:  # a failed write, or an interrupt: no temporary left behind, the error as it was
        if directory:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
        raise
    if fsync:
        fsync_path(path.parent)


def write_atomic(path: str | os.PathLike[str], data: bytes | str, *, fsync: bool = False,
                 mode: int | None = None) -> Path:
    """Write ``data`` (``str`` as UTF-8) to ``path`` atomically (``atomic_path``); returns ``path``."""
    path = Path(path)
    with atomic_path(path, fsync=fsync, mode=mode) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    return path
