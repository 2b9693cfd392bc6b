"""The experiments' command line: one parser per experiment (``add_parsers``), with `train`'s options from the
shared table (``options``) and the experiment's own declared here. The handler turns what was parsed into the
experiment's typed ``RunConfig`` and ``Settings`` (``flax_resnet.experiments.settings``) and imports and calls
``flax_resnet.experiments.<module>.run`` (JAX, after parsing).

An option of `train` that an experiment cannot honour (``--init-from`` where it trains several different models,
``--precision bf16`` in compare) is parsed but not shown, so the experiment refuses it with its reason in one line.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flax_resnet.cli import options, shell
from flax_resnet.config import RUNS_DIR, ModelConfig, Preset, RunConfig, with_recipe
from flax_resnet.experiments import settings as experiments
from flax_resnet.experiments.settings import Experiment
from flax_resnet.recipes import RECIPES

__all__ = ["COMMANDS", "SETTING_FLAGS", "Command", "add_parsers"]

# a setting's option where it is not --<setting> (None: set by --quick only)
SETTING_FLAGS: dict[str, str | None] = {"splits": "split", "train_own": None, "checkpoints": "checkpoint",
                                        "stock": "no-stock", "yardstick": "no-yardstick"}
DEVICES = ("parallel", "bn_sync")  # the multi-host options: `train` only (an experiment runs in one process)
OUTPUT = ("out", "resume", "overwrite", "max_to_keep", "no_progress", "no_tensorboard", "quick")
TRAINING = ("seed", "framework", "dtype", "precision", *DEVICES, *options.RECIPE_OVERRIDES, *options.DATA)


@dataclasses.dataclass(frozen=True)
class Command:
    """One experiment's command: the experiment, help texts, `train`'s options it takes (``takes``) and refuses
    with its reason (``refuses``, parsed but not shown), its own options and how they make its ``Settings``."""

    experiment: Experiment
    help: str
    description: str
    add_options: Callable[[argparse.ArgumentParser], None]
    settings: Callable[[argparse.Namespace], dict[str, Any]]
    takes: tuple[str, ...] = TRAINING
    refuses: tuple[str, ...] = ("init_from",)
    output: tuple[str, ...] = OUTPUT
    epilog: str = ""  # after the --quick values; "{prog}" in it stands for the program's name


def _blocks_spec(text: str) -> tuple[int, ...]:
    try:
        blocks = tuple(int(b) for b in text.split(","))
    except ValueError:
        blocks = ()
    if len(blocks) != 4 or min(blocks) < 1:
        raise argparse.ArgumentTypeError(f"expected four block counts >= 1 like 3,3,3,3, got {text!r}")
    return blocks


def _given(args: argparse.Namespace, **names: str) -> dict[str, Any]:
    """The experiment's own options the user gave, by setting name (``names``: setting -> dest)."""
    values = {setting: getattr(args, dest, None) for setting, dest in names.items()}
    return {k: tuple(v) if isinstance(v, list) else v for k, v in values.items() if v is not None}


# ------------------------------------------------------------------------------------------ own options
def _pvr_options(p: argparse.ArgumentParser) -> None:
    options.add(p, "n_blocks", helps={"n_blocks": "here of both networks (default: 5, the notebook's 31 layers)"})


def _depth_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("models")
    g.add_argument("--plain-blocks", type=_blocks_spec, nargs="+", metavar="A,B,C,D",
                   help="PlainNet depths, blocks in its four layers (default: 1,1,1,1 3,3,3,3, notebook 004's "
                        "shallow and deep)")
    g.add_argument("--resnet-blocks", type=options.number(int, minimum=1), nargs="+", metavar="N",
                   help="SimpleResNet depths, blocks per stage (default: 1 4, i.e. 7 and 25 conv layers)")
    options.add(p, "recipe", helps={"recipe": "here one recipe for all runs (default: plain-vs-residual)"})


def _he_init_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("measurement")
    g.add_argument("--models", nargs="+", choices=experiments.HE_INIT_MODELS, metavar="NAME",
                   help=f"models to measure, of {', '.join(experiments.HE_INIT_MODELS)} (default: SimpleNet ResNet18)")
    g.add_argument("--no-stock", action="store_true", default=None,
                   help="leave out Flax's stock default init (lecun_normal)")
    options.add(p, "batch", helps={"batch": "here of the unit-variance input (default: 64, the notebook's "
                                            "input_shape (64, 3, 32, 32))"})


def _ablation_options(p: argparse.ArgumentParser) -> None:
    options.add(p, "p", helps={"p": "here of the dropout configuration"})


def _landscape_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("networks (run directories of `train` or of an experiment, e.g. "
                             "runs/pvr/runs/SimpleResNet)")
    g.add_argument("--plain", type=options.expanded_path, metavar="DIR", help="the trained plain network")
    g.add_argument("--residual", type=options.expanded_path, metavar="DIR", help="the trained residual network")
    g.add_argument("--checkpoint", type=options.expanded_path, action="append", metavar="DIR",
                   help="any trained network (repeatable; labelled by its model)")
    g = p.add_argument_group("landscape")
    g.add_argument("--points", type=options.number(int, minimum=2), metavar="N",
                   help="points along the line (default: 21)")
    g.add_argument("--radius", type=options.finite_float(minimum=0, exclusive_min=True), metavar="R",
                   help="alphas run over [-R, R] (default: 1, the notebook's)")
    g.add_argument("--relative", action="store_true", default=None,
                   help="scale the unit direction to the network's parameter norm ||theta|| (alpha = 1: a step as "
                        "long as the weights); the notebook's unit step barely moves a network with many parameters")
    g.add_argument("--split", choices=("test", "train", "both"),
                   help="the batch's split (default: test, the notebook's testloader)")
    options.add(p, "batch", helps={"batch": "here the fixed batch (default: the run's test batch size, 100 for "
                                            "notebook 004's)"})


def _landscape_settings(args: argparse.Namespace) -> dict[str, Any]:
    values = _given(args, plain="plain", residual="residual", checkpoints="checkpoint", points="points",
                    radius="radius", relative="relative", batch="batch")
    if args.split is not None:
        values["splits"] = experiments.LANDSCAPE_SPLITS if args.split == "both" else (args.split,)
    return values


def _compare_options(p: argparse.ArgumentParser) -> None:
    options.add(p, "model", "recipe", *options.MODEL_OPTIONS, "init_from",
                helps={"model": "here trained in both frameworks (default: SimpleResNet)",
                       "init_from": "here both frameworks start from them (default: torch's initialisation from "
                                    "--seed, ported into Flax)"})
    p.add_argument_group("yardstick").add_argument(
        "--no-yardstick", action="store_true", default=None,
        help="in float32, leave out the float64 runs of each framework (half the cost) that show how large a gap "
             "float32 rounding alone makes")


COMMANDS: tuple[Command, ...] = (
    Command(
        experiments.PLAIN_VS_RESIDUAL,
        "notebook 000: PlainDeepCNN vs SimpleResNet at 31 conv layers, three plots and a table",
        "Train notebook 000's plain deep CNN and its ResNet at the same depth (n_blocks=5: 31 conv layers) with the "
        "same recipe, and write the notebook's three plots (training loss, training accuracy, test accuracy per "
        "epoch) as plain_vs_residual.png, its summary table as summary.md and the histories as results.json. Each "
        "run's checkpoints stay in OUT/runs/<model> (for `landscape`).",
        _pvr_options, lambda args: _given(args, n_blocks="n_blocks"),
        epilog="\n\nexample:\n  {prog} plain-vs-residual --out runs/pvr\n"
               "  {prog} landscape --plain runs/pvr/runs/PlainDeepCNN --residual runs/pvr/runs/SimpleResNet"),
    Command(
        experiments.DEPTH, "PlainNet shallow/deep vs SimpleResNet shallow/deep: degradation with depth in one figure",
        "Train notebook 004's PlainNet at two depths ([1,1,1,1] and [3,3,3,3]) and notebook 000's SimpleResNet at "
        "two depths (n_blocks 1 and 4) with one recipe, and draw their curves and final training accuracy against "
        "depth in one figure (depth.png): the deep plain network trains worse than the shallow one, the deep "
        "residual network does not.",
        _depth_options, lambda args: _given(args, plain_blocks="plain_blocks", resnet_blocks="resnet_blocks")),
    Command(
        experiments.HE_INIT, "notebook 004's verify_he_init: variance per layer, He vs default init, torch and Flax",
        "Push a unit-variance batch through fresh models (SimpleNet and ResNet18 by default) and record the variance "
        "of every Conv/Linear output, with He initialisation (the notebook's) and with the framework default "
        "(torch's kaiming_uniform(a=sqrt 5), which our Flax layers mirror, and Flax's stock lecun_normal), in torch "
        "and in Flax side by side: one bar chart (he_init.png) with the target line at 1, and a table of "
        "first/last/min/max variance per model, framework and init. It trains nothing and reads no data.",
        _he_init_options,
        lambda args: {**_given(args, models="models", batch="batch"), **({"stock": False} if args.no_stock else {})},
        takes=("seed",), refuses=("init_from", "framework", "dtype", "precision", *DEVICES),
        output=("out", "no_progress", "quick")),
    Command(
        experiments.ABLATION, "notebook 004's ablation study: ResNet18 with BatchNorm, without, with dropout",
        "Train ResNet18, ResNet18NoBN (BatchNorm replaced by identity) and ResNet18Dropout (dropout after each "
        "block) with notebook 004's recipe for the ablation study's 10 epochs, and write their curves in one figure "
        "(ablation.png), the final test accuracies (results.json: results.with_bn, without_bn, with_dropout, as the "
        "notebook's dict) and a table.",
        _ablation_options, lambda args: _given(args, dropout_p="p")),
    Command(
        experiments.LANDSCAPE, "notebook 004's 1-D loss landscape of trained plain and residual networks",
        "Evaluate the loss of trained networks along one random direction in parameter space, normalised as "
        "notebook 004 does (d/||d||, one norm over all parameters), at 21 points in [-1, 1] on a fixed batch in "
        "eval mode (BatchNorm statistics unperturbed), and plot the curves of a plain and a residual network of the "
        "same depth in one figure (landscape.png). The training options are for --quick without networks, which "
        "first trains PlainDeepCNN(1) and SimpleResNet(1) with notebook 000's recipe.",
        _landscape_options, _landscape_settings,
        epilog="\n\nexamples:\n"
               "  {prog} plain-vs-residual --out runs/pvr\n"
               "  {prog} landscape --plain runs/pvr/runs/PlainDeepCNN --residual runs/pvr/runs/SimpleResNet\n"
               "  {prog} landscape --relative --checkpoint runs/ResNet18-resnet18-cifar-jax"),
    Command(
        experiments.COMPARE, "train one recipe in Flax and in PyTorch from the same weights and batches; curves, speed",
        "Train one model with one recipe in JAX/Flax and in the PyTorch reference, both from the same initial "
        "weights (torch's, ported into Flax, or --init-from) and on the same batch stream, and write the curves "
        "overlaid with the throughput per epoch (compare.png) and a table of final accuracies, epoch times and "
        "images/s. In float32 each framework is also trained in float64 from the same weights on the same batches "
        "(thin lines): its float32 run's distance from its own float64 run is the gap rounding alone makes, the "
        "yardstick for the Flax-vs-torch gap (a second table). --parallel and --bn-sync hold for the Flax run.",
        _compare_options, lambda args: {"yardstick": False} if args.no_yardstick else {},
        takes=tuple(name for name in TRAINING if name not in ("framework", "precision")), refuses=("precision",)),
)


# ------------------------------------------------------------------------------------------ the parsers
def _shown(setting: str, value: Any) -> str:
    """A --quick value as the user would type it: --plain-blocks 1,1,1,1 2,2,2,2, --split both, a flag bare."""
    if setting in ("split", "splits"):
        return "both" if len(value) > 1 else value[0]
    if value is True:
        return ""
    if isinstance(value, tuple):
        return " ".join(",".join(map(str, v)) if isinstance(v, tuple) else str(v) for v in value)
    return str(value)


def _quick_epilog(preset: Preset) -> str:
    values = [*preset.data.items(), *preset.recipe.items(), *preset.model_kwargs.items()]
    values += [(SETTING_FLAGS.get(k, k), v) for k, v in preset.settings.items() if SETTING_FLAGS.get(k, k)]
    shown = ", ".join(f"--{k.replace('_', '-')} {_shown(k, v)}".rstrip() for k, v in values)
    if preset.model_kwargs:
        shown += " (where the model takes it)"
    # break at spaces only: an option's name split at its hyphen ("--test-" / "samples") reads as two words
    return "\n".join(textwrap.wrap(f"--quick sets (where not given): {shown}", 108, break_on_hyphens=False))


def _add_hidden(parser: argparse.ArgumentParser, *names: str) -> None:
    """Options of the table parsed but not shown: the experiment refuses them with its reason."""
    for name in names:
        option = options.OPTIONS[name]
        parser.add_argument(*option.flags, dest=name, help=argparse.SUPPRESS, **option.kwargs)


def add_parsers(subparsers: Any) -> list[argparse.ArgumentParser]:
    """One parser per experiment (``cli.SUBCOMMANDS`` calls this when it builds the parser)."""
    parsers = []
    for command in COMMANDS:
        name = command.experiment.name
        epilog = _quick_epilog(command.experiment.quick) + command.epilog.replace("{prog}", shell.program_name())
        p = subparsers.add_parser(name, help=command.help, description=command.description, epilog=epilog,
                                  formatter_class=shell.HelpFormatter)
        command.add_options(p)
        options.add(p, *command.takes, *command.output, helps={
            "out": f"here for figures, summary.md, results.json and the runs; default: {RUNS_DIR}/{name} "
                   f"({RUNS_DIR}/{name}-quick with --quick)",
            "resume": "here the runs already in --out (a finished run is read back, not trained again)",
            "quick": "what it sets: below"})
        _add_hidden(p, *command.refuses)
        p.set_defaults(handler=lambda args, parser, command=command: _run(command, args, parser), parser=p)
        parsers.append(p)
    return parsers


# ------------------------------------------------------------------------------------------ the handler
def _config(command: Command, args: argparse.Namespace) -> RunConfig:
    """The experiment's base config, its --quick preset, then the user's options (``options.run_config``). The
    recipe is the experiment's own (ablation's 10 epochs; depth's --recipe), its milestones scaled from it."""
    experiment = command.experiment
    preset = experiment.quick if args.quick else Preset("none")
    if (getattr(args, "dataset", None) or preset.data.get("dataset")) != "synthetic":  # image size: generated only
        preset = dataclasses.replace(preset, data={k: v for k, v in preset.data.items() if k != "image_size"})
    out = RUNS_DIR / (f"{experiment.name}-quick" if args.quick else experiment.name)
    if experiment is experiments.COMPARE:  # the model's own recipe, as `train`
        return options.run_config(args, model=experiment.base.model.name, preset=preset, out=out)
    recipe = RECIPES[args.recipe] if getattr(args, "recipe", None) else experiment.base.recipe
    config = options.run_config(args, recipe=recipe.name, preset=preset, out=out)
    recipe = with_recipe(recipe, **{**preset.recipe, **options.given(args, options.RECIPE_OVERRIDES)})
    return config.replace(recipe=recipe, model=ModelConfig(init_from=config.model.init_from))


def _run(command: Command, args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """A refusal (``ConfigError``, from the settings or the experiment before it writes anything) is the usage
    error that ``cli.main`` reports."""
    experiment = command.experiment
    config = _config(command, args)
    settings = experiment.settings(**{**(experiment.quick.settings if args.quick else {}), **command.settings(args)})
    out = config.output.out_dir
    module = importlib.import_module(f"flax_resnet.experiments.{experiment.module}")  # JAX: after parsing
    if config.data.dataset == "cifar10" and "dataset" in command.takes:  # he-init reads no data
        shell.quiet_tfds(config.output.progress)
    try:
        outcome = module.run(config, settings, progress=shell.progress_factory(config.output.progress),
                             log=shell.write_line)
    except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM
        print(f"\n{shell.interrupted_word(e)}; finished runs are kept in {out} (continue with --resume)",
              file=sys.stderr)
        return shell.interrupted_code(e)
    print()
    print(outcome.summary, end="")
    print(f"\n{experiment.name}: done in {outcome.seconds:.0f} s; outputs in {Path(outcome.out)}")
    return 0
