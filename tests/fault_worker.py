"""Runs ``python train.py ...`` with a fault injected at one training step, for tests/test_faults.py.

    python tests/fault_worker.py --at-step N --action pause --marker FILE -- train --dataset synthetic ...

The command line is the real one (``flax_resnet.cli.main``); the only addition is an ``on_step`` hook on
``training.train`` (the hook the loop has for tests), so the fault lands at a known global step instead of at
a moment that depends on how fast the machine is. Actions:

- ``pause``: write ``--marker`` (so the test knows the run is inside that step) and sleep until killed; the test
  then sends SIGKILL, a real kill of a real process.
- ``fill``: fill the file system of ``--ballast`` (a tiny tmpfs the test mounted) up to ``--leave`` free bytes, so
  the next checkpoint write hits a real ENOSPC from the kernel.
- ``fsize``: lower RLIMIT_FSIZE to ``--leave`` bytes (SIGXFSZ ignored), so a write past it fails with a real
  EFBIG from the kernel, for machines where no tmpfs can be mounted.

``--snapshot FILE --snapshot-of DIR`` first writes the SHA-256 of every file under DIR to FILE (JSON), so that the
test can check that what the run had written before the fault is still there unchanged. The hook does not read
the metrics it is given, so it adds no host sync.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def file_hashes(directory: Path) -> dict[str, str]:
    """SHA-256 of every file under ``directory``, by relative path."""
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def fill_file_system(ballast: Path, leave: int) -> None:
    """Write ``ballast`` until the file system holding it has only ``leave`` bytes free."""
    stat = os.statvfs(ballast.parent)
    size = max(stat.f_bavail * stat.f_frsize - leave, 0)
    with open(ballast, "wb") as f:
        f.write(b"\0" * size)
        f.flush()
        os.fsync(f.fileno())


def limit_file_size(limit: int) -> Callable[[], None]:
    """RLIMIT_FSIZE of ``limit`` bytes with SIGXFSZ ignored (writes fail with EFBIG); returns the undo."""
    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, old_limit[1]))

    def undo() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)

    return undo


@contextmanager
def fault_at_step(at_step: int, action: Callable[[], None]) -> Iterator[None]:
    """``training.train`` (both frameworks) runs ``action()`` right after global training step ``at_step``
    (0-based, counted from the run's start, also when resuming)."""
    from flax_resnet import training

    real_train = training.train

    def train(*args, **kwargs):
        def hook(step: int, loss: object) -> None:
            if step == at_step:
                action()

        return real_train(*args, on_step=hook, **kwargs)

    training.train = train
    try:
        yield
    finally:
        training.train = real_train


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--at-step", type=int, required=True)
    p.add_argument("--action", choices=("pause", "fill", "fsize"), required=True)
    p.add_argument("--marker", type=Path)
    p.add_argument("--ballast", type=Path)
    p.add_argument("--leave", type=int, default=64 * 1024)
    p.add_argument("--snapshot", type=Path)
    p.add_argument("--snapshot-of", type=Path)
    p.add_argument("train_args", nargs=argparse.REMAINDER)
    args = p.parse_args(argv)
    train_args = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args

    def pause() -> None:
        args.marker.write_text(str(os.getpid()))
        while True:
            time.sleep(1)

    fault = {"pause": pause, "fill": lambda: fill_file_system(args.ballast, args.leave),
             "fsize": lambda: limit_file_size(args.leave)}[args.action]

    def action() -> None:
        if args.snapshot is not None:
            args.snapshot.write_text(json.dumps(file_hashes(args.snapshot_of)))
        fault()

    from flax_resnet import cli

    with fault_at_step(args.at_step, action):
        return cli.main(train_args)


if __name__ == "__main__":
    sys.exit(main())
