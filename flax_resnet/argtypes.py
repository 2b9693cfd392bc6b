"""Argparse types for numbers in a range. A module of their own, importing nothing of the project, because the
model registry (its model options) and the command-line modules both use them and the registry sits below the CLI."""

from __future__ import annotations

import argparse
import functools
import math
from collections.abc import Callable
from typing import Any

__all__ = ["finite_float", "number", "seed"]


def number(kind: type = float, *, minimum: float | None = None, maximum: float | None = None,
           exclusive_min: bool = False, exclusive_max: bool = False, why: str = "") -> Callable[[str], Any]:
    """An argparse type for a finite ``kind`` (float or int) in a range: nan and inf are refused at parse time (they
    would train for a while and then diverge, or silently give meaningless results)."""
    noun = "an integer" if kind is int else "a finite number"

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        low_ok = minimum is None or (value > minimum if exclusive_min else value >= minimum)
        high_ok = maximum is None or (value < maximum if exclusive_max else value <= maximum)
        if not (low_ok and high_ok) or (kind is float and not math.isfinite(value)):
            limits = ((">" if exclusive_min else ">=", minimum), ("<" if exclusive_max else "<=", maximum))
            rule = " and ".join(f"{op} {limit}" for op, limit in limits if limit is not None)
            raise argparse.ArgumentTypeError(f"must be {noun}{' ' + rule if rule else ''}{why}, got {text}")
        return value

    return parse


finite_float = functools.partial(number, float)
# JAX seeds are 32-bit: a larger seed would wrap (2**32 trained exactly like 0)
seed = number(int, minimum=0, maximum=2**32 - 1, why=" (JAX seeds are 32-bit)")
