"""What every experiment command shares: options, quick mode, training a run, and the output files.

JAX, Flax, torch and matplotlib are imported inside the functions that run, so that ``--help`` does not wait 1.7 s
for JAX.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import sys
import textwrap
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from flax_resnet import files, registry
from flax_resnet.cli import shell as commands
from flax_resnet.config import ModelConfig, OutputConfig, RunConfig
from flax_resnet.errors import require
from flax_resnet.recipes import RECIPES, Recipe

__all__ = ["Command", "Context", "Report", "Run", "add_run_options", "count_conv_layers", "count_params", "fmt",
           "make_recipe", "prepare_args", "register", "to_jsonable"]

RESULTS_FILE = "results.json"
SUMMARY_FILE = "summary.md"


def add_run_options(p: argparse.ArgumentParser, *, framework: bool = True) -> None:
    """What every experiment that trains offers: seed, the recipe numbers it may change, framework,
    resume/overwrite, then the data options (--dataset defaults to synthetic with --quick)."""
    g = p.add_argument_group("training")
    g.add_argument("--seed", type=commands.seed, default=0, metavar="N",
                   help="seed of the initialisation, batch order and augmentation (default: %(default)s)")
    g.add_argument("--epochs", type=int, metavar="N",
                   help="epochs per run (default: the experiment's); multistep milestones scale with it")
    g.add_argument("--batch-size", type=int, metavar="N", help="training batch size (default: the recipe's)")
    g.add_argument("--eval-batch-size", type=int, metavar="N", help="test batch size (default: the recipe's)")
    g.add_argument("--lr", type=commands.finite_float(minimum=0, exclusive_min=True),
                   help="initial learning rate (default: the recipe's)")
    g.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None,
                   help="random crop 32 with 4 pixels of zero padding + horizontal flip (default: the recipe's)")
    if framework:
        g.add_argument("--framework", choices=("jax", "torch"), default="jax",
                       help="train the Flax models or the PyTorch reference (default: %(default)s)")
    exclusive = g.add_mutually_exclusive_group()
    exclusive.add_argument("--resume", action="store_true",
                           help="continue the runs already in --out (a finished run is read back, not trained again)")
    exclusive.add_argument("--overwrite", action="store_true",
                           help="delete the runs already in --out and start over")
    commands.add_data_arguments(p, dataset_default=None, image_size=True)


def prepare_args(args: argparse.Namespace, parser: argparse.ArgumentParser, quick: Mapping[str, Any]) -> None:
    """With --quick, fill the options the user left unset with ``quick`` (--image-size only for synthetic data);
    then the usage errors of the data options, before anything is read or written."""
    if args.quick:
        for name, value in quick.items():  # "dataset" comes first: --image-size depends on it
            if getattr(args, name) is None and (name != "image_size" or args.dataset == "synthetic"):
                setattr(args, name, value)
    if not hasattr(args, "dataset"):
        return  # he-init reads no data
    args.dataset = args.dataset or "cifar10"
    if args.image_size is not None and (args.dataset != "synthetic" or args.image_size < 8):
        parser.error("--image-size is for --dataset synthetic only, and at least 8 (three stride-2 stages)")
    commands.check_data_arguments(args, parser)


def make_recipe(name: str, args: argparse.Namespace, parser: argparse.ArgumentParser, **defaults: Any) -> Recipe:
    """The recipe ``name`` with the experiment's ``defaults`` and the user's --epochs/--batch-size/... over it
    (the recipe's checks of them are usage errors). Multistep milestones scale with the run's length, so a short
    run still decays its learning rate where the notebook's would: [8, 12] of 15 epochs become [2, 3] of 4."""
    given = {k: getattr(args, k, None) for k in ("epochs", "batch_size", "eval_batch_size", "lr", "augment")}
    fields = {**defaults, **{k: v for k, v in given.items() if v is not None}}
    recipe = RECIPES[name]
    epochs = fields.get("epochs", recipe.epochs)
    if recipe.milestones and epochs != recipe.epochs:
        scaled = (round(m * epochs / recipe.epochs) for m in recipe.milestones)
        fields["milestones"] = tuple(sorted({m for m in scaled if 1 <= m < epochs}))
    try:
        return dataclasses.replace(recipe, **fields)
    except ValueError as e:
        parser.error(f"--{str(e).replace('_', '-')}")


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
    out_dir: Path
    train_time: float  # seconds of training and evaluation over all epochs, as recorded (also after --resume)

    def final(self, key: str) -> float:
        values = self.history[key]
        return float(values[-1]) if values else math.nan

    def final_cells(self, accuracy: str = ".2f") -> list[str]:
        """Final training loss, training accuracy and test accuracy, for a table."""
        return [fmt(self.final("train_loss"), ".4f"), fmt(self.final("train_acc"), accuracy, "%"),
                fmt(self.final("test_acc"), accuracy, "%")]


def fmt(value: float, spec: str = ".2f", suffix: str = "") -> str:
    """A number for a table; non-finite values as 'n/a' (a diverged run must not break the table)."""
    return f"{value:{spec}}{suffix}" if isinstance(value, int | float) and math.isfinite(value) else "n/a"


def to_jsonable(value: Any) -> Any:
    """Plain JSON: numpy and jax scalars and arrays as numbers and lists, NaN and infinities as null."""
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist"):
        return to_jsonable(value.tolist())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    return value


@dataclasses.dataclass
class Context:
    """Where an experiment writes, its progress bars, and what its training runs share (``_handle`` fills
    it in from the options; ``dataset`` once --out is claimed)."""

    out: Path
    progress: Callable[..., Any] | None
    framework: str = "jax"
    seed: int = 0
    resume: bool = False
    overwrite: bool = False
    dataset: Any = None
    data_note: str = ""

    def train(self, label: str, model: str, model_kwargs: Mapping[str, Any], recipe: Recipe, name: str, *,
              framework: str | None = None, overwrite: bool | None = None,
              state_dict: Mapping[str, Any] | None = None, dtype: str = "float32") -> Run:
        """Train one registered model on the context's data as ``train`` would, into ``OUT/runs/<name>`` (which
        ``landscape`` and ``port`` read). ``framework`` and ``overwrite`` default to the context's; ``state_dict``
        (torch layout) replaces the initial weights in either framework (``compare`` starts both from it)."""
        from flax_resnet import port, training

        framework = framework or self.framework
        kwargs = registry.model_kwargs(model, model_kwargs, recipe.name)
        out_dir = self.out / "runs" / name
        config = RunConfig(recipe=recipe, model=ModelConfig(model, kwargs), framework=framework, seed=self.seed,
                           dtype=dtype, output=OutputConfig(out_dir, resume=self.resume, overwrite=self.overwrite if
                                                            overwrite is None else overwrite))
        title = f"{label}: {registry.constructor_call(model, kwargs)}, {recipe.name}, {framework}"
        if framework == "jax":
            net = registry.build_flax(model, kwargs, seed=self.seed)
            if state_dict is not None:
                port.load_torch_state_dict(net, state_dict)
        else:
            net = registry.build_torch(model, kwargs, seed=self.seed)
            if state_dict is not None:
                net.load_state_dict(state_dict, strict=True)
        size, convs = count_params(net), count_conv_layers(net)
        progress = self.progress
        history = training.train(
            config, model=net, dataset=self.dataset, title=title,
            log=lambda line: commands.write_line(f"[{label}] {line}"),
            progress=None if progress is None else (lambda total, desc: progress(total=total, desc=f"{label} {desc}")),
        ).history
        return Run(label, model, dict(kwargs), framework, size, convs, {k: list(v) for k, v in history.items()},
                   out_dir, float(sum(history["epoch_time"])))


@dataclasses.dataclass
class Report:
    """What an experiment found: a Markdown table, notes, raw numbers and a matplotlib figure (``_handle`` writes
    it beside summary.md as ``<command>.png``, dashes as underscores: docs/make_figures.sh copies it by that name)."""

    title: str
    table: str
    results: dict[str, Any]
    figure: Any
    notes: list[str]


@dataclasses.dataclass(frozen=True)
class Command:
    """One experiment command: its options, what --quick sets, and its plan (checks the parsed arguments and
    returns the work to do)."""

    name: str
    help: str
    description: str
    add_options: Callable[[argparse.ArgumentParser], None]
    plan: Callable[[argparse.Namespace, argparse.ArgumentParser], Callable[[Context], Report]]
    quick: Mapping[str, Any]
    epilog: str = ""  # after the --quick values; "{prog}" in it stands for the program's name
    needs_torch: bool = False  # whatever --framework says (he-init and compare measure both frameworks)


def _handle(command: Command, args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Run ``command``; its expected failures (``FlaxResnetError``) reach the CLI's one handler."""
    from flax_resnet.training.outdir import claim_output_dir

    prepare_args(args, parser, command.quick)
    work = command.plan(args, parser)  # usage errors exit here, before anything is read or written
    require("matplotlib", f"{command.name} (its figures)")
    if command.needs_torch or getattr(args, "framework", "jax") == "torch":
        require("torch", f"{command.name}{'' if command.needs_torch else ' --framework torch'}")
    out = args.out or Path(commands.RUNS_DIR) / (f"{command.name}-quick" if args.quick else command.name)
    # as `train` does: an unwritable --out, or another run writing to it, fails before any data or training
    claim = claim_output_dir(out, probe=())
    settings = {k: getattr(args, k) for k in ("framework", "seed", "resume", "overwrite") if hasattr(args, k)}
    ctx = Context(out, commands.progress_factory(not args.no_progress), **settings)
    start = time.perf_counter()
    with claim:
        try:
            if hasattr(args, "dataset"):
                ctx.dataset = commands.load_data(args)
                size = ctx.dataset.train_images.shape[1]
                ctx.data_note = (f"{'synthetic data' if args.dataset == 'synthetic' else 'CIFAR-10'}, "
                                 f"{len(ctx.dataset.train_labels)} training and {len(ctx.dataset.test_labels)} "
                                 f"test images of {size}x{size}")
            report = work(ctx)
        except KeyboardInterrupt:
            print(f"\ninterrupted; finished runs are kept in {out} (continue with --resume)", file=sys.stderr)
            return 130
        from flax_resnet import plots
        from flax_resnet.training.loop import write_json

        figure = plots.save_figure(report.figure, out / f"{command.name.replace('-', '_')}.png")
        markdown = "\n\n".join([f"## {report.title}", report.table, "\n".join(report.notes),
                                 f"![{figure.stem}]({figure.name})"]) + "\n"
        files.write_atomic(out / SUMMARY_FILE, markdown)
        options = {k: v for k, v in vars(args).items() if k not in ("handler", "parser", "command")}
        payload = {"command": command.name, "settings": options, **report.results, "figures": [figure.name]}
        write_json(out / RESULTS_FILE, to_jsonable(payload))
    print()
    print(markdown, end="")
    print(f"\n{command.name}: done in {time.perf_counter() - start:.0f} s; outputs in {out}")
    return 0


def register(subparsers: Any, command: Command) -> argparse.ArgumentParser:
    """Add ``command`` to the CLI's subparsers, with its options and the output options every experiment has."""
    def shown(value: Any) -> str:  # a list as its items, a tuple of numbers as --plain-blocks reads it
        if isinstance(value, list):
            return " ".join(map(shown, value))
        return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)

    quick = ", ".join(f"--{k.replace('_', '-')}" + ("" if v is True else f" {shown(v)}")
                      for k, v in command.quick.items())
    # break at spaces only: an option's name split at its hyphen ("--test-" / "samples") reads as two words
    epilog = "\n".join(textwrap.wrap(f"--quick sets (where not given): {quick}", 108, break_on_hyphens=False))
    epilog += command.epilog.replace("{prog}", commands.program_name())
    p = subparsers.add_parser(command.name, help=command.help, description=command.description, epilog=epilog,
                              formatter_class=commands.HelpFormatter)
    command.add_options(p)
    g = p.add_argument_group("output")
    g.add_argument("--out", type=commands.expanded_path, metavar="DIR",
                   help=f"output directory for figures, summary.md and results.json; default: {commands.RUNS_DIR}/"
                        f"{command.name} ({commands.RUNS_DIR}/{command.name}-quick with --quick)")
    g.add_argument("--quick", action="store_true",
                   help="a tiny run that checks the whole pipeline in about a minute on a CPU: synthetic data and "
                        "small models unless given otherwise (the values it picks are listed below)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar (epoch lines are still printed)")
    p.set_defaults(handler=functools.partial(_handle, command), parser=p)
    return p
