"""``plain-vs-residual``: notebook 000's comparison of PlainDeepCNN and SimpleResNet at the same depth.

Both networks are trained with the same recipe (notebook 000's: 15 epochs, SGD 0.1, MultiStepLR [8, 12]) at
n_blocks=5, i.e. 1 + 6n = 31 conv layers, as the notebook does. Outputs: the notebook's three plots (training
loss, training accuracy, test accuracy per epoch; plain amber, ResNet green) and its summary table (conv
layers, parameters, final accuracies, training time, the ResNet's advantage). Each run keeps its
checkpoints in ``OUT/runs/<model>``, so ``landscape`` can read the two trained networks afterwards.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from typing import Any

from flax_resnet.experiments import common
from flax_resnet.experiments.common import Context, Report, Run, fmt
from flax_resnet.recipes import Recipe

__all__ = ["COMMAND", "FIGURE", "run_plain_vs_residual"]

NAME = "plain-vs-residual"
FIGURE = "plain_vs_residual.png"
QUICK = {"dataset": "synthetic", "n_blocks": 1, "train_samples": 256, "test_samples": 64, "epochs": 4,
         "batch_size": 32, "eval_batch_size": 64}


def run_plain_vs_residual(recipe: Recipe, dataset: Any, ctx: Context, *, n_blocks: int = 5, framework: str = "jax",
                          seed: int = 0, resume: bool = False, overwrite: bool = False,
                          data_note: str = "") -> Report:
    """Train PlainDeepCNN(n_blocks) and SimpleResNet(n_blocks) alike; the notebook's figure and table."""
    runs: dict[str, Run] = {}
    for key, label, model in (("plain", "Plain CNN", "PlainDeepCNN"), ("resnet", "ResNet", "SimpleResNet")):
        runs[key] = common.train_run(label, model, {"n_blocks": n_blocks}, recipe, dataset, framework=framework,
                                     seed=seed, out_dir=ctx.run_dir(model), resume=resume, overwrite=overwrite,
                                     log=ctx.log, progress=ctx.progress)
    from flax_resnet import plots

    figure = plots.plot_comparison({r.label: r.history for r in runs.values()}, ctx.out / FIGURE)

    plain, resnet = runs["plain"], runs["resnet"]
    advantage = resnet.final("test_acc") - plain.final("test_acc")
    train_gap = resnet.final("train_acc") - plain.final("train_acc")
    rows = [
        ["Conv layers", plain.conv_layers, resnet.conv_layers],
        ["Parameters", f"{plain.params:,}", f"{resnet.params:,}"],
        ["Final train acc", fmt(plain.final("train_acc"), ".1f", "%"), fmt(resnet.final("train_acc"), ".1f", "%")],
        ["Final test acc", fmt(plain.final("test_acc"), ".1f", "%"), fmt(resnet.final("test_acc"), ".1f", "%")],
        ["Training time", fmt(plain.train_time, ".1f", " s"), fmt(resnet.train_time, ".1f", " s")],
    ]
    table = common.markdown_table(["", "Plain CNN", "ResNet"], rows)
    notes = [f"ResNet advantage: {fmt(advantage, '+.1f', '%')} test accuracy, "
             f"{fmt(train_gap, '+.1f', '%')} training accuracy.",
             f"{recipe.name} recipe: {recipe.epochs} epochs, batch {recipe.batch_size}, lr {recipe.lr:g}, "
             f"{framework}; {data_note}. Conv layers: 1 + 6n with n = {n_blocks} (1x1 projection shortcuts "
             "not counted)."]
    results = {"n_blocks": n_blocks, "recipe": dataclasses.asdict(recipe), "data": data_note,
               "runs": {k: r.as_json() for k, r in runs.items()},
               "resnet_advantage_test_acc": advantage, "resnet_advantage_train_acc": train_gap}
    return Report(f"Plain vs residual, {plain.conv_layers} conv layers", table, results, [figure], notes)


def _add_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("models")
    g.add_argument("--n-blocks", type=int, metavar="N",
                   help="blocks per stage of both networks, 1 + 6n conv layers (default: 5, the notebook's 31 layers)")
    common.add_run_options(p, NAME)


def _plan(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Callable[[Context], Report]:
    common.prepare_run_args(args, parser, QUICK)
    n_blocks = 5 if args.n_blocks is None else args.n_blocks
    if n_blocks < 1:
        parser.error("--n-blocks must be at least 1")
    recipe = common.make_recipe("plain-vs-residual", args, parser)

    def work(ctx: Context) -> Report:
        dataset = common.load_data(args)
        return run_plain_vs_residual(recipe, dataset, ctx, n_blocks=n_blocks, framework=args.framework,
                                     **common.run_settings(args, dataset))

    return work


COMMAND = common.Command(
    NAME, help="notebook 000: PlainDeepCNN vs SimpleResNet at 31 conv layers, three plots and a table",
    description="Train notebook 000's plain deep CNN and its ResNet at the same depth (n_blocks=5: 31 conv layers) "
                "with the same recipe, and write the notebook's three plots (training loss, training accuracy, "
                f"test accuracy per epoch) as {FIGURE}, its summary table as summary.md and the histories as "
                "results.json. Each run's checkpoints stay in OUT/runs/<model> (for `landscape`).",
    add_options=_add_options, plan=_plan,
    epilog=common.quick_epilog(QUICK) + "\n\nexample:\n  python train.py plain-vs-residual --out runs/pvr\n"
                                        "  python train.py landscape --plain runs/pvr/runs/PlainDeepCNN "
                                        "--residual runs/pvr/runs/SimpleResNet")
