"""``compare``: one recipe trained in Flax and in PyTorch from the same weights on the same batches.

torch draws the initial weights, ported into the Flax model; both loops read the engine's batch stream for the
seed (``torch_ref.train`` replays it), so the curves differ only by the frameworks' arithmetic (and dropout's
masks). In float32 they drift apart slowly, as training amplifies rounding differences; in float64 they agree.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
from collections.abc import Callable
from typing import Any

import numpy as np

from flax_resnet import registry, tables
from flax_resnet.cli import options
from flax_resnet.experiments import common
from flax_resnet.experiments.common import Context, Report, fmt
from flax_resnet.recipes import RECIPES, Recipe

__all__ = ["COMMAND", "run_compare"]

QUICK = {"dataset": "synthetic", "train_samples": 128, "test_samples": 64, "epochs": 2, "batch_size": 32,
         "eval_batch_size": 64}
FRAMEWORKS = {"jax": ("Flax (JAX)", {"color": "#2563eb", "marker": "o", "linestyle": "-", "markersize": 4}),
              "torch": ("PyTorch", {"color": "#ee4c2c", "marker": "s", "linestyle": "--", "markersize": 4})}


def run_compare(model: str, model_kwargs: dict[str, Any], recipe: Recipe, ctx: Context, *,
                dtype: str = "float32") -> Report:
    """Train ``model`` in both frameworks from torch's initial weights for the context's seed; figure and table.
    ``dtype`` 'float64' turns ``jax_enable_x64`` on."""
    import jax

    from flax_resnet import plots

    if dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    torch_model = registry.build_torch(model, model_kwargs, seed=ctx.seed)
    state_dict = {k: v.detach().clone() for k, v in torch_model.state_dict().items()}
    runs = {fw: ctx.train(label, model, model_kwargs, recipe, fw, framework=fw, state_dict=state_dict, dtype=dtype)
            for fw, (label, _) in FRAMEWORKS.items()}
    curves = [(run.label, run.history, FRAMEWORKS[fw][1]) for fw, run in runs.items()]
    panels = (*plots.CURVE_PANELS, ("images_per_sec", "Training throughput", "images/s"))
    fig, _ = plots.curves_figure(curves, panels=panels, width=4.0, height=3.6,
                                 title=f"{registry.constructor_call(model, model_kwargs)}, "
                                       f"{recipe.name}, {dtype}: same initial weights, same batches")

    rows, timing = [], {}
    for fw, run in runs.items():
        times, rates = run.history["epoch_time"], run.history["images_per_sec"]
        # the epochs after the first (which includes compilation), or the only one
        later, rate = statistics.fmean(times[1:] or times), statistics.median(rates[1:] or rates)
        timing[fw] = {"first_epoch_time": times[0], "later_epoch_time_mean": later, "images_per_sec_median": rate}
        rows.append([run.label, *run.final_cells(), fmt(times[0], ".1f", " s"), fmt(later, ".1f", " s"),
                     fmt(rate, ".0f")])
    table = tables.format_table(["framework", "final train loss", "final train acc", "final test acc",
                                 "first epoch (with compile)", "later epochs (mean)", "images/s (median)"], rows,
                                markdown=True)
    jax_loss, torch_loss = (np.asarray(runs[fw].history["train_loss"], float) for fw in ("jax", "torch"))
    loss_gap = float(np.max(np.abs(jax_loss - torch_loss)))
    acc_gap = runs["jax"].final("test_acc") - runs["torch"].final("test_acc")
    notes = [f"Largest per-epoch difference in training loss: {fmt(loss_gap, '.2e')}; final test accuracy, Flax "
             f"minus torch: {fmt(acc_gap, '+.2f')} points.",
             f"{recipe.name} recipe: {recipe.epochs} epochs, batch {recipe.batch_size}, lr {recipe.lr:g}, {dtype}; "
             f"both from torch's initialisation for seed {ctx.seed} (ported into Flax) and the same batch stream; "
             f"{ctx.data_note}. Throughput leaves out the first epoch (compilation) when there are more. In float32 "
             "the trajectories drift apart as training amplifies rounding differences; --dtype float64 shows them "
             "agree."]
    results = {"model": model, "model_kwargs": model_kwargs, "dtype": dtype, "recipe": dataclasses.asdict(recipe),
               "data": ctx.data_note, "runs": {fw: dataclasses.asdict(r) for fw, r in runs.items()}, "timing": timing,
               "max_train_loss_difference": loss_gap, "test_acc_difference": acc_gap}
    return Report("Flax vs PyTorch: same weights, same batches", table, results, fig, notes)


def _add_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("what to train")
    g.add_argument("--model", choices=registry.model_names(), default="SimpleResNet", metavar="NAME",
                   help="model class (default: %(default)s)")
    g.add_argument("--recipe", choices=list(RECIPES), metavar="NAME",
                   help="training recipe (default: the model's notebook's)")
    options.add(p, *options.MODEL_OPTIONS)
    g.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                   help="floating-point type of weights and computation in both frameworks (default: %(default)s)")
    common.add_run_options(p, framework=False)


def _plan(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Callable[[Context], Report]:
    spec = registry.get_spec(args.model)
    if args.quick and args.n_blocks is None and "n_blocks" in spec.args:
        args.n_blocks = 1
    recipe_name = args.recipe or spec.recipe
    try:
        kwargs = registry.model_kwargs(args.model, options.given(args, options.MODEL_OPTIONS), recipe_name)
    except ValueError as e:
        parser.error(str(e))
    recipe = dataclasses.replace(common.make_recipe(recipe_name, args, parser), model=args.model)
    return lambda ctx: run_compare(args.model, kwargs, recipe, ctx, dtype=args.dtype)


COMMAND = common.Command(
    "compare", help="train one recipe in Flax and in PyTorch from the same weights and batches; curves, speed",
    description="Train one model with one recipe in JAX/Flax and in the PyTorch reference, both from torch's initial "
                "weights (ported into Flax) and on the same batch stream, and write the curves overlaid with the "
                "throughput per epoch (compare.png) and a table of final accuracies, epoch times and images/s.",
    add_options=_add_options, plan=_plan, needs_torch=True,
    quick=QUICK, epilog=", --n-blocks 1 where the model takes it")
