"""What every command of the command line shares: help layout, error reporting, progress. Only the standard library
is imported at import time, so ``--help`` stays quick."""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import os
import signal
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator
from typing import Any, NoReturn

from flax_resnet.cli.options import program_name

__all__ = ["EXIT_INTERRUPTED", "EXIT_TERMINATED", "HelpFormatter", "Terminated", "exit_now", "fail",
           "handle_sigterm", "interrupted_code", "interrupted_word", "program_name", "progress_factory",
           "quiet_tfds", "write_line"]

EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a process stopped by Ctrl-C
EXIT_TERMINATED = 143  # 128 + SIGTERM: what kill, SLURM and container runtimes send


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread as Ctrl-C's ``KeyboardInterrupt`` is, so that every ``except
    KeyboardInterrupt`` settles the outputs, releases the --out lock and gives the resume hint for it too."""


def _raise_terminated(signum: int, frame: Any) -> None:
    # once: a second SIGTERM ends the process at once (the default action), as schedulers expect after a grace time
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    raise Terminated()


@contextlib.contextmanager
def handle_sigterm() -> Iterator[None]:
    """Within the block, SIGTERM raises ``Terminated`` in the main thread; the previous handler afterwards (main
    may be called in-process, e.g. by the tests). Elsewhere than in the main thread signals cannot be handled."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def interrupted_code(error: BaseException) -> int:
    """The exit code for an interruption: 143 for SIGTERM, 130 for Ctrl-C."""
    return EXIT_TERMINATED if isinstance(error, Terminated) else EXIT_INTERRUPTED


def interrupted_word(error: BaseException) -> str:
    return "terminated (SIGTERM)" if isinstance(error, Terminated) else "interrupted"


def exit_now(code: int) -> NoReturn:
    """End the process at once, from any thread, with no interpreter teardown (see ``cli.main``)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Wraps prose, keeps text laid out in lines as it is (the epilogs' tables and examples); wider option column."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=34, width=110)

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        fill = super()._fill_text if "\n" in text else functools.partial(argparse.HelpFormatter._fill_text, self)
        return fill(text, width, indent)


def fail(message: str) -> int:
    """An expected failure: the message on stderr, no traceback; exit code 1. Lines break at spaces only, so that
    paths (often with hyphens) stay whole; a message laid out in lines (a list of problems) keeps its lines."""
    lines = message.strip().split("\n")
    wrapped = [textwrap.fill(" ".join(line.split()), width=110, initial_indent="  " if i else "",
                             subsequent_indent="    " if i else "  ", break_on_hyphens=False,
                             break_long_words=False) for i, line in enumerate(lines)]
    sys.stdout.flush()
    print("error: " + "\n".join(wrapped), file=sys.stderr)
    return 1


def _not_the_opencv_note(record: logging.LogRecord) -> bool:
    return "OpenCV is not installed" not in record.getMessage()


def quiet_tfds(progress: bool) -> None:
    """Set TFDS up for a command that prepares or reads CIFAR-10 (process-wide state, which the library leaves
    alone): its progress bars only where ours are shown (``progress``), and never absl's warning that OpenCV is not
    installed (TFDS's advice for faster decoding; the [data] extra decodes with Pillow). Without TFDS: nothing."""
    from flax_resnet.errors import installed

    if not installed("tensorflow_datasets"):  # the command's own check names the extra
        return
    import tensorflow_datasets as tfds
    from absl import logging as absl_logging

    absl_logging.get_absl_logger().addFilter(_not_the_opencv_note)  # once: the same function is not added twice
    tfds.display_progress_bar(progress)


def write_line(line: str) -> None:
    """Epoch lines go to stdout, between progress-bar refreshes (tqdm.write keeps the bar intact)."""
    from tqdm import tqdm

    tqdm.write(line, file=sys.stdout)


def progress_factory(enabled: bool) -> Callable[..., Any] | None:
    """tqdm bars on stderr, one per epoch (``factory(total=..., desc=...)``), or none (tqdm is then not imported)."""
    if not enabled:
        return None
    from tqdm import tqdm

    return functools.partial(tqdm, unit="step", leave=False, file=sys.stderr, dynamic_ncols=True)
