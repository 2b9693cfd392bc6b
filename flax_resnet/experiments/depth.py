"""``depth``: the degradation problem in one figure: plain networks get worse with depth, residual ones do not.

SimpleResNet(n_blocks=4) has 25 conv layers, as deep as notebook 004's deep PlainNet [3, 3, 3, 3]. The default
recipe is notebook 000's, without augmentation: degradation is about fitting the training data.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from flax_resnet import tables
from flax_resnet.config import RunConfig
from flax_resnet.experiments import common
from flax_resnet.experiments.common import Context, Outcome, Report, fmt
from flax_resnet.experiments.settings import DEPTH
from flax_resnet.experiments.settings import DepthSettings as Settings

__all__ = ["BASE", "NAME", "QUICK", "Settings", "run", "run_depth"]

NAME, BASE, QUICK = DEPTH.name, DEPTH.base, DEPTH.quick


def run(config: RunConfig = BASE, settings: Settings = Settings(), *, progress: Callable[..., Any] | None = None,
        log: Callable[[str], None] | None = None) -> Outcome:
    """Train every depth as ``config`` says (not --init-from: the depths are different models) and write one
    figure and one table to ``config.output.out_dir``."""
    common.refuse(NAME, config, BASE, "it trains models of several depths from their own initialisation", "init_from")
    return common.run_experiment(NAME, config, settings, lambda ctx: run_depth(ctx, settings), progress=progress,
                                 log=log)


def run_depth(ctx: Context, settings: Settings = Settings()) -> Report:
    """Train every PlainNet and SimpleResNet depth with ``recipe``; one figure, one table."""
    from flax_resnet import plots  # matplotlib, the [plots] extra (run_experiment requires it)

    recipe = ctx.config.recipe
    families = {  # colour, marker and runs of each family
        "PlainNet": (plots.PLAIN_COLOR, "o", [ctx.train(f"PlainNet {list(b)}", "PlainNet", {"num_blocks": b},
                                                        "PlainNet-" + "-".join(map(str, b)))
                                              for b in settings.plain_blocks]),
        "SimpleResNet": (plots.RESNET_COLOR, "s", [ctx.train(f"SimpleResNet n={n}", "SimpleResNet", {"n_blocks": n},
                                                             f"SimpleResNet-n{n}") for n in settings.resnet_blocks])}
    curves = []
    for color, marker, runs in families.values():
        runs.sort(key=lambda r: r.conv_layers)
        curves += [(f"{run.label} ({run.conv_layers} conv)", run.history,  # the deepest solid, shallower dashed
                    {"color": color, "marker": marker, "markersize": 4, "alpha": 1.0 if run is runs[-1] else 0.6,
                     "linestyle": "-" if run is runs[-1] else "--"}) for run in runs]
    fig, axes = plots.curves_figure(curves, width=4.2, height=3.6, extra=1)
    rows, drops = [], {}
    for family, (color, marker, runs) in families.items():
        axes[-1].plot([r.conv_layers for r in runs], [r.final("train_acc") for r in runs], marker=marker,
                      color=color, label=family)
        for run in runs:
            blocks = run.model_kwargs.get("num_blocks", run.model_kwargs.get("n_blocks"))
            rows.append([family, blocks if isinstance(blocks, int) else list(blocks), run.conv_layers,
                         f"{run.params:,}", *run.final_cells(".1f"), fmt(run.train_time, ".1f", " s")])
        if len(runs) > 1:
            drops[family] = runs[-1].final("train_acc") - runs[0].final("train_acc")
    axes[-1].set(xlabel="Conv layers", ylabel="Final training accuracy (%)", title="Final training accuracy vs depth")
    axes[-1].grid(True, alpha=0.3)
    axes[-1].legend(fontsize=8)
    table = tables.format_table(["network", "blocks", "conv layers", "parameters", "final train loss",
                                 "final train acc", "final test acc", "time"], rows, align="llrrrrrr", markdown=True)
    notes = [f"{recipe.name} recipe for every run: {recipe.epochs} epochs, batch {recipe.batch_size}, "
             f"lr {recipe.lr:g}, {ctx.framework}; {ctx.data_note}."]
    if drops:
        notes.insert(0, "Deepest minus shallowest final training accuracy: " + ", ".join(
            f"{family} {fmt(d, '+.1f')} points" for family, d in drops.items())
            + " (degradation shows as a negative number for the plain network).")
    results = {"recipe": dataclasses.asdict(recipe), "data": ctx.data_note,
               "runs": {family: [dataclasses.asdict(r) for r in runs] for family, (_, _, runs) in families.items()},
               "deep_minus_shallow_train_acc": drops}
    return Report("Depth: plain vs residual networks", table, results, fig, notes)
