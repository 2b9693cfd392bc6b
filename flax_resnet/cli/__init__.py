"""The command line: ``python train.py [COMMAND] [OPTIONS]`` (no command: ``train`` with its defaults). This module
only parses and wires: the work is in ``flax_resnet.training``, ``store`` and ``port``, imported inside the handlers
so that ``--help`` is quick.

Adding a command: a function ``add_<name>_parser(subparsers)``, listed in ``SUBCOMMANDS``, that adds its parser
and options with ``parser.set_defaults(handler=<function(args, parser) -> exit code>, parser=parser)``
(``_add_parser`` does that).
Handlers report usage errors with ``parser.error(...)`` (exit 2) before doing anything; expected failures raise an
``errors.FlaxResnetError``, which ``main`` prints once as ``error: ...`` on stderr (exit 1, ``commands.fail``).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from flax_resnet import bench, registry, tables
from flax_resnet.cli import experiments, options, shell
from flax_resnet.cli import shell as commands
from flax_resnet.config import ConfigError
from flax_resnet.errors import EXTRAS, FlaxResnetError, installed, missing_extra, require
from flax_resnet.recipes import RECIPES

__all__ = ["SUBCOMMANDS", "add_port_parser", "add_selftest_parser", "add_train_parser", "add_verify_parser",
           "build_parser", "main"]

EXIT_INTERRUPTED = shell.EXIT_INTERRUPTED


def _add_parser(subparsers: Any, name: str, handler: Callable[..., int] | None, *, epilog: str,
                **kwargs: Any) -> argparse.ArgumentParser:
    """A command's parser and handler (None: ``flax_resnet.cli.<name>.run``, imported after parsing); ``{prog}``
    in the epilog is the program's name as the user typed it."""
    p = subparsers.add_parser(name, formatter_class=commands.HelpFormatter,
                              epilog=epilog.replace("{prog}", commands.program_name()), **kwargs)
    p.set_defaults(handler=handler, parser=p)
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
        subparsers, "train", None, help="train a model (the default command)",
        description="Train one of the notebooks' models with one of their recipes, in JAX/Flax or PyTorch. "
                    "Writes history.json, curves.png and a checkpoint per epoch to --out (default: "
                    "runs/<model>-<recipe>-<framework>, with -synthetic for the synthetic data).",
        epilog="recipes (the notebooks'; each number can be overridden by the option of the same name):\n"
               f"{_recipe_table()}\n\n"
               "examples:\n"
               "  {prog}                                           # ResNet18, notebook 004 recipe, CIFAR-10\n"
               "  {prog} train --dataset synthetic --model SimpleResNet --n-blocks 1 --epochs 3   # no data\n"
               "  {prog} train --model PlainDeepCNN --recipe plain-vs-residual --framework torch\n"
               "  {prog} train --resume                            # continue the default run\n")
    return options.add(p, "model", "recipe", "framework", *options.MODEL_OPTIONS, "init_from", "dtype", "precision",
                       "seed", *options.DATA, *options.RECIPE_OVERRIDES, *options.PARALLEL, *options.OUTPUT)


def _given_model(args: argparse.Namespace, parser: argparse.ArgumentParser) -> tuple[str, dict] | None:
    """--model with its constructor arguments, or None when the weights are to name their model."""
    if args.model is None:
        if options.given(args, options.MODEL_OPTIONS):
            parser.error("model options (--n-blocks, ...) need --model")
        return None
    return args.model, options.model_kwargs(args, args.model)


# -------------------------------------------------------------------------------------------------- port
def _add_model_options(p: argparse.ArgumentParser, model_help: str) -> None:
    """``port``'s and ``verify``'s --model and model options (``_given_model`` reads them)."""
    p.add_argument("--model", choices=registry.model_names(), metavar="NAME", help=model_help)
    options.add(p, *options.MODEL_OPTIONS)


def add_port_parser(subparsers: Any) -> argparse.ArgumentParser:
    """The ``port`` command: torch .pt <-> Flax checkpoint."""
    p = _add_parser(
        subparsers, "port", run_port, help="convert weights: torch .pt <-> Flax checkpoint",
        description="Convert a torch state_dict (.safetensors or .pt) into a Flax checkpoint directory, or a Flax "
                    "checkpoint (a port output or a training run's --out, of either framework) into a state_dict file "
                    "that the torch model loads with strict=True: .safetensors (needs no torch; read it with "
                    "safetensors.torch.load_file) or .pt. The direction follows --from: a file is a state_dict, a "
                    "directory a checkpoint.",
        epilog="examples:\n"
               "  {prog} port --from resnet18.safetensors --to ckpt/resnet18\n"
               "  {prog} port --from runs/ResNet18-resnet18-cifar-jax --to resnet18.safetensors\n"
               "  {prog} port --from runs/ResNet18-resnet18-cifar-jax --to resnet18.pt\n")
    p.add_argument("--from", dest="source", type=commands.expanded_path, required=True, metavar="PATH",
                   help="a state_dict file (.safetensors or .pt), or a checkpoint directory")
    p.add_argument("--to", dest="target", type=commands.expanded_path, required=True, metavar="PATH",
                   help="the checkpoint directory to create (from a file), or the .safetensors or .pt file to write")
    _add_model_options(p, "the model the weights belong to; default: a checkpoint's own record, or, for a .pt, the "
                          "one registered model whose keys and shapes fit")
    p.add_argument("--step", type=int, help="which checkpoint step to read (default: the latest)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --to .pt file")
    return p


def run_port(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    src, dst = args.source, args.target
    if not src.exists():
        parser.error(f"--from {src}: no such file or directory")
    given = _given_model(args, parser)
    if src.is_file():
        if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
            parser.error(f"--to {dst} exists and is not an empty directory")
    elif dst.is_dir():
        parser.error(f"--to {dst} is a directory; give the .pt file to write")
    elif dst.exists() and not args.overwrite:
        parser.error(f"--to {dst} exists; pass --overwrite to replace it")

    from flax_resnet import weights

    dtype = weights.read_meta(src, args.step).get("dtype", "float32")
    if dtype == "float64":
        import jax

        jax.config.update("jax_enable_x64", True)
    model, name, kwargs = weights.load_model(src, "jax", model=given, step=args.step)
    meta = {"model": name, "model_kwargs": kwargs, "dtype": dtype, "source": str(src)}
    _written(dst, lambda: weights.save(model, dst, meta))
    print(f"wrote {name} {kwargs or ''} as {'a Flax checkpoint' if src.is_file() else 'a torch state_dict'} to {dst}")
    return 0


def _written(dst: Path, write: Callable[[], Any]) -> None:
    """Run ``write``; a failed write (read-only file system, full disk) is one error naming the cause, with no
    partial file left (torch reports a failed write as a RuntimeError)."""
    try:
        write()
    except (OSError, RuntimeError) as e:
        cause = e.strerror if isinstance(e, OSError) and e.strerror else " ".join(str(e).split())[:200]
        raise FlaxResnetError(f"could not write {dst} ({cause}); nothing was written there. Free space or choose "
                              "another --to.") from e


# ------------------------------------------------------------------------------------------------ verify
def add_verify_parser(subparsers: Any) -> argparse.ArgumentParser:
    """The ``verify`` command: ``parity.compare`` of a registered model's two frameworks on the user's weights."""
    p = _add_parser(
        subparsers, "verify", run_verify,
        help="check that the Flax port computes what the torch model computes, layer by layer",
        description="Load weights into the PyTorch model, port them into its Flax NNX twin as `port` does, and run "
                    "both on the same batch (flax_resnet.parity.compare): every layer's output in eval and train "
                    "mode, the BatchNorm running statistics after a train-mode pass, every parameter's gradient. "
                    "Prints the table and the first layer where they part, if any. In float32 (the default) a "
                    "comparison beyond the float32 tolerance is decided against the same comparison in float64: a "
                    "port defect if float64 differs too, else float32 rounding (a ReLU near zero flips in one "
                    "framework only); and each layer's own float32 error, on torch's float64 input to it, is "
                    "compared between the frameworks (a precision loss when one is far larger). Exit code 0 when "
                    "every comparison is within parity, 1 on a port defect or a precision loss.",
        epilog="examples:\n"
               "  {prog} verify --model ResNet18                          # torch's own initialisation\n"
               "  {prog} verify --weights resnet18.safetensors --float64  # the model is inferred\n"
               "  {prog} verify --model SimpleResNet --n-blocks 5 --weights runs/SimpleResNet-plain-vs-residual-jax\n"
               "  {prog} verify --model SimpleResNet --n-blocks 1 --steps 3 --steps-per-epoch 2  # training steps\n")
    _add_model_options(p, "the model to check; default: the one registered model whose keys and shapes fit --weights")
    p.add_argument("--weights", type=commands.expanded_path, metavar="PATH",
                   help="a torch state_dict (.safetensors or .pt) or a checkpoint directory of either framework; "
                        "default: torch's initialisation from --seed")
    p.add_argument("--float64", action="store_true",
                   help="compare in float64 only, where agreement proves the port exact (to ~1e-14); default "
                        "float32, what a float32 run sees, with float64 references deciding any comparison beyond "
                        "its tolerance (see flax_resnet.parity.TOLERANCES for both tolerances)")
    p.add_argument("--batch-size", type=commands.number(int, minimum=2), default=4, metavar="N",
                   help="images in the random NCHW batch (default: %(default)s; at least 2 for train-mode BatchNorm)")
    p.add_argument("--image-size", type=commands.number(int, minimum=8), default=32, metavar="PX",
                   help="side of the images (default: %(default)s)")
    p.add_argument("--seed", type=commands.seed, default=0, metavar="N",
                   help="seed of the batch, the labels and, without --weights, torch's initialisation (default: 0)")
    p.add_argument("--steps", type=commands.number(int, minimum=1), metavar="K",
                   help="compare K training steps instead (flax_resnet.parity.compare_training) with the model's "
                        "recipe's optimizer and schedule in each framework: after every step the loss, every "
                        "parameter, BatchNorm statistic and momentum buffer, and the cause named if the numbers fit "
                        "a known trap. Always in float64, where agreement proves the steps equal: float32 rounding "
                        "grows from step to step, and a float32 difference is a defect only if float64 shows it "
                        "too, so a float32 run could not change the verdict")
    p.add_argument("--steps-per-epoch", type=commands.number(int, minimum=1), default=1, metavar="N",
                   help="with --steps: the steps of an epoch, after which torch's scheduler is stepped (default: "
                        "%(default)s, so K steps follow the schedule through its first K epochs)")
    return p


def run_verify(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    given = _given_model(args, parser)
    if args.weights is None and given is None:
        parser.error("name the model with --model, or give --weights to infer it from")
    if args.weights is not None and not args.weights.exists():
        parser.error(f"--weights {args.weights}: no such file or directory")

    from flax_resnet import builders, parity, port, weights

    torch_model, name, kwargs = weights.load_model(args.weights, "torch", model=given, seed=args.seed)
    flax_model = builders.build_flax_to_fill(name, kwargs)
    port.load_torch_state_dict(flax_model, torch_model.state_dict())  # the port under test
    source = f"torch's initialisation, seed {args.seed}" if args.weights is None else str(args.weights)
    print(f"verifying {registry.constructor_call(name, kwargs)} with {source}", flush=True)
    if args.steps is not None:
        return _verify_training(args, torch_model, flax_model, registry.get_spec(name).recipe)
    report = parity.compare(torch_model, flax_model, dtype="float64" if args.float64 else "float32",
                            input_shape=(args.batch_size, 3, args.image_size, args.image_size), seed=args.seed)
    print(report.table())
    return 0 if report.ok else 1


def _verify_training(args: argparse.Namespace, torch_model: Any, flax_model: Any, recipe_name: str) -> int:
    """``verify --steps``: the recipe's optimizer and schedule as each framework's trainer builds them."""
    from flax_resnet import parity
    from flax_resnet.training import engine
    from torch_ref import train as notebook

    recipe = RECIPES[recipe_name]
    print(f"recipe {recipe.name}: SGD(lr={recipe.lr}, momentum={recipe.momentum}, weight_decay={recipe.weight_decay}), "
          f"{recipe.schedule} schedule, steps per epoch: {args.steps_per_epoch}", flush=True)
    report = parity.compare_training(
        torch_model, flax_model,
        lambda params: notebook.make_optimizer(params, recipe.lr, recipe.momentum, recipe.weight_decay),
        engine.make_optimizer(recipe, args.steps_per_epoch), steps=args.steps,
        torch_scheduler=lambda optimizer: notebook.make_scheduler(optimizer, recipe.schedule, recipe.epochs,
                                                                  recipe.milestones, recipe.gamma),
        steps_per_epoch=args.steps_per_epoch, input_shape=(args.batch_size, 3, args.image_size, args.image_size),
        seed=args.seed)
    print(report.table())
    return 0 if report.ok else 1


# ---------------------------------------------------------------------------------------------- selftest
def add_selftest_parser(subparsers: Any) -> argparse.ArgumentParser:
    """The ``selftest`` command: parity and speed on this machine (``flax_resnet.selftest``)."""
    parts = ("parity", "default-precision", "bench", "torch.compile", "epochs")  # selftest.PARTS, not imported here
    p = _add_parser(
        subparsers, "selftest", run_selftest, help="check parity and measure speed on this machine",
        description="In one process, on the device JAX sees: parity of every notebook model with the PyTorch reference "
                    "(float64 and float32 at full precision; float32 again at each framework's default precision, for "
                    "information), the benchmark of ResNet-18 at batch 512 in bf16 and fp32, and two epochs of "
                    "ResNet-18 on CIFAR-sized synthetic data (the epoch time and what 20 would take). Writes "
                    "selftest.json and selftest.md to --out and prints the report. Exit code 1 when a parity row fails "
                    "(the report names the model) or a part fails. Full: an estimated 7-7.5 minutes on one H100/H200; "
                    "--quick: 1.5-2 minutes on a 2-core CPU. Needs no data set and no network.",
        epilog="examples:\n"
               "  {prog} selftest --quick                        # CPU-sized, same code paths\n"
               "  {prog} selftest --out runs/selftest-h100       # on a GPU\n"
               "  {prog} selftest --skip torch.compile           # two minutes less\n")
    p.add_argument("--quick", action="store_true",
                   help="CPU-sized: small models, bench --quick, two tiny epochs (1.5-2 minutes on 2 cores)")
    p.add_argument("--out", type=commands.expanded_path, default=Path(commands.RUNS_DIR) / "selftest", metavar="DIR",
                   help="where selftest.json and selftest.md go (default: %(default)s)")
    p.add_argument("--skip", nargs="+", choices=parts, default=[], metavar="PART",
                   help=f"parts to leave out: {', '.join(parts)} (torch.compile: the bench's torch.compile rows)")
    return p


def run_selftest(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"--out {args.out} is a file, not a directory")
    require("torch", "selftest (it compares with the PyTorch models)")
    from flax_resnet import selftest

    doc = selftest.run(args.out, quick=args.quick, skip=args.skip)
    print(selftest.to_markdown(doc), end="")
    print(f"{'PASS' if doc['ok'] else 'FAIL'}: report in {args.out}", file=sys.stderr)
    return 0 if doc["ok"] else 1


# -------------------------------------------------------------------------------------------------- main
SUBCOMMANDS: list[Callable[[Any], Any]] = [add_train_parser, add_port_parser, add_verify_parser,
                                           experiments.add_parsers,
                                           lambda sub: bench.add_bench_parser(sub), add_selftest_parser]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=commands.program_name(), formatter_class=commands.HelpFormatter,
        description="The ResNets of two PyTorch course notebooks, in JAX/Flax NNX and in PyTorch: training, "
                    "weight porting and more. Without a command, runs `train` (ResNet18, the notebook-004 "
                    "recipe, CIFAR-10); options before a command are taken as `train`'s.",
        epilog=f"`{commands.program_name()} COMMAND --help` explains each command's options.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default: ``sys.argv[1:]``), run the command, return its exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv = ["train", *argv]
    args = build_parser().parse_args(argv)
    from flax_resnet.training.cpu import tune_allocator

    tune_allocator()  # before JAX starts: every command's CPU steps profit (see its docstring)
    # a command's module is imported only now, so that --help stays quick (no JAX, torch, TFDS or matplotlib)
    handler = args.handler or importlib.import_module(f"flax_resnet.cli.{args.command}").run
    try:
        code = handler(args, args.parser)
    except ConfigError as e:  # settings that cannot go together: a usage error, as argparse's own (exit 2)
        args.parser.error(str(e))
    except FlaxResnetError as e:
        return commands.fail(str(e))
    except ModuleNotFoundError as e:  # an optional dependency that the commands' own checks did not foresee
        missing = (e.name or "").partition(".")[0]
        if missing not in EXTRAS or installed(missing):
            raise
        return commands.fail(str(missing_extra(missing, args.command)))
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        code = EXIT_INTERRUPTED
    if code == EXIT_INTERRUPTED:
        # Leave at once: XLA may still be compiling on its own threads, and tearing the interpreter down under them
        # crashed with a segmentation fault (exit 139) in 13 of 17 interrupts during the first compile (measured).
        # Everything worth keeping is already written, and the --out lock is released.
        shell.exit_now(EXIT_INTERRUPTED)
    return code


if __name__ == "__main__":
    sys.exit(main())
