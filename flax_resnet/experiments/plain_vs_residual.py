"""``plain-vs-residual``: notebook 000's comparison of PlainDeepCNN and SimpleResNet at the same depth (its recipe,
figure and table); the runs' checkpoints in ``OUT/runs/<model>`` are what ``landscape`` reads."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable

from flax_resnet import tables
from flax_resnet.cli import shell as commands
from flax_resnet.experiments import common
from flax_resnet.experiments.common import Context, Report, fmt
from flax_resnet.recipes import Recipe

__all__ = ["COMMAND", "run_plain_vs_residual"]

QUICK = {"dataset": "synthetic", "n_blocks": 1, "train_samples": 256, "test_samples": 64, "epochs": 4,
         "batch_size": 32, "eval_batch_size": 64}


def run_plain_vs_residual(recipe: Recipe, ctx: Context, *, n_blocks: int = 5) -> Report:
    """Train PlainDeepCNN(n_blocks) and SimpleResNet(n_blocks) alike; the notebook's figure and table."""
    from flax_resnet import plots

    plain, resnet = (ctx.train(label, model, {"n_blocks": n_blocks}, recipe, model)
                     for label, model in (("Plain CNN", "PlainDeepCNN"), ("ResNet", "SimpleResNet")))
    fig = plots.comparison_figure({run.label: run.history for run in (plain, resnet)})
    advantage = resnet.final("test_acc") - plain.final("test_acc")
    train_gap = resnet.final("train_acc") - plain.final("train_acc")
    rows = [
        ["Conv layers", plain.conv_layers, resnet.conv_layers],
        ["Parameters", f"{plain.params:,}", f"{resnet.params:,}"],
        ["Final train acc", fmt(plain.final("train_acc"), ".1f", "%"), fmt(resnet.final("train_acc"), ".1f", "%")],
        ["Final test acc", fmt(plain.final("test_acc"), ".1f", "%"), fmt(resnet.final("test_acc"), ".1f", "%")],
        ["Training time", fmt(plain.train_time, ".1f", " s"), fmt(resnet.train_time, ".1f", " s")],
    ]
    table = tables.format_table(["", "Plain CNN", "ResNet"], rows, markdown=True)
    notes = [f"ResNet advantage: {fmt(advantage, '+.1f', '%')} test accuracy, "
             f"{fmt(train_gap, '+.1f', '%')} training accuracy.",
             f"{recipe.name} recipe: {recipe.epochs} epochs, batch {recipe.batch_size}, lr {recipe.lr:g}, "
             f"{ctx.framework}; {ctx.data_note}. Conv layers: 1 + 6n with n = {n_blocks} (1x1 projection shortcuts "
             "not counted)."]
    results = {"n_blocks": n_blocks, "recipe": dataclasses.asdict(recipe), "data": ctx.data_note,
               "runs": {"plain": dataclasses.asdict(plain), "resnet": dataclasses.asdict(resnet)},
               "resnet_advantage_test_acc": advantage, "resnet_advantage_train_acc": train_gap}
    return Report(f"Plain vs residual, {plain.conv_layers} conv layers", table, results, fig, notes)


def _add_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("models")
    g.add_argument("--n-blocks", type=commands.number(int, minimum=1), metavar="N",
                   help="blocks per stage of both networks, 1 + 6n conv layers (default: 5, the notebook's 31 layers)")
    common.add_run_options(p)


def _plan(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Callable[[Context], Report]:
    recipe = common.make_recipe("plain-vs-residual", args, parser)
    return lambda ctx: run_plain_vs_residual(recipe, ctx, n_blocks=args.n_blocks or 5)


COMMAND = common.Command(
    "plain-vs-residual", help="notebook 000: PlainDeepCNN vs SimpleResNet at 31 conv layers, three plots and a table",
    description="Train notebook 000's plain deep CNN and its ResNet at the same depth (n_blocks=5: 31 conv layers) "
                "with the same recipe, and write the notebook's three plots (training loss, training accuracy, test "
                "accuracy per epoch) as plain_vs_residual.png, its summary table as summary.md and the histories as "
                "results.json. Each run's checkpoints stay in OUT/runs/<model> (for `landscape`).",
    add_options=_add_options, plan=_plan, quick=QUICK,
    epilog="\n\nexample:\n  {prog} plain-vs-residual --out runs/pvr\n"
           "  {prog} landscape --plain runs/pvr/runs/PlainDeepCNN --residual runs/pvr/runs/SimpleResNet")
