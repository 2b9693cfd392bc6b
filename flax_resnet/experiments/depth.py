"""``depth``: the degradation problem in one figure: plain networks get worse with depth, residual ones do not.

SimpleResNet(n_blocks=4) has 25 conv layers, as deep as notebook 004's deep PlainNet [3, 3, 3, 3]. The default
recipe is notebook 000's, without augmentation: degradation is about fitting the training data.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable, Sequence

from flax_resnet import tables
from flax_resnet.cli import shell as commands
from flax_resnet.experiments import common
from flax_resnet.experiments.common import Context, Report, fmt
from flax_resnet.recipes import RECIPES, Recipe

__all__ = ["COMMAND", "run_depth"]

QUICK = {"dataset": "synthetic", "plain_blocks": [(1, 1, 1, 1), (2, 2, 2, 2)], "resnet_blocks": [1, 2],
         "image_size": 8, "train_samples": 64, "test_samples": 32, "epochs": 2, "batch_size": 32,
         "eval_batch_size": 32}


def run_depth(recipe: Recipe, ctx: Context, *, plain_blocks: Sequence[Sequence[int]] = ((1, 1, 1, 1), (3, 3, 3, 3)),
              resnet_blocks: Sequence[int] = (1, 4)) -> Report:
    """Train every PlainNet and SimpleResNet depth with ``recipe``; one figure, one table."""
    from flax_resnet import plots

    families = {  # colour, marker and runs of each family
        "PlainNet": (plots.PLAIN_COLOR, "o", [ctx.train(f"PlainNet {list(b)}", "PlainNet", {"num_blocks": tuple(b)},
                                                        recipe, "PlainNet-" + "-".join(map(str, b)))
                                              for b in plain_blocks]),
        "SimpleResNet": (plots.RESNET_COLOR, "s", [ctx.train(f"SimpleResNet n={n}", "SimpleResNet", {"n_blocks": n},
                                                             recipe, f"SimpleResNet-n{n}") for n in resnet_blocks])}
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


def _blocks_spec(text: str) -> tuple[int, ...]:
    try:
        blocks = tuple(int(b) for b in text.split(","))
    except ValueError:
        blocks = ()
    if len(blocks) != 4 or min(blocks) < 1:
        raise argparse.ArgumentTypeError(f"expected four block counts >= 1 like 3,3,3,3, got {text!r}")
    return blocks


def _add_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("models")
    g.add_argument("--plain-blocks", type=_blocks_spec, nargs="+", metavar="A,B,C,D",
                   help="PlainNet depths, blocks in its four layers (default: 1,1,1,1 3,3,3,3, notebook 004's "
                        "shallow and deep)")
    g.add_argument("--resnet-blocks", type=commands.number(int, minimum=1), nargs="+", metavar="N",
                   help="SimpleResNet depths, blocks per stage (default: 1 4, i.e. 7 and 25 conv layers)")
    g.add_argument("--recipe", choices=list(RECIPES), default="plain-vs-residual",
                   help="one recipe for all runs (default: %(default)s)")
    common.add_run_options(p)


def _plan(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Callable[[Context], Report]:
    recipe = common.make_recipe(args.recipe, args, parser)
    return lambda ctx: run_depth(recipe, ctx, plain_blocks=args.plain_blocks or ((1, 1, 1, 1), (3, 3, 3, 3)),
                                 resnet_blocks=args.resnet_blocks or (1, 4))


COMMAND = common.Command(
    "depth", help="PlainNet shallow/deep vs SimpleResNet shallow/deep: degradation with depth in one figure",
    description="Train notebook 004's PlainNet at two depths ([1,1,1,1] and [3,3,3,3]) and notebook 000's "
                "SimpleResNet at two depths (n_blocks 1 and 4) with one recipe, and draw their curves and final "
                "training accuracy against depth in one figure (depth.png): the deep plain network trains worse "
                "than the shallow one, the deep residual network does not.",
    add_options=_add_options, plan=_plan, quick=QUICK)
