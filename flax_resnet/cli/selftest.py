"""``selftest``: ``flax_resnet.selftest.run`` into --out, its report printed; exit 1 when it fails."""

from __future__ import annotations

import argparse
import sys

from flax_resnet import selftest
from flax_resnet.config import ConfigError
from flax_resnet.errors import require


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    out = args.out
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a directory.")
    require("torch", "selftest (it compares with the PyTorch models)")
    doc = selftest.run(out, quick=bool(args.quick), skip=tuple(args.skip or ()))
    print(selftest.to_markdown(doc), end="")
    print(f"{'PASS' if doc['ok'] else 'FAIL'}: report in {out}", file=sys.stderr)
    return 0 if doc["ok"] else 1
