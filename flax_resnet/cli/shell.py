"""What every command of the command line shares: help layout, error reporting, progress. Only the standard library
is imported at import time, so ``--help`` stays quick."""

from __future__ import annotations

import argparse
import functools
import os
import sys
import textwrap
from collections.abc import Callable
from typing import Any, NoReturn

from flax_resnet.cli.options import program_name

__all__ = ["EXIT_INTERRUPTED", "HelpFormatter", "exit_now", "fail", "program_name", "progress_factory", "write_line"]

EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a process stopped by Ctrl-C


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
