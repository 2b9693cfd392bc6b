"""``ablation``: notebook 004's ``ablation_study``: ResNet18 with BatchNorm, without it, with dropout (the results
dict keeps the notebook's keys)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from flax_resnet import tables
from flax_resnet.config import RunConfig
from flax_resnet.experiments import common
from flax_resnet.experiments.common import Context, Outcome, Report, fmt
from flax_resnet.experiments.settings import ABLATION
from flax_resnet.experiments.settings import AblationSettings as Settings

__all__ = ["BASE", "CONFIGURATIONS", "NAME", "QUICK", "Settings", "run", "run_ablation"]

NAME, BASE, QUICK = ABLATION.name, ABLATION.base, ABLATION.quick
# the notebook's result keys -> (legend, model, colour)
CONFIGURATIONS: dict[str, tuple[str, str, str]] = {
    "with_bn": ("ResNet18 with BatchNorm", "ResNet18", "#22c55e"),
    "without_bn": ("ResNet18 without BatchNorm", "ResNet18NoBN", "#ef4444"),
    "with_dropout": ("ResNet18 with dropout", "ResNet18Dropout", "#3b82f6"),
}


def run(config: RunConfig = BASE, settings: Settings = Settings(), *, progress: Callable[..., Any] | None = None,
        log: Callable[[str], None] | None = None) -> Outcome:
    """Train the three configurations as ``config`` says (not --init-from: BatchNorm-free ResNet18 has other
    weights) and write their curves and table to ``config.output.out_dir``."""
    common.refuse(NAME, config, BASE, "its three networks have different weights", "init_from")
    return common.run_experiment(NAME, config, settings, lambda ctx: run_ablation(ctx, settings), progress=progress,
                                 log=log)


def run_ablation(ctx: Context, settings: Settings = Settings()) -> Report:
    """Train the three configurations with ``recipe`` from the same seed; one figure, one table."""
    from flax_resnet import plots  # matplotlib, the [plots] extra (run_experiment requires it)

    recipe, dropout_p = ctx.config.recipe, settings.dropout_p
    runs = {key: ctx.train(label, model, {"p": dropout_p} if model == "ResNet18Dropout" else {}, model)
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
