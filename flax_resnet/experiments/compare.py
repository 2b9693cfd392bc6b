"""``compare``: one recipe trained in Flax and in PyTorch from the same weights on the same batches.

torch draws the initial weights (or ``--init-from`` gives them), loaded into both models; both loops read the
engine's batch stream for the seed (``torch_ref.train`` replays it), so the curves differ only by the frameworks'
arithmetic (and dropout's masks). In float32 they drift apart slowly, as training amplifies rounding differences;
in float64 they agree.
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from flax_resnet import builders, registry, tables
from flax_resnet.config import RunConfig
from flax_resnet.experiments import common
from flax_resnet.experiments.common import Context, Outcome, Report, fmt
from flax_resnet.experiments.settings import COMPARE
from flax_resnet.experiments.settings import CompareSettings as Settings

__all__ = ["BASE", "NAME", "QUICK", "Settings", "run", "run_compare", "torch_initial_weights"]

NAME, BASE, QUICK = COMPARE.name, COMPARE.base, COMPARE.quick
FRAMEWORKS = {"jax": ("Flax (JAX)", {"color": "#2563eb", "marker": "o", "linestyle": "-", "markersize": 4}),
              "torch": ("PyTorch", {"color": "#ee4c2c", "marker": "s", "linestyle": "--", "markersize": 4})}


def run(config: RunConfig = BASE, settings: Settings = Settings(), *, progress: Callable[..., Any] | None = None,
        log: Callable[[str], None] | None = None) -> Outcome:
    """Train ``config.model`` in both frameworks (its ``framework`` is not used; --parallel holds for the Flax run)
    and write the curves and timings to ``config.output.out_dir``. Not bf16: the torch reference trains in the
    notebooks' float32."""
    common.refuse(NAME, config, BASE, "the torch reference trains in --dtype, so both runs do", "precision")
    return common.run_experiment(NAME, config, settings, run_compare, needs_torch=True, progress=progress, log=log)


def torch_initial_weights(model: str, model_kwargs: Mapping[str, Any], seed: int) -> dict[str, Any]:
    """torch's initialisation of ``model`` for ``seed``, as a state_dict that both frameworks start from."""
    torch_model = builders.build_torch(model, model_kwargs, seed=seed)
    return {k: v.detach().clone() for k, v in torch_model.state_dict().items()}


def run_compare(ctx: Context) -> Report:
    """Train the context's model in both frameworks from the same initial weights (``init_from``, or torch's
    initialisation for the context's seed); figure and table."""
    from flax_resnet import plots  # matplotlib, the [plots] extra (run_experiment requires it)

    config = ctx.config
    model, dtype = config.model.name, config.dtype
    recipe = dataclasses.replace(config.recipe, model=model)
    model_kwargs = registry.model_kwargs(model, config.model.kwargs, recipe.name)
    start = config.model.init_from
    if start is None:
        start = torch_initial_weights(model, model_kwargs, ctx.seed)
    runs = {fw: ctx.train(label, model, model_kwargs, fw, recipe=recipe, framework=fw, init_from=start)
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
    source = (f"torch's initialisation for seed {ctx.seed} (ported into Flax)" if config.model.init_from is None
              else f"the weights of {config.model.init_from}")
    notes = [f"Largest per-epoch difference in training loss: {fmt(loss_gap, '.2e')}; final test accuracy, Flax "
             f"minus torch: {fmt(acc_gap, '+.2f')} points.",
             f"{recipe.name} recipe: {recipe.epochs} epochs, batch {recipe.batch_size}, lr {recipe.lr:g}, {dtype}; "
             f"both from {source} and the same batch stream; "
             f"{ctx.data_note}. Throughput leaves out the first epoch (compilation) when there are more. In float32 "
             "the trajectories drift apart as training amplifies rounding differences; --dtype float64 shows them "
             "agree."]
    results = {"model": model, "model_kwargs": model_kwargs, "dtype": dtype, "recipe": dataclasses.asdict(recipe),
               "data": ctx.data_note, "runs": {fw: dataclasses.asdict(r) for fw, r in runs.items()}, "timing": timing,
               "max_train_loss_difference": loss_gap, "test_acc_difference": acc_gap}
    return Report("Flax vs PyTorch: same weights, same batches", table, results, fig, notes)
