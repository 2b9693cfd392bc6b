"""The notebooks' experiments as commands of ``train.py``, one module each (``COMMANDS``), over ``common``.
Importing this package loads neither torch, matplotlib nor tensorflow-datasets: the experiments do when they run.
"""

from __future__ import annotations

import argparse
from typing import Any

from flax_resnet.experiments import ablation, common, compare, depth, init_variance, landscape, plain_vs_residual

__all__ = ["COMMANDS", "add_experiments_parser"]

COMMANDS: tuple[common.Command, ...] = (plain_vs_residual.COMMAND, depth.COMMAND, init_variance.COMMAND,
                                        ablation.COMMAND, landscape.COMMAND, compare.COMMAND)


def add_experiments_parser(subparsers: Any) -> list[argparse.ArgumentParser]:
    """Register one subcommand per experiment (``cli.SUBCOMMANDS`` calls this when it builds the parser)."""
    return [common.register(subparsers, command) for command in COMMANDS]
