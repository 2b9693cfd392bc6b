"""``selftest``: ``flax_resnet.selftest.run`` into --out, its report printed; exit 1 when it fails or is incomplete
(130 / 143 when interrupted by Ctrl-C / SIGTERM)."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys

from flax_resnet import selftest
from flax_resnet.cli import shell
from flax_resnet.config import ConfigError
from flax_resnet.errors import require


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    out = args.out
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a directory.")
    require("torch", "selftest (it compares with the PyTorch models)")
    try:
        doc = selftest.run(out, quick=bool(args.quick), skip=tuple(args.skip or ()))
    except KeyboardInterrupt as e:  # the report was saved as INCOMPLETE before the interruption went on
        not_run = "the parts listed there"
        with contextlib.suppress(OSError, ValueError, TypeError, KeyError):
            not_run = ", ".join(json.loads((out / selftest.JSON_FILE).read_text())["not_run"]) or not_run
        print(f"\n{shell.interrupted_word(e)}: INCOMPLETE, not run: {not_run}; report in {out}", file=sys.stderr)
        return shell.interrupted_code(e)
    print(selftest.to_markdown(doc), end="")
    print(f"{selftest.verdict_line(doc).replace('**', '')}; report in {out}", file=sys.stderr)
    return 0 if doc["ok"] else 1
