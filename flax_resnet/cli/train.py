"""``train``: the options as a ``config.RunConfig``, handed to ``training.train`` as it is."""

from __future__ import annotations

import argparse
import sys

from flax_resnet import registry, training
from flax_resnet.cli import options, shell


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    config = options.run_config(args)  # a refusal is a usage error (exit 2), before anything is read or written
    out = config.output.out_dir
    if config.data.dataset == "cifar10":
        shell.quiet_tfds(config.output.progress)
    try:
        result = training.train(config, progress=shell.progress_factory(True), log=shell.write_line)
    except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM: the epochs done are saved, the --out lock is released
        print(f"\n{shell.interrupted_word(e)}; continue with the same command and --resume (--out {out})",
              file=sys.stderr)
        return shell.interrupted_code(e)
    accuracy = (result.history["test_acc"] or [None])[-1]
    final = "" if accuracy is None else f" final test accuracy {accuracy:.2f}%"
    model = registry.constructor_call(config.model.name, config.model.kwargs)
    print(f"done: {model} ({config.recipe.name}, {config.framework}){final}; outputs in {out}")
    return 0
