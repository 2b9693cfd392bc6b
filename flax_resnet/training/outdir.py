"""Claiming a run's output directory before any work (data, models): it must be writable, and only one run may
write to it.

The lock file ``.lock`` is created (writability is tested by writing: permission bits do not stop root) and held
with an exclusive ``fcntl.flock``; a second run fails at once naming the holder (pid, host, start time, written into
the file). The kernel drops the lock with the holding process however it dies, so a lock file left by a killed run
blocks nothing. Releasing removes the lock file and the directories the claim created if the run left them empty,
so a failed start leaves no trace.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import itertools
import os
import socket
import tempfile
from pathlib import Path

from flax_resnet.errors import FlaxResnetError

__all__ = ["LOCK_FILE", "OutputClaim", "OutputDirError", "claim_output_dir"]

LOCK_FILE = ".lock"


class OutputDirError(FlaxResnetError, RuntimeError):
    """An output directory that cannot be written, or one that another run is writing to."""


class OutputClaim:
    """A held claim on an output directory (a context manager; ``release`` is idempotent)."""

    def __init__(self, directory: Path, fd: int, created: list[Path]):
        self.directory, self.lock_path, self._fd, self._created = directory, directory / LOCK_FILE, fd, created

    def __enter__(self) -> OutputClaim:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def release(self) -> None:
        if self._fd < 0:
            return
        # Unlinked while still locked: a run that opened the old file meanwhile sees it replaced (claim retries).
        self.lock_path.unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = -1
        _remove_created(self._created)


def claim_output_dir(out: str | Path, probe: tuple[str, ...] = ("checkpoints",)) -> OutputClaim:
    """Create ``out`` if needed, check it is writable (and its existing ``probe`` subdirectories), lock it;
    ``OutputDirError`` says what is wrong and what to do."""
    out = Path(out).expanduser().absolute()
    created = list(itertools.takewhile(lambda p: not p.exists(), (out, *out.parents)))  # innermost first
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputDirError(f"cannot create the output directory {out} ({e.strerror}: {e.filename}); "
                             "choose another --out") from e
    lock_path = out / LOCK_FILE
    while True:
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            _remove_created(created)
            raise OutputDirError(f"cannot write to the output directory {out} ({e.strerror}); choose a writable "
                                 "--out") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise OutputDirError(f"cannot lock {lock_path} ({e.strerror}); choose an --out on a file system "
                                     "with file locks (a local disk)") from e
            holder = "a run that has not yet recorded its pid"
            with contextlib.suppress(OSError):
                holder = lock_path.read_text().strip() or holder
            raise OutputDirError(f"{out} is in use by another run ({holder}); wait for it to finish or choose another "
                                 "--out") from e
        # the file we locked may have been unlinked by a holder releasing it just before: then lock anew
        with contextlib.suppress(FileNotFoundError):
            if os.stat(lock_path).st_ino == os.fstat(fd).st_ino:
                break
        os.close(fd)
    claim = OutputClaim(out, fd, created)
    try:
        started = datetime.datetime.now().isoformat(timespec="seconds")
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}, started {started}\n".encode())
        for name in probe:
            if (out / name).is_dir():
                with tempfile.TemporaryFile(dir=out / name):
                    pass
    except OSError as e:
        claim.release()
        raise OutputDirError(f"cannot write to the output directory {out} ({e.strerror}: {e.filename or out}); "
                             "choose a writable --out") from e
    return claim


def _remove_created(created: list[Path]) -> None:
    """Remove the directories a claim created, deepest first, while they are empty (what a run wrote stays)."""
    with contextlib.suppress(OSError):
        for directory in created:
            directory.rmdir()
