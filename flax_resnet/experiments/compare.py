"""``compare``: one recipe trained in Flax and in PyTorch from the same weights on the same batches.

torch draws the initial weights (or ``--init-from`` gives them), loaded into both models; both loops read the
engine's batch stream for the seed (``torch_ref.train`` replays it), so the curves differ only by the frameworks'
arithmetic (and dropout's masks). In float32 training amplifies rounding step after step, so the two runs drift
apart; how far is only readable against a yardstick: each framework is also trained in float64 from the same
weights on the same batches, and its float32 run's distance from its own float64 run is the gap rounding alone
makes (``Settings.yardstick``). In float64 the two frameworks agree closely: that gap is the parity statement.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from flax_resnet import builders, registry, tables
from flax_resnet.config import RunConfig
from flax_resnet.experiments import common
from flax_resnet.experiments.common import Context, Outcome, Report, Run, fmt
from flax_resnet.experiments.settings import COMPARE
from flax_resnet.experiments.settings import CompareSettings as Settings

__all__ = ["BASE", "GAPS", "NAME", "QUICK", "Settings", "gap", "run", "run_compare", "torch_initial_weights"]

NAME, BASE, QUICK = COMPARE.name, COMPARE.base, COMPARE.quick
FRAMEWORKS = {"jax": ("Flax (JAX)", {"color": "#2563eb", "marker": "o", "linestyle": "-", "markersize": 4}),
              "torch": ("PyTorch", {"color": "#ee4c2c", "marker": "s", "linestyle": "--", "markersize": 4})}


def run(config: RunConfig = BASE, settings: Settings = Settings(), *, progress: Callable[..., Any] | None = None,
        log: Callable[[str], None] | None = None) -> Outcome:
    """Train ``config.model`` in both frameworks (its ``framework`` is not used; --parallel holds for the Flax run),
    in float32 also in float64 (``settings.yardstick``), and write the curves, the gaps and the timings to
    ``config.output.out_dir``. Not bf16: the torch reference trains in the notebooks' float32."""
    common.refuse(NAME, config, BASE, "the torch reference trains in --dtype, so both runs do", "precision")
    return common.run_experiment(NAME, config, settings, lambda ctx: run_compare(ctx, settings), needs_torch=True,
                                 progress=progress, log=log)


def torch_initial_weights(model: str, model_kwargs: Mapping[str, Any], seed: int) -> dict[str, Any]:
    """torch's initialisation of ``model`` for ``seed``, as a state_dict that both frameworks start from."""
    torch_model = builders.build_torch(model, model_kwargs, seed=seed)
    return {k: v.detach().clone() for k, v in torch_model.state_dict().items()}


def gap(a: Run, b: Run) -> dict[str, Any]:
    """How far run ``a`` is from run ``b``: the largest per-epoch |training loss difference| (over the epochs both
    recorded) and the final test accuracy of ``a`` minus ``b``, in points."""
    n = min(len(a.history["train_loss"]), len(b.history["train_loss"]))
    loss_a, loss_b = (np.asarray(r.history["train_loss"][:n], float) for r in (a, b))
    loss = float(np.max(np.abs(loss_a - loss_b))) if n else math.nan
    return {"max_train_loss_difference": loss, "test_acc_difference": a.final("test_acc") - b.final("test_acc")}


# the gaps compare reports: (key in results.json "gaps", run a, run b, what the gap measures)
GAPS = (("jax vs jax-float64", "jax", "jax-float64", "rounding alone, in Flax: float32 against float64"),
        ("torch vs torch-float64", "torch", "torch-float64", "rounding alone, in torch: float32 against float64"),
        ("jax vs torch", "jax", "torch", "the frameworks, {dtype}"),
        ("jax-float64 vs torch-float64", "jax-float64", "torch-float64", "the frameworks, float64 (parity)"))


def _yardstick_notes(gaps: Mapping[str, Mapping[str, float]]) -> list[str]:
    """summary.md's reading of the float32 gap against the yardstick, worded by the numbers: which is larger."""
    cross, flax, torch_ = (gaps[k]["max_train_loss_difference"] for k in
                           ("jax vs torch", "jax vs jax-float64", "torch vs torch-float64"))
    parity = gaps["jax-float64 vs torch-float64"]["max_train_loss_difference"]
    if not all(math.isfinite(v) for v in (cross, flax, torch_, parity)):
        return ["A run has no finite training loss (diverged): the gaps are not comparable."]
    low, high = sorted((flax, torch_))
    if cross < low:
        where = "smaller than each framework's own float32-vs-float64 gap"
    elif cross <= high:
        where = "between the two frameworks' own float32-vs-float64 gaps"
    elif cross <= flax + torch_:
        where = "larger than each framework's own float32-vs-float64 gap and within their sum"
    else:
        where = "larger than each framework's own float32-vs-float64 gap and than their sum"
    if parity == 0:
        apart = "are identical"
    elif parity < cross:
        apart = f"are {parity:.2e} apart, {cross / parity:.1e} times less than in float32"
    else:
        apart = f"are {parity:.2e} apart, no closer than in float32"
    lines = [f"Largest per-epoch difference in training loss: the Flax-vs-torch gap in float32 ({cross:.2e}) is "
             f"{where} ({flax:.2e} in Flax, {torch_:.2e} in torch); in float64 the two frameworks' training losses "
             f"{apart}."]
    acc = {k: gaps[k]["test_acc_difference"] for k in gaps}
    lines.append(f"Final test accuracy: Flax minus torch {fmt(acc['jax vs torch'], '+.2f')} points in float32, "
                 f"{fmt(acc['jax-float64 vs torch-float64'], '+.2f')} in float64; each float32 run minus its own "
                 f"float64 run: {fmt(acc['jax vs jax-float64'], '+.2f')} (Flax), "
                 f"{fmt(acc['torch vs torch-float64'], '+.2f')} (torch).")
    return lines


def run_compare(ctx: Context, settings: Settings = Settings()) -> Report:
    """Train the context's model in both frameworks from the same initial weights (``init_from``, or torch's
    initialisation for the context's seed), in float32 each in float64 too (``settings.yardstick``); figure,
    tables of the runs and of the gaps."""
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
    yardstick = settings.yardstick and dtype == "float32"
    if yardstick:  # the same weights and batches in float64: what rounding alone moves each framework
        runs.update({f"{fw}-float64": ctx.train(f"{label}, float64", model, model_kwargs, f"{fw}-float64",
                                                recipe=recipe, framework=fw, init_from=start, dtype="float64")
                     for fw, (label, _) in FRAMEWORKS.items()})
    curves = [(run.label, run.history, _style(name)) for name, run in runs.items()]
    panels = (*plots.CURVE_PANELS, ("images_per_sec", "Training throughput", "images/s"))
    fig, _ = plots.curves_figure(curves, panels=panels, width=4.0, height=3.6,
                                 title=f"{registry.constructor_call(model, model_kwargs)}, "
                                       f"{recipe.name}, {dtype}{' (and float64: thin lines)' if yardstick else ''}: "
                                       "same initial weights, same batches")

    rows, timing = [], {}
    for name, run in runs.items():
        times, rates = run.history["epoch_time"], run.history["images_per_sec"]
        # the epochs after the first (which includes compilation), or the only one
        later, rate = statistics.fmean(times[1:] or times), statistics.median(rates[1:] or rates)
        timing[name] = {"first_epoch_time": times[0], "later_epoch_time_mean": later, "images_per_sec_median": rate}
        rows.append([run.label, *run.final_cells(), fmt(times[0], ".1f", " s"), fmt(later, ".1f", " s"),
                     fmt(rate, ".0f")])
    table = tables.format_table(["run", "final train loss", "final train acc", "final test acc",
                                 "first epoch (with compile)", "later epochs (mean)", "images/s (median)"], rows,
                                markdown=True)
    gaps = {key: {"runs": [a, b], "measures": measures.format(dtype=dtype), **gap(runs[a], runs[b])}
            for key, a, b, measures in GAPS if a in runs and b in runs}
    if yardstick:
        table += "\n\nWhat rounding alone does (each gap: run a minus run b):\n\n" + tables.format_table(
            ["run a", "run b", "what it measures", "max train-loss gap", "final test-acc gap"],
            [[runs[g["runs"][0]].label, runs[g["runs"][1]].label, g["measures"],
              fmt(g["max_train_loss_difference"], ".2e"), fmt(g["test_acc_difference"], "+.2f", " points")]
             for g in gaps.values()], align="lllrr", markdown=True)
    cross = gaps["jax vs torch"]
    source = (f"torch's initialisation for seed {ctx.seed} (ported into Flax)" if config.model.init_from is None
              else f"the weights of {config.model.init_from}")
    if yardstick:
        notes = _yardstick_notes(gaps)
        status, why = "measured", ("each framework also trained in float64 from the same weights on the same "
                                   "batches (runs/jax-float64, runs/torch-float64): its float32 run's distance from "
                                   "it is the gap float32 rounding alone makes, the yardstick for the Flax-vs-torch "
                                   "gap")
    else:
        notes = [f"Largest per-epoch difference in training loss: {fmt(cross['max_train_loss_difference'], '.2e')}; "
                 f"final test accuracy, Flax minus torch: {fmt(cross['test_acc_difference'], '+.2f')} points."]
        status, why = (("off", "no float64 yardstick (--no-yardstick): how much of this gap float32 rounding alone "
                               "makes is not measured")
                       if dtype == "float32" else
                       ("skipped", "no yardstick in float64: the gap above is the parity statement (a float32 "
                                   "compare measures how far rounding alone moves each framework)"))
    notes.append(f"{recipe.name} recipe: {recipe.epochs} epochs, batch {recipe.batch_size}, lr {recipe.lr:g}, "
                 f"{dtype}; both from {source} and the same batch stream; {ctx.data_note}; {why}. Throughput "
                 "leaves out the first epoch (compilation) when there are more.")
    results = {"model": model, "model_kwargs": model_kwargs, "dtype": dtype, "recipe": dataclasses.asdict(recipe),
               "data": ctx.data_note, "runs": {name: dataclasses.asdict(r) for name, r in runs.items()},
               "timing": timing, "max_train_loss_difference": cross["max_train_loss_difference"],
               "test_acc_difference": cross["test_acc_difference"], "gaps": gaps,
               "yardstick": {"status": status, "note": why}}
    return Report("Flax vs PyTorch: same weights, same batches", table, results, fig, notes)


def _style(name: str) -> dict[str, Any]:
    """The framework's colour and marks; its float64 run (``<fw>-float64``) as a thin, faint line of that colour."""
    fw, _, float64 = name.partition("-")
    style = FRAMEWORKS[fw][1]
    if not float64:
        return dict(style)
    return {"color": style["color"], "linestyle": style["linestyle"], "linewidth": 0.9, "alpha": 0.5}
