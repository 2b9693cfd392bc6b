"""``ablation``: notebook 004's ``ablation_study``: ResNet18 with BatchNorm, without it, with dropout (the results
dict keeps the notebook's keys)."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable

from flax_resnet import tables
from flax_resnet.cli import shell as commands
from flax_resnet.experiments import common
from flax_resnet.experiments.common import Context, Report, fmt
from flax_resnet.recipes import Recipe

__all__ = ["COMMAND", "CONFIGURATIONS", "run_ablation"]

# the notebook's result keys -> (legend, model, colour)
CONFIGURATIONS: dict[str, tuple[str, str, str]] = {
    "with_bn": ("ResNet18 with BatchNorm", "ResNet18", "#22c55e"),
    "without_bn": ("ResNet18 without BatchNorm", "ResNet18NoBN", "#ef4444"),
    "with_dropout": ("ResNet18 with dropout", "ResNet18Dropout", "#3b82f6"),
}
QUICK = {"dataset": "synthetic", "image_size": 8, "train_samples": 64, "test_samples": 16, "epochs": 2,
         "batch_size": 32, "eval_batch_size": 32}


def run_ablation(recipe: Recipe, ctx: Context, *, dropout_p: float = 0.2) -> Report:
    """Train the three configurations with ``recipe`` from the same seed; one figure, one table."""
    from flax_resnet import plots

    runs = {key: ctx.train(label, model, {"p": dropout_p} if model == "ResNet18Dropout" else {}, recipe, model)
            for key, (label, model, _) in CONFIGURATIONS.items()}
    curves = [(run.label, run.history, {"color": CONFIGURATIONS[key][2], "marker": "o", "markersize": 3})
              for key, run in runs.items()]
    panels = (("train_loss", "Training Loss", "Loss"), ("test_loss", "Test Loss", "Loss"), *plots.CURVE_PANELS[1:])
    fig, axes = plots.curves_figure(curves, panels=panels, width=4.0, height=3.6)
    axes[1].set_yscale("log")  # a network without BatchNorm can start with test losses in the thousands

    rows = [[key, run.model, f"{run.params:,}", *run.final_cells(),
             fmt(max(run.history["test_acc"], default=float("nan")), ".2f", "%"), fmt(run.train_time, ".1f", " s")]
            for key, run in runs.items()]
    table = tables.format_table(["configuration", "model", "parameters", "final train loss", "final train acc",
                                 "final test acc", "best test acc", "time"], rows, align="llrrrrrr", markdown=True)
    notes = [f"resnet18-cifar recipe: {recipe.epochs} epochs (cosine over the run), batch {recipe.batch_size}, "
             f"lr {recipe.lr:g}, augmentation {'on' if recipe.augment else 'off'}, dropout p = {dropout_p:g}, "
             f"{ctx.framework}; {ctx.data_note}."]
    results = {"results": {key: run.final("test_acc") for key, run in runs.items()},
               "recipe": dataclasses.asdict(recipe), "dropout_p": dropout_p, "data": ctx.data_note,
               "runs": {k: dataclasses.asdict(r) for k, r in runs.items()}}
    return Report("Ablation: BatchNorm and dropout in ResNet18", table, results, fig, notes)


def _add_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dropout-p", type=commands.finite_float(minimum=0, maximum=1, exclusive_max=True), default=0.2,
                   metavar="X",
                   help="dropout probability after each block of the dropout configuration (default: %(default)s)")
    common.add_run_options(p)


def _plan(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Callable[[Context], Report]:
    recipe = common.make_recipe("resnet18-cifar", args, parser, epochs=10)  # the notebook's ablation_study(epochs=10)
    return lambda ctx: run_ablation(recipe, ctx, dropout_p=args.dropout_p)


COMMAND = common.Command(
    "ablation", help="notebook 004's ablation study: ResNet18 with BatchNorm, without, with dropout",
    description="Train ResNet18, ResNet18NoBN (BatchNorm replaced by identity) and ResNet18Dropout (dropout after "
                "each block) with notebook 004's recipe for the ablation study's 10 epochs, and write their curves "
                "in one figure (ablation.png), the final test accuracies (results.json: results.with_bn, without_bn, "
                "with_dropout, as the notebook's dict) and a table.",
    add_options=_add_options, plan=_plan, quick=QUICK)
