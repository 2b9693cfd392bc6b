"""The command line: ``python train.py [COMMAND] [OPTIONS]`` (no command: ``train`` with its defaults). This module
only declares the parsers, from the one table of options (``options``); the command that was asked for runs in
``flax_resnet.cli.<command>``, imported after parsing so that ``--help`` loads no framework.

Adding a command: a function ``add_<name>_parser(subparsers)`` listed in ``SUBCOMMANDS`` that adds its parser with
``_add_parser`` and its options with ``options.add``, and a module ``flax_resnet/cli/<name>.py`` whose
``run(args, parser) -> exit code`` turns the parsed options into typed values and calls the library. Settings that
cannot go together raise ``config.ConfigError`` (a usage error, exit 2); expected failures raise an
``errors.FlaxResnetError``, which ``main`` prints once as ``error: ...`` on stderr (exit 1, ``shell.fail``).
"""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import flax_resnet
from flax_resnet import registry, tables
from flax_resnet.cli import experiments, options, shell
from flax_resnet.config import BENCH_QUICK, RUNS_DIR, BenchConfig, ConfigError
from flax_resnet.errors import EXTRAS, FlaxResnetError, Note, installed, missing_extra
from flax_resnet.recipes import RECIPES

__all__ = ["SUBCOMMANDS", "add_bench_parser", "add_port_parser", "add_selftest_parser", "add_train_parser",
           "add_verify_parser", "build_parser", "main"]

EXIT_INTERRUPTED = shell.EXIT_INTERRUPTED


def _add_parser(subparsers: Any, name: str, *, epilog: str, **kwargs: Any) -> argparse.ArgumentParser:
    """A command's parser, run by ``flax_resnet.cli.<name>.run`` (imported after parsing); ``{prog}`` in the
    epilog is the program's name as the user typed it."""
    p = subparsers.add_parser(name, formatter_class=shell.HelpFormatter,
                              epilog=epilog.replace("{prog}", shell.program_name()), **kwargs)
    p.set_defaults(handler=None, parser=p)
    return p


# ------------------------------------------------------------------------------------------------- train
def _recipe_table() -> str:
    """The recipes as a table, then each recipe's models (those whose notebook it is: their default recipe)."""
    rows = [["recipe", "model", "epochs", "batch", "eval", "lr", "momentum", "wd", "schedule", "augment", "loss mean",
             "std"]]
    for r in RECIPES.values():
        schedule = {"multistep": f"multistep {list(r.milestones)} x{r.gamma:g}", "cosine": "cosine (T_max = epochs)"}
        rows.append([str(v) for v in (r.name, r.model, r.epochs, r.batch_size, r.eval_batch_size, r.lr, r.momentum,
                                      r.weight_decay, schedule.get(r.schedule, r.schedule),
                                      "crop+flip" if r.augment else "none", r.train_loss_mean,
                                      " ".join(f"{s:g}" for s in r.std))])
    lines = [tables.format_table(rows[0], rows[1:], align="l" * len(rows[0]), indent="  ")]
    mean = " ".join(f"{m:g}" for m in next(iter(RECIPES.values())).mean)
    models = [f"  {r}: {', '.join(s.name for s in registry.MODELS.values() if s.recipe == r)}" for r in RECIPES]
    return "\n".join([*lines, f"  (mean {mean} in both)", "", "models (--model), by recipe: a model's default recipe "
                      "is its notebook's (the model options and their defaults: above)", *models])


def add_train_parser(subparsers: Any) -> argparse.ArgumentParser:
    """The ``train`` command and its options (``cli.train`` runs it)."""
    p = _add_parser(
        subparsers, "train", help="train a model (the default command)",
        description="Train one of the notebooks' models with one of their recipes, in JAX/Flax or PyTorch. "
                    "Writes history.json, curves.png, TensorBoard event files and a checkpoint per epoch to --out "
                    "(default: runs/<model>-<recipe>-<framework>, with -synthetic for the synthetic data).",
        epilog="recipes (the notebooks'; each number can be overridden by the option of the same name):\n"
               f"{_recipe_table()}\n\n"
               "examples:\n"
               "  {prog}                                           # ResNet18, notebook 004 recipe, CIFAR-10\n"
               "  {prog} train --dataset synthetic --model SimpleResNet --n-blocks 1 --epochs 3   # no data\n"
               "  {prog} train --model PlainDeepCNN --recipe plain-vs-residual --framework torch\n"
               "  {prog} train --resume                            # continue the default run\n")
    return options.add(p, "model", "recipe", "framework", *options.MODEL_OPTIONS, "init_from", "dtype", "precision",
                       "seed", *options.DATA, *options.RECIPE_OVERRIDES, *options.PARALLEL, *options.OUTPUT,
                       helps={"model": "default: the recipe's model"})


# -------------------------------------------------------------------------------------------------- port
def add_port_parser(subparsers: Any) -> argparse.ArgumentParser:
    """The ``port`` command: weights from one form to another (``cli.port`` runs it)."""
    p = _add_parser(
        subparsers, "port", help="convert weights: a torch state_dict <-> a Flax checkpoint",
        description="Read weights (a state_dict file, .safetensors or .pt, or a checkpoint directory of either "
                    "framework: a port output or a training run's --out) and write them in the form --to names: a "
                    ".safetensors file (needs no torch; safetensors.torch.load_file reads it), a .pt file "
                    "(torch.load), both of which the torch model loads with strict=True, or else a new checkpoint "
                    "directory.",
        epilog="examples:\n"
               "  {prog} port --from resnet18.safetensors --to ckpt/resnet18\n"
               "  {prog} port --from runs/ResNet18-resnet18-cifar-jax --to resnet18.safetensors\n"
               "  {prog} port --from runs/ResNet18-resnet18-cifar-jax --to resnet18.pt\n")
    return options.add(p, "source", "target", "model", *options.MODEL_OPTIONS, "step", "overwrite", helps={
        "model": "the one the weights belong to; default: a checkpoint's own record, or the one registered model "
                 "whose keys and shapes fit a state_dict"})


# ------------------------------------------------------------------------------------------------ verify
def add_verify_parser(subparsers: Any) -> argparse.ArgumentParser:
    """The ``verify`` command: ``parity.compare`` of a registered model's two frameworks on the user's weights."""
    p = _add_parser(
        subparsers, "verify",
        help="check that the Flax port computes what the torch model computes, layer by layer",
        description="Load weights into the PyTorch model, port them into its Flax NNX twin as `port` does, and run "
                    "both on the same random batch (flax_resnet.parity.compare): every layer's output in eval and "
                    "train mode, the BatchNorm running statistics, every parameter's gradient. Prints the table and "
                    "the first layer where they part, if any (how float32 results are judged: docs/parity.md). Exit "
                    "code 0 when every comparison is within parity, 1 on a port defect or a precision loss.",
        epilog="examples:\n"
               "  {prog} verify --model ResNet18                          # torch's own initialisation\n"
               "  {prog} verify --weights resnet18.safetensors --float64  # the model is inferred\n"
               "  {prog} verify --model SimpleResNet --n-blocks 5 --weights runs/SimpleResNet-plain-vs-residual-jax\n"
               "  {prog} verify --model SimpleResNet --n-blocks 1 --steps 3 --steps-per-epoch 2  # training steps\n"
               "  {prog} verify --model SimpleResNet --n-blocks 1 --devices 2 --bn-sync off  # vs torch DDP\n")
    return options.add(
        p, "model", *options.MODEL_OPTIONS, "weights", "float64", "batch", "image_size", "seed", "steps",
        "steps_per_epoch", "devices", "bn_sync",
        defaults={"batch": 4, "image_size": 32, "seed": 0, "steps_per_epoch": 1},
        helps={
            "model": "the one to check; default: the one registered model whose keys and shapes fit --weights",
            "batch": "here of the random NCHW batch; with --devices the global batch of each step",
            "seed": "here of the batch, the labels and, without --weights, torch's initialisation",
            "steps": "here K training steps of the model's recipe in each framework, compared after every step "
                     "(flax_resnet.parity.compare_training, always in float64) instead of one pass",
            "devices": "here K steps (--steps, default 2) on one device, on N devices with every --parallel kind and "
                       "with torch DDP on N processes (gloo, 127.0.0.1), in float64, compared with DDP: one row per "
                       "path (flax_resnet.parity.devices; docs/multi-device.md)",
            "bn_sync": "here with --devices: DDP with a synchronised BatchNorm (on) or plain BatchNorm (off)"})


# ---------------------------------------------------------------------------------------------- selftest
def add_selftest_parser(subparsers: Any) -> argparse.ArgumentParser:
    """The ``selftest`` command: parity and speed on this machine (``flax_resnet.selftest``)."""
    p = _add_parser(
        subparsers, "selftest", help="check parity and measure speed on this machine",
        description="In one process, on the device JAX sees: parity of every notebook model with the PyTorch reference "
                    "(float64 and float32 at full precision; float32 at each framework's default precision, for "
                    "information), the benchmark of ResNet-18 at batch 512 in bf16 and fp32, and two epochs of "
                    "ResNet-18 on CIFAR-sized synthetic data. Writes selftest.json and selftest.md to --out and prints "
                    "the report. Exit code 1 when a parity row or a part fails. Full: about 7-7.5 minutes on one "
                    "H100/H200; --quick: 1.5-2 minutes on a 2-core CPU. Needs no data set and no network.",
        epilog="examples:\n"
               "  {prog} selftest --quick                        # CPU-sized, same code paths\n"
               "  {prog} selftest --out runs/selftest-h100       # on a GPU\n"
               "  {prog} selftest --skip torch.compile           # two minutes less\n")
    return options.add(p, "quick", "out", "skip", defaults={"out": RUNS_DIR / "selftest"}, helps={
        "quick": "here small models, bench --quick and two tiny epochs",
        "out": "here for selftest.json and selftest.md"})


# ------------------------------------------------------------------------------------------------- bench
def _bench_preset(config: BenchConfig) -> str:
    model = registry.constructor_call(config.model, config.model_kwargs)
    return (f"{model}, batch {config.batch_size}, {config.warmup} + {config.steps} steps, a {config.epoch_images:,}-"
            f"image epoch, torch.compile {'on' if config.torch_compile else 'off'}")


def add_bench_parser(subparsers: Any) -> argparse.ArgumentParser:
    """The ``bench`` command: the Flax step against torch's (``flax_resnet.bench``)."""
    p = _add_parser(
        subparsers, "bench", help="speed: the Flax train step against torch eager / channels_last / torch.compile",
        description="Time the Flax training path against PyTorch eager, channels_last and torch.compile + "
                    "channels_last on one device (same model, batch, precision and synthetic data): train step, eval "
                    "step and a whole epoch. Prints a table (its columns: BENCHMARKS.md); --json writes the rows.",
        epilog=f"defaults: {_bench_preset(BenchConfig())}, fp32\n"
               f"--quick sets (where not given): {_bench_preset(BENCH_QUICK)}\n\n"
               "examples:\n"
               "  {prog} bench --quick\n"
               "  {prog} bench --model ResNet18 --batch-size 512 --precision bf16 --json bench.json\n")
    return options.add(p, "model", *options.MODEL_OPTIONS, "batch_size", "precision", "steps", "warmup",
                       "epoch_images", "torch_compile", "seed", "quick", "json",
                       helps={"batch_size": "here of the timed steps", "steps": "here timed per row",
                              "quick": "here CI-sized, well under a minute on 2 cores (what it sets: below)"})


# -------------------------------------------------------------------------------------------------- main
SUBCOMMANDS: list[Callable[[Any], Any]] = [add_train_parser, add_port_parser, add_verify_parser,
                                           experiments.add_parsers, add_bench_parser, add_selftest_parser]


def build_parser() -> argparse.ArgumentParser:
    return _build()[0]


def _build() -> tuple[argparse.ArgumentParser, list[str]]:
    """The parser, and the names of its commands."""
    parser = argparse.ArgumentParser(
        prog=shell.program_name(), formatter_class=shell.HelpFormatter,
        description="The ResNets of two PyTorch course notebooks, in JAX/Flax NNX and in PyTorch: training, "
                    "weight porting and more. Without a command, runs `train` (ResNet18, the notebook-004 "
                    "recipe, CIFAR-10); options before a command are taken as `train`'s.",
        epilog=f"`{shell.program_name()} COMMAND --help` explains each command's options.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {flax_resnet.__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(subparsers)
    return parser, list(subparsers.choices)


def _notes_as_lines(show: Callable[..., None]) -> Callable[..., None]:
    def show_note(message: Warning | str, category: type[Warning], *args: Any, **kwargs: Any) -> None:
        if issubclass(category, Note):
            print(f"note: {message}", file=sys.stderr, flush=True)
        else:
            show(message, category, *args, **kwargs)
    return show_note


def _parse(argv: list[str]) -> argparse.Namespace:
    """argparse's, except that a command among the arguments ``train`` did not recognise (``--model X verify``:
    options before a command are taken as ``train``'s) gets the order that works."""
    parser, commands = _build()
    args, extra = parser.parse_known_args(argv)
    if extra:
        command = next((name for name in extra if name in commands), None)
        if argv[0] == "train" and command is not None:
            at = len(argv) - 1 - argv[::-1].index(command)  # the stray one: an earlier one may be a value
            rest = argv[1:at] + argv[at + 1:]
            parser.error(f"options follow the command: {shell.program_name()} {' '.join([command, *rest])} "
                         "(options before a command are taken as train's).")
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default: ``sys.argv[1:]``), run the command, return its exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version")):
        argv = ["train", *argv]
    args = _parse(argv)
    from flax_resnet.training.cpu import tune_allocator

    tune_allocator()  # before JAX starts: every command's CPU steps profit (see its docstring)
    try:
        # a command's module is imported only now, so that --help stays quick (no JAX, torch, TFDS or matplotlib)
        handler = args.handler or importlib.import_module(f"flax_resnet.cli.{args.command}").run
        # SIGTERM (kill, SLURM, containers) is handled as Ctrl-C is; each Note is one line, as the commands' own
        # notes; other warnings show as they are
        with shell.handle_sigterm(), warnings.catch_warnings():
            warnings.simplefilter("always", Note)
            warnings.showwarning = _notes_as_lines(warnings.showwarning)
            code = handler(args, args.parser)
    except ConfigError as e:  # settings that cannot go together: a usage error, as argparse's own (exit 2)
        args.parser.error(str(e))
    except FlaxResnetError as e:
        return shell.fail(str(e))
    except ModuleNotFoundError as e:  # an optional dependency that the commands' own checks did not foresee
        missing = (e.name or "").partition(".")[0]
        if missing not in EXTRAS or installed(missing):
            raise
        return shell.fail(str(missing_extra(missing, args.command)))
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM (shell.Terminated)
        print(f"\n{shell.interrupted_word(e)}", file=sys.stderr)
        code = shell.interrupted_code(e)
    if code in (shell.EXIT_INTERRUPTED, shell.EXIT_TERMINATED):
        # Leave at once: XLA may still be compiling on its own threads, and tearing the interpreter down under them
        # crashed with a segmentation fault (exit 139) in 13 of 17 interrupts during the first compile (measured).
        # Everything worth keeping is already written, and the --out lock is released.
        shell.exit_now(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
