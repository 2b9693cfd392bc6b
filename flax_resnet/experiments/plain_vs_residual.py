"""``plain-vs-residual``: notebook 000's comparison of PlainDeepCNN and SimpleResNet at the same depth (its recipe,
figure and table); the runs' checkpoints in ``OUT/runs/<model>`` are what ``landscape`` reads."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from flax_resnet import tables
from flax_resnet.config import RunConfig
from flax_resnet.experiments import common
from flax_resnet.experiments.common import Context, Outcome, Report, fmt
from flax_resnet.experiments.settings import PLAIN_VS_RESIDUAL
from flax_resnet.experiments.settings import PlainVsResidualSettings as Settings

__all__ = ["BASE", "NAME", "QUICK", "Settings", "run", "run_plain_vs_residual"]

NAME, BASE, QUICK = PLAIN_VS_RESIDUAL.name, PLAIN_VS_RESIDUAL.base, PLAIN_VS_RESIDUAL.quick


def run(config: RunConfig = BASE, settings: Settings = Settings(), *, progress: Callable[..., Any] | None = None,
        log: Callable[[str], None] | None = None) -> Outcome:
    """Train both networks as ``config`` says (not --init-from: they are two different models) and write the
    notebook's figure and table to ``config.output.out_dir``."""
    common.refuse(NAME, config, BASE, "it trains two different models from their own initialisation", "init_from")
    return common.run_experiment(NAME, config, settings, lambda ctx: run_plain_vs_residual(ctx, settings),
                                 progress=progress, log=log)


def run_plain_vs_residual(ctx: Context, settings: Settings = Settings()) -> Report:
    """Train PlainDeepCNN(n_blocks) and SimpleResNet(n_blocks) alike; the notebook's figure and table."""
    from flax_resnet import plots  # matplotlib, the [plots] extra (run_experiment requires it)

    recipe, n_blocks = ctx.config.recipe, settings.n_blocks
    plain, resnet = (ctx.train(label, model, {"n_blocks": n_blocks}, model)
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
