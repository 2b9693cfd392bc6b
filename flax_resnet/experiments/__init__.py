"""The notebooks' experiments as commands of ``train.py``, one module each.

| command             | module              | what it shows                                                        |
| ------------------- | ------------------- | -------------------------------------------------------------------- |
| ``plain-vs-residual`` | ``plain_vs_residual`` | notebook 000: PlainDeepCNN vs SimpleResNet at 31 conv layers        |
| ``depth``           | ``depth``           | PlainNet and SimpleResNet at two depths each: degradation            |
| ``he-init``         | ``init_variance``   | notebook 004's verify_he_init: variance per layer, He vs default     |
| ``ablation``        | ``ablation``        | notebook 004: ResNet18 with BatchNorm, without, with dropout         |
| ``landscape``       | ``landscape``       | notebook 004: 1-D loss landscape of trained plain/residual networks  |
| ``compare``         | ``compare``         | Flax vs PyTorch: same weights, same batches; curves and speed        |

Each writes its figure (PNG), ``summary.md`` (the table) and ``results.json`` (raw numbers) into ``--out``,
prints the table, and has ``--quick`` (synthetic data, small models, a few steps) for CI. The shared
plumbing (options, quick mode, training a run, output files) is in ``common``. Importing this package loads
neither torch, matplotlib nor tensorflow-datasets (JAX and the Flax models come with ``flax_resnet`` itself):
the experiments import them when they run.
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
