"""What every experiment command shares: options, quick mode, data, training a run, and the output files.

An experiment is a ``Command``: a name, its options, and a ``plan`` that checks the parsed arguments (usage
errors before anything is read or written) and returns the work as a function of a ``Context`` (output
directory, log, progress bar factory). The work returns a ``Report``; ``_handle`` writes it as
``summary.md`` (Markdown table, notes, figure links) and ``results.json`` (raw numbers) into ``--out`` and
prints the table. The experiment functions themselves never print: they log through the context.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import sys
import textwrap
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flax_resnet import commands, registry
from flax_resnet.recipes import RECIPES, Recipe

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["PLAIN_COLOR", "RESNET_COLOR", "Command", "Context", "Report", "Run", "add_data_options",
           "add_output_options", "add_training_options", "apply_quick", "count_conv_layers", "count_params",
           "curves_figure", "fmt", "load_data", "make_recipe", "markdown_table", "register", "save_figure",
           "to_jsonable", "train_run"]

RESULTS_FILE = "results.json"
SUMMARY_FILE = "summary.md"
FIGURE_DPI = 100
# notebook 000's colours: the plain network amber, the ResNet green
PLAIN_COLOR = "#f59e0b"
RESNET_COLOR = "#22c55e"

Log = Callable[[str], None]


# ---------------------------------------------------------------------------------------------- options
def add_output_options(p: argparse.ArgumentParser, name: str) -> None:
    """--out, --quick, --no-progress."""
    g = p.add_argument_group("output")
    g.add_argument("--out", type=Path, metavar="DIR",
                   help=f"output directory for figures, summary.md and results.json; default: "
                        f"{commands.RUNS_DIR}/{name} ({commands.RUNS_DIR}/{name}-quick with --quick)")
    g.add_argument("--quick", action="store_true",
                   help="a tiny run that checks the whole pipeline in about a minute on a CPU: synthetic data and "
                        "small models unless given otherwise (the values it picks are listed below)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar (epoch lines are still printed)")


def add_data_options(p: argparse.ArgumentParser) -> None:
    """The data options of ``train``, plus --image-size; --dataset defaults to synthetic with --quick."""
    commands.add_data_arguments(p, dataset_default=None, image_size=True)


def add_training_options(p: argparse.ArgumentParser, *, framework: bool = True) -> None:
    """Seed, the recipe numbers an experiment may shorten, framework, resume/overwrite."""
    g = p.add_argument_group("training")
    g.add_argument("--seed", type=int, default=0, metavar="N",
                   help="seed of the initialisation, batch order and augmentation (default: %(default)s)")
    g.add_argument("--epochs", type=int, metavar="N",
                   help="epochs per run (default: the experiment's); multistep milestones scale with it")
    g.add_argument("--batch-size", type=int, metavar="N", help="training batch size (default: the recipe's)")
    g.add_argument("--eval-batch-size", type=int, metavar="N", help="test batch size (default: the recipe's)")
    g.add_argument("--lr", type=float, help="initial learning rate (default: the recipe's)")
    g.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None,
                   help="random crop 32 with 4 pixels of zero padding + horizontal flip (default: the recipe's)")
    if framework:
        g.add_argument("--framework", choices=("jax", "torch"), default="jax",
                       help="train the Flax models or the PyTorch reference (default: %(default)s)")
    g.add_argument("--resume", action="store_true",
                   help="continue the runs already in --out (a finished run is read back, not trained again)")
    g.add_argument("--overwrite", action="store_true", help="delete the runs already in --out and start over")


def add_run_options(p: argparse.ArgumentParser, name: str, *, framework: bool = True) -> None:
    """What every experiment that trains offers: the training, data and output options."""
    add_training_options(p, framework=framework)
    add_data_options(p)
    add_output_options(p, name)


def prepare_run_args(args: argparse.Namespace, parser: argparse.ArgumentParser, quick: Mapping[str, Any]) -> None:
    """--quick's defaults filled in, then the shared usage checks (before anything is read or written)."""
    apply_quick(args, **quick)
    check_training_args(args, parser)


def apply_quick(args: argparse.Namespace, **values: Any) -> None:
    """With --quick, fill the options the user left unset with ``values`` (--image-size only for synthetic data)."""
    if args.quick and getattr(args, "dataset", "") is None:
        args.dataset = values.get("dataset", "synthetic")
    if hasattr(args, "dataset") and args.dataset is None:
        args.dataset = "cifar10"
    if args.quick:
        for name, value in values.items():
            if name == "image_size" and args.dataset != "synthetic":
                continue  # a quick run on CIFAR-10 keeps its 32x32 images
            if getattr(args, name, None) is None:
                setattr(args, name, value)


def _option_value(value: Any) -> str:
    if isinstance(value, list):
        return " ".join(_option_value(v) for v in value)
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return str(value)


def quick_epilog(values: Mapping[str, Any]) -> str:
    """The --quick defaults, for the command's --help."""
    shown = ", ".join(f"--{k.replace('_', '-')}" + ("" if v is True else f" {_option_value(v)}")
                      for k, v in values.items())
    return "\n".join(textwrap.wrap(f"--quick sets (where not given): {shown}", 108))


def check_training_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Usage errors of the shared options, before anything is read or written."""
    for name in ("epochs", "batch_size", "eval_batch_size", "train_samples", "image_size"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if getattr(args, "test_samples", None) is not None and args.test_samples < 0:
        parser.error("--test-samples must be at least 0")
    if getattr(args, "lr", None) is not None and args.lr <= 0:
        parser.error("--lr must be positive")
    if getattr(args, "seed", 0) < 0:
        parser.error("--seed must be >= 0")
    if getattr(args, "resume", False) and getattr(args, "overwrite", False):
        parser.error("--resume and --overwrite exclude each other")
    if getattr(args, "image_size", None) is not None and getattr(args, "dataset", None) != "synthetic":
        parser.error("--image-size is for --dataset synthetic only")
    if getattr(args, "image_size", None) is not None and args.image_size < 8:
        parser.error("--image-size must be at least 8 (three stride-2 stages)")


def make_recipe(name: str, args: argparse.Namespace, parser: argparse.ArgumentParser, **defaults: Any) -> Recipe:
    """The recipe ``name`` with the experiment's ``defaults`` and the user's --epochs/--batch-size/... over it.

    When the run is shorter or longer than the recipe's, multistep milestones move with it (round(m * epochs
    / recipe epochs), kept inside the run), so a short run still decays its learning rate where the
    notebook's would: notebook 000's [8, 12] of 15 epochs become [2, 3] in a 4-epoch run.
    """
    given = {k: getattr(args, k, None) for k in ("epochs", "batch_size", "eval_batch_size", "lr", "augment")}
    fields = {**defaults, **{k: v for k, v in given.items() if v is not None}}
    recipe = RECIPES[name]
    epochs = fields.get("epochs", recipe.epochs)
    if recipe.milestones and epochs != recipe.epochs and epochs >= 1:
        scaled = (round(m * epochs / recipe.epochs) for m in recipe.milestones)
        fields["milestones"] = tuple(sorted({m for m in scaled if 1 <= m < epochs}))
    try:
        return dataclasses.replace(recipe, **fields)
    except ValueError as e:
        parser.error(str(e))
        raise  # unreachable: parser.error exits


# ------------------------------------------------------------------------------------------------- data
def load_data(args: argparse.Namespace) -> Any:
    """The data set the options name (``commands.load_data``, as ``train`` reads it)."""
    return commands.load_data(args)


def data_description(args: argparse.Namespace, dataset: Any) -> str:
    n_train, n_test = len(dataset.train_labels), len(dataset.test_labels)
    size = dataset.train_images.shape[1]
    what = "synthetic data" if args.dataset == "synthetic" else "CIFAR-10"
    return f"{what}, {n_train} training and {n_test} test images of {size}x{size}"


def run_settings(args: argparse.Namespace, dataset: Any) -> dict[str, Any]:
    """The keyword arguments every experiment's ``run_*`` function takes from the command line."""
    return {"seed": args.seed, "resume": args.resume, "overwrite": args.overwrite,
            "data_note": data_description(args, dataset)}


# --------------------------------------------------------------------------------------------- counting
def count_params(model: Any) -> int:
    """Trainable parameters, as the notebooks count them: ``sum(p.numel() for p in model.parameters())``."""
    if hasattr(model, "parameters"):  # torch
        return int(sum(p.numel() for p in model.parameters()))
    import jax
    from flax import nnx

    return int(sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))))


def count_conv_layers(model: Any) -> int:
    """Conv layers on the main path (3x3 and larger; 1x1 projection shortcuts not counted): notebook 000's
    "1 + 6n conv layers", and the 17 of ResNet-18's 18 weighted layers."""
    if hasattr(model, "modules"):  # torch
        import torch.nn as nn

        return sum(1 for m in model.modules() if isinstance(m, nn.Conv2d) and tuple(m.kernel_size) != (1, 1))
    from flax import nnx

    return sum(1 for _, m in nnx.iter_modules(model) if isinstance(m, nnx.Conv) and tuple(m.kernel_size) != (1, 1))


# ------------------------------------------------------------------------------------------------ a run
@dataclasses.dataclass
class Run:
    """One trained model of an experiment: what it was, its history and its size."""

    label: str
    model: str
    model_kwargs: dict[str, Any]
    framework: str
    params: int
    conv_layers: int
    history: dict[str, list[float]]
    out_dir: Path | None = None

    @property
    def train_time(self) -> float:
        """Seconds of training and evaluation over all epochs (as recorded, so also right after --resume)."""
        return float(sum(self.history["epoch_time"]))

    def final(self, key: str) -> float:
        values = self.history[key]
        return float(values[-1]) if values else math.nan

    def as_json(self) -> dict[str, Any]:
        return {"label": self.label, "model": self.model, "model_kwargs": self.model_kwargs,
                "framework": self.framework, "params": self.params, "conv_layers": self.conv_layers,
                "train_time": self.train_time, "history": self.history,
                "out_dir": None if self.out_dir is None else str(self.out_dir)}


def _prefixed(log: Log | None, label: str) -> Log | None:
    return None if log is None else (lambda line: log(f"[{label}] {line}"))


def _labelled(progress: Callable[..., Any] | None, label: str) -> Callable[..., Any] | None:
    if progress is None:
        return None
    return lambda total, desc: progress(total=total, desc=f"{label} {desc}")


def train_run(label: str, model: str, model_kwargs: Mapping[str, Any], recipe: Recipe, dataset: Any, *,
              framework: str = "jax", seed: int = 0, out_dir: Path | None = None, resume: bool = False,
              overwrite: bool = False, state_dict: Mapping[str, Any] | None = None, dtype: str = "float32",
              log: Log | None = None, progress: Callable[..., Any] | None = None) -> Run:
    """Train one registered model with ``flax_resnet.training``, as ``train`` would.

    ``out_dir`` gets the run's history, curves and checkpoints (with the metadata ``train`` writes, so the
    ``landscape`` and ``port`` commands read them); ``state_dict`` (torch layout) replaces the initial weights
    in either framework, which is how ``compare`` starts both from the same point. ``dtype`` 'float64' needs
    ``jax_enable_x64`` on.
    """
    from flax_resnet import training
    from flax_resnet.recipes import RunConfig

    kwargs = registry.model_kwargs(model, model_kwargs, recipe.name)
    config = RunConfig(recipe=recipe, model=model, model_kwargs=kwargs, framework=framework, seed=seed,
                       dtype=dtype)
    title = f"{label}: {model}({', '.join(f'{k}={v}' for k, v in kwargs.items())}), {recipe.name}, {framework}"
    if framework == "jax":
        from flax_resnet import port

        net = registry.build_flax(model, kwargs, seed=seed)
        if state_dict is not None:
            port.load_torch_state_dict(net, state_dict)
    elif framework == "torch":
        net = registry.build_torch(model, kwargs, seed=seed)
        if state_dict is not None:
            net.load_state_dict(state_dict, strict=True)
    else:
        raise ValueError(f"unknown framework {framework!r}")
    size, convs = count_params(net), count_conv_layers(net)
    history = training.train(net, config, dataset, out_dir=out_dir, resume=resume, overwrite=overwrite,
                             log=_prefixed(log, label), progress=_labelled(progress, label), title=title).history
    return Run(label, model, dict(kwargs), framework, size, convs, {k: list(v) for k, v in history.items()}, out_dir)


# ---------------------------------------------------------------------------------------------- outputs
def fmt(value: float, spec: str = ".2f", suffix: str = "") -> str:
    """A number for a table; non-finite values as 'n/a' (a diverged run must not break the table)."""
    return f"{value:{spec}}{suffix}" if isinstance(value, int | float) and math.isfinite(value) else "n/a"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]], align: str | None = None) -> str:
    """A GitHub Markdown table; ``align`` is one letter per column, 'l' or 'r' (default: first left, rest right)."""
    align = align or "l" + "r" * (len(header) - 1)
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(3, *(len(r[i]) for r in cells)) for i in range(len(header))]

    def line(row: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) if a == "l" else c.rjust(w)
                                 for c, w, a in zip(row, widths, align, strict=True)) + " |"

    rule = "| " + " | ".join("-" * (w - 1) + (":" if a == "r" else "-") for w, a in zip(widths, align, strict=True))
    return "\n".join([line(cells[0]), rule + " |", *(line(r) for r in cells[1:])])


def to_jsonable(value: Any) -> Any:
    """Plain JSON: numpy and jax scalars and arrays as numbers and lists, NaN and infinities as null."""
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist") and not isinstance(value, str):
        return to_jsonable(value.tolist())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    return value


def save_figure(fig: Figure, path: Path, dpi: int = FIGURE_DPI) -> Path:
    """``plots.save_figure`` at the experiments' resolution (imported here, so that ``--help`` needs no
    matplotlib)."""
    from flax_resnet import plots

    return plots.save_figure(fig, path, dpi)


CURVE_PANELS = (("train_loss", "Training Loss", "Loss"), ("train_acc", "Training Accuracy", "Accuracy (%)"),
                ("test_acc", "Test Accuracy", "Accuracy (%)"))


def curves_figure(curves: Sequence[tuple[str, Mapping[str, Sequence[float]], Mapping[str, Any]]],
                  panels: Sequence[tuple[str, str, str]] = CURVE_PANELS, title: str | None = None,
                  width: float = 5.0, height: float = 3.8, extra: int = 0) -> tuple[Figure, Any]:
    """Per-epoch curves, one panel per (history key, title, y label); ``curves`` are (label, history, style).

    ``extra`` empty panels are added on the right for the caller to draw in; returns the figure and all axes.
    """
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(width * (len(panels) + extra), height))
    axes = fig.subplots(1, len(panels) + extra, squeeze=False)[0]
    for ax, (key, panel_title, ylabel) in zip(axes, panels, strict=False):
        for label, history, style in curves:
            values = history.get(key, [])
            ax.plot(range(1, len(values) + 1), values, label=label, **style)
        ax.set(xlabel="Epoch", ylabel=ylabel, title=panel_title)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return fig, axes


# ---------------------------------------------------------------------------------------------- command
@dataclasses.dataclass
class Context:
    """Where an experiment writes and how it reports progress (the CLI's log and progress bar)."""

    out: Path
    log: Log | None = None
    progress: Callable[..., Any] | None = None

    def run_dir(self, name: str) -> Path:
        """Output directory of one training run inside the experiment's (history, curves, checkpoints)."""
        return self.out / "runs" / name


@dataclasses.dataclass
class Report:
    """What an experiment found: a Markdown table (printed and written), notes, figures and raw numbers."""

    title: str
    table: str
    results: dict[str, Any]
    figures: list[Path] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)

    def markdown(self, out: Path | None = None) -> str:
        parts = [f"## {self.title}", "", self.table]
        if self.notes:
            parts += ["", *self.notes]
        if self.figures:
            links = [f"![{p.stem}]({p.relative_to(out) if out and p.is_relative_to(out) else p})"
                     for p in self.figures]
            parts += ["", *links]
        return "\n".join(parts) + "\n"

    def write(self, out: Path, command: str, settings: Mapping[str, Any]) -> tuple[Path, Path]:
        """``summary.md`` and ``results.json`` (the results with the command and its settings) in ``out``."""
        out.mkdir(parents=True, exist_ok=True)
        summary = out / SUMMARY_FILE
        summary.write_text(self.markdown(out))
        results = out / RESULTS_FILE
        payload = {"command": command, "settings": settings, **self.results,
                   "figures": [p.name for p in self.figures]}
        tmp = results.with_name(f".{results.name}.tmp")
        tmp.write_text(json.dumps(to_jsonable(payload), indent=1, allow_nan=False) + "\n")
        os.replace(tmp, results)
        return summary, results


Plan = Callable[[argparse.Namespace, argparse.ArgumentParser], Callable[[Context], Report]]


@dataclasses.dataclass(frozen=True)
class Command:
    """One experiment command: its options and its plan (checks arguments, returns the work to do)."""

    name: str
    help: str
    description: str
    add_options: Callable[[argparse.ArgumentParser], None]
    plan: Plan
    epilog: str = ""


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    skip = {"handler", "parser", "command"}
    return {k: to_jsonable(v) for k, v in vars(args).items() if k not in skip}


def _handle(command: Command, args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Run ``command``; its expected failures (``FlaxResnetError``) reach the CLI's one handler."""
    from flax_resnet.training.outdir import claim_output_dir

    work = command.plan(args, parser)  # usage errors exit here, before anything is read or written
    out = args.out or Path(commands.RUNS_DIR) / (f"{command.name}-quick" if args.quick else command.name)
    # as `train` does: an unwritable --out, or another run writing to it, fails before any data or training
    claim = claim_output_dir(out, probe=())
    ctx = Context(out, log=commands.write_line, progress=commands.progress_factory(not args.no_progress))
    start = time.perf_counter()
    with claim:
        try:
            report = work(ctx)
        except KeyboardInterrupt:
            print(f"\ninterrupted; finished runs are kept in {out} (continue with --resume)", file=sys.stderr)
            return 130
        report.write(out, command.name, _settings(args))
    print()
    print(report.markdown(out), end="")
    print(f"\n{command.name}: done in {time.perf_counter() - start:.0f} s; outputs in {out}")
    return 0


def register(subparsers: Any, command: Command) -> argparse.ArgumentParser:
    """Add ``command`` to the CLI's subparsers, with the ``train`` command's conventions."""
    p = subparsers.add_parser(command.name, help=command.help, description=command.description,
                              epilog=command.epilog or None, formatter_class=commands.HelpFormatter)
    command.add_options(p)
    p.set_defaults(handler=functools.partial(_handle, command), parser=p)
    return p
