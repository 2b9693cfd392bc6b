"""``landscape``: notebook 004's ``plot_loss_landscape_1d`` for trained plain and residual networks.

The loss at params + alpha * d on the first test batch (the notebook's ``next(iter(testloader))``) in eval mode.
The networks come from checkpoints of either framework, whose metadata names the model, its arguments and the
recipe (so the batch is normalised as in training).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flax_resnet import registry, tables, weights
from flax_resnet.config import ConfigError, RunConfig
from flax_resnet.data import DataError
from flax_resnet.experiments import common
from flax_resnet.experiments.common import Context, Outcome, Report, fmt
from flax_resnet.experiments.settings import LANDSCAPE, LANDSCAPE_SPLITS
from flax_resnet.experiments.settings import LandscapeSettings as Settings
from flax_resnet.recipes import RECIPES, Recipe
from flax_resnet.store import CheckpointError, resolve
from flax_resnet.training.engine import cross_entropy, normalize

__all__ = ["BASE", "NAME", "QUICK", "Network", "Settings", "line_loss", "load_network", "run", "run_landscape"]

NAME, BASE, QUICK = LANDSCAPE.name, LANDSCAPE.base, LANDSCAPE.quick
SPLITS = LANDSCAPE_SPLITS


def run(config: RunConfig = BASE, settings: Settings = Settings(train_own=True), *,
        progress: Callable[..., Any] | None = None, log: Callable[[str], None] | None = None) -> Outcome:
    """The landscapes of the networks ``settings`` names (or trains, as ``config`` says: not --init-from, they are
    two different models), written to ``config.output.out_dir``."""
    common.refuse(NAME, config, BASE, "the networks it trains are two different models", "init_from")
    for label, path in settings.networks():
        if not path.is_dir():
            raise ConfigError(f"--{label or 'checkpoint'} {path}: no such run directory.")
    return common.run_experiment(NAME, config, settings, lambda ctx: _work(ctx, settings), progress=progress,
                                 log=log)


def _work(ctx: Context, settings: Settings) -> Report:
    pairs = settings.networks() or [  # none named: make the checkpoints first, as `train` would
        (label, ctx.train(label, model, {"n_blocks": 1}, model, overwrite=True).out_dir)
        for label, model in (("plain", "PlainDeepCNN"), ("residual", "SimpleResNet"))]
    networks = [load_network(path, label) for label, path in pairs]
    for (label, path), network in zip(pairs, networks, strict=True):
        if label is not None and (label == "plain") != network.name.startswith("Plain"):
            raise CheckpointError(f"--{label} {path} holds a {network.name}, which is not a {label} network; "
                                  "swap --plain and --residual")
    return run_landscape(networks, ctx, points=settings.points, radius=settings.radius, relative=settings.relative,
                         batch_size=settings.batch, splits=settings.splits)


@dataclasses.dataclass
class Network:
    """A trained Flax model read from a checkpoint, with what its metadata says about it."""

    label: str
    model: Any
    name: str
    model_kwargs: dict[str, Any]
    recipe: Recipe
    source: Path
    epoch: int | None


def load_network(path: Path, label: str | None = None) -> Network:
    """The model of the latest checkpoint under ``path`` (a run's --out or its checkpoints/) as a Flax model (a torch
    run's weights ported), digest-checked; ``CheckpointError`` when there is none or it names no model."""
    root = resolve(path)
    meta = weights.read_meta(root)
    name = meta.get("model")
    try:
        kwargs = registry.model_kwargs(name, meta.get("model_kwargs"))
    except ValueError as e:
        raise CheckpointError(f"the checkpoint in {root} names no model this version can build: {e}") from e
    if meta.get("dtype", "float32") != "float32":
        raise CheckpointError(f"{root} holds a {meta['dtype']} run; landscape reads float32 runs only")
    # a checkpoint written by `port` records no recipe: the model's notebook's
    recipe = (RunConfig.from_checkpoint_meta(meta).recipe if meta.get("recipe")
              else RECIPES[registry.get_spec(name).recipe])
    model, _, _ = weights.load_model(root, "jax")  # the arrays read once, after the checks above
    return Network(label or name, model, name, kwargs, recipe, Path(path), meta.get("epoch"))


def line_loss(model: Any, seed: int = 0, *, relative: bool = False) -> Callable[..., np.ndarray]:
    """``f(images, labels, alphas)``: eval-mode mean cross-entropy at params + alpha * d / ||d|| per alpha.

    d: one standard-normal draw per ``nnx.Param`` (BatchNorm's statistics stay as trained), ||d|| one norm over
    all of them, as in the notebook. ``relative`` scales d / ||d|| to the weights' norm ||theta||: the notebook's
    unit step barely moves a network with many parameters. The model's weights are not changed.
    """
    def norm(arrays: Sequence[np.ndarray]) -> float:  # one norm over all arrays together, float64 on the host
        return float(np.sqrt(sum(np.sum(np.square(a, dtype=np.float64)) for a in arrays)))

    model.eval()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    leaves, treedef = jax.tree.flatten(params)
    rng = np.random.default_rng(seed)  # numpy draws: no compilation per parameter shape
    direction = [rng.standard_normal(leaf.shape) for leaf in leaves]
    scale = 1.0 / norm(direction) * (norm([np.asarray(leaf) for leaf in leaves]) if relative else 1.0)
    direction = jax.tree.unflatten(treedef, [jnp.asarray(d * scale, leaf.dtype)
                                             for d, leaf in zip(direction, leaves, strict=True)])

    @jax.jit
    def losses(params: nnx.State, direction: nnx.State, images: jax.Array, labels: jax.Array, alphas: jax.Array
               ) -> jax.Array:
        def at(alpha: jax.Array) -> jax.Array:
            moved = jax.tree.map(lambda p, d: p + alpha * d, params, direction)
            return cross_entropy(nnx.merge(graphdef, moved, rest)(images), labels)

        return jax.lax.map(at, alphas)

    return lambda images, labels, alphas: np.asarray(
        losses(params, direction, images, labels, jnp.asarray(alphas, jnp.float32)), dtype=np.float64)


def run_landscape(networks: Sequence[Network], ctx: Context, *, points: int = 21, radius: float = 1.0,
                  relative: bool = False, batch_size: int | None = None, splits: Sequence[str] = ("test",)) -> Report:
    """The 1-D loss landscape of each network on the first batch of each split of the context's data (normalised
    with the network's recipe, no augmentation), along its own random direction for the context's seed."""
    from matplotlib.figure import Figure

    from flax_resnet import plots  # matplotlib, the [plots] extra (run_experiment requires it)

    alphas = np.linspace(-radius, radius, points)
    centre = int(np.argmin(np.abs(alphas)))
    fig = Figure(figsize=(8, 4.2))
    ax = fig.subplots()
    rows, curves, seen = [], {}, []
    for net in networks:
        convs = common.count_conv_layers(net.model)
        entry = curves[net.label] = {
            "model": net.name, "model_kwargs": net.model_kwargs, "source": str(net.source), "epoch": net.epoch,
            "conv_layers": convs, "params": common.count_params(net.model), "splits": {}}
        plain = net.name.startswith("Plain")
        color = plots.PLAIN_COLOR if plain else plots.RESNET_COLOR if "Res" in net.name else None  # None: the cycle
        along = line_loss(net.model, ctx.seed, relative=relative)
        for split in splits:
            size = batch_size or net.recipe.eval_batch_size
            images = getattr(ctx.dataset, f"{split}_images")[:size]
            labels = getattr(ctx.dataset, f"{split}_labels")[:size]
            if len(labels) == 0:
                raise DataError(f"the {split} split is empty: no batch to evaluate the landscape on")
            losses = along(normalize(jnp.asarray(images), net.recipe.mean, net.recipe.std), jnp.asarray(labels),
                           alphas)
            seen.extend(losses)
            best = int(np.argmin(np.where(np.isfinite(losses), losses, np.inf)))
            summary = {"loss_at_0": float(losses[centre]), "argmin_alpha": float(alphas[best]),
                       "min_loss": float(losses[best]), "loss_at_start": float(losses[0]),
                       "loss_at_end": float(losses[-1]),
                       "mean_rise_at_ends": float((losses[0] + losses[-1]) / 2 - losses[centre])}
            entry["splits"][split] = {"batch_size": len(labels), "losses": losses.tolist(), **summary}
            ax.plot(alphas, losses, marker="o" if plain else "s", color=color, markersize=4,
                    linestyle="--" if split == "train" and len(splits) > 1 else "-",
                    label=f"{net.label}: {net.name} ({convs} conv layers)" + (f", {split}" if len(splits) > 1 else ""))
            rows.append([net.label, f"{net.name} ({convs} conv)", split, fmt(summary["loss_at_0"], ".4f"),
                         f"{fmt(summary['min_loss'], '.4f')} at {summary['argmin_alpha']:+.2f}",
                         *(fmt(summary[k], ".4f") for k in ("loss_at_start", "loss_at_end", "mean_rise_at_ends"))])
    unit = "||theta||" if relative else "1"
    values = np.array(seen)
    values = values[np.isfinite(values) & (values > 0)]
    log_scale = values.size > 0 and values.max() > 100 * values.min()
    if log_scale:  # a plain network's far end can sit thousands of times above the residual one's minimum
        ax.set_yscale("log")
    ax.axvline(0.0, color="0.5", linewidth=0.8, linestyle=":")
    ax.set(xlabel=f"Step along random direction (|d| = {unit})", ylabel="Loss (log scale)" if log_scale else "Loss",
           title="Loss Landscape (1D slice)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    table = tables.format_table(["network", "model", "batch", "loss at 0", "min loss (alpha)",
                                 f"loss at {-radius:g}", f"loss at +{radius:g}", "mean rise at the ends"],
                                rows, align="lllrrrrr", markdown=True)
    notes = [f"Loss on the first {' and first '.join(splits)} batch in eval mode along a random direction d with "
             f"one global norm over all parameters, |d| = {unit} (seed {ctx.seed}), {points} points in "
             f"[{-radius:g}, {radius:g}]; {ctx.data_note}."]
    depths = sorted({net["conv_layers"] for net in curves.values()})
    if len(depths) > 1:
        notes.append(f"The networks differ in depth ({depths} conv layers): compare at equal depth.")
    results = {"alphas": alphas.tolist(), "relative": relative, "networks": curves, "splits": list(splits),
               "seed": ctx.seed, "data": ctx.data_note}
    return Report("1-D loss landscape", table, results, fig, notes)
