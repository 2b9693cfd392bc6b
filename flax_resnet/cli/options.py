"""Every command-line option, declared once in ``OPTIONS`` (flags, type, help, help group) and shared by the
commands that take it, with one meaning everywhere; ``add`` puts named options on a parser, ``run_config`` turns
what was parsed into a ``config.RunConfig``.

An option the user did not give parses to None (a flag: None, not False), so a default lives in one place: the
config's dataclasses, the recipe, or a command's ``Preset``, applied before the user's values. Only the standard
library and the light project modules (registry, recipes, config) are imported: ``--help`` reads this table.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from flax_resnet import registry
from flax_resnet.config import (
    IMAGE_SIZE_WHY,
    MAX_IMAGE_SIZE,
    RUNS_DIR,
    SELFTEST_PARTS,
    ConfigError,
    DataConfig,
    ModelConfig,
    OutputConfig,
    ParallelConfig,
    Preset,
    RunConfig,
    with_recipe,
)
from flax_resnet.recipes import PARALLEL_KINDS, PRECISIONS, RECIPES, Recipe

__all__ = ["DATA", "DEFAULT_RECIPE", "MODEL_OPTIONS", "OPTIONS", "OUTPUT", "PARALLEL", "RECIPE_OVERRIDES", "Option",
           "add", "chosen_model", "expanded_path", "finite_float", "given", "model_kwargs", "number", "program_name",
           "run_config", "seed"]

DEFAULT_RECIPE = "resnet18-cifar"


def program_name() -> str:
    """The program as the user started it, for usage lines and examples: ``flax-resnet`` (the console script),
    ``python -m flax_resnet`` or ``python train.py`` (a checkout's script; a non-editable install has none)."""
    argv0 = Path(sys.argv[0] if sys.argv and sys.argv[0] and sys.argv[0] != "-c" else "flax-resnet")
    if argv0.name == "__main__.py":
        return "python -m flax_resnet"
    if argv0.suffix == ".py":
        return f"python {argv0.name}"
    return argv0.name


# ------------------------------------------------------------------------------------------ value types
def number(kind: type = float, *, minimum: float | None = None, maximum: float | None = None,
           exclusive_min: bool = False, exclusive_max: bool = False, why: str = "") -> Callable[[str], Any]:
    """An argparse type for a finite ``kind`` (float or int) in a range: nan and inf are refused at parse time (they
    would train for a while and then diverge, or silently give meaningless results)."""
    noun = "an integer" if kind is int else "a finite number"

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        low_ok = minimum is None or (value > minimum if exclusive_min else value >= minimum)
        high_ok = maximum is None or (value < maximum if exclusive_max else value <= maximum)
        if not (low_ok and high_ok) or (kind is float and not math.isfinite(value)):
            limits = ((">" if exclusive_min else ">=", minimum), ("<" if exclusive_max else "<=", maximum))
            rule = " and ".join(f"{op} {limit}" for op, limit in limits if limit is not None)
            raise argparse.ArgumentTypeError(f"must be {noun}{' ' + rule if rule else ''}{why}, got {text}")
        return value

    return parse


finite_float = functools.partial(number, float)
# JAX seeds are 32-bit: a larger seed would wrap (2**32 trained exactly like 0)
seed = number(int, minimum=0, maximum=2**32 - 1, why=" (JAX seeds are 32-bit)")


def expanded_path(text: str) -> Path:
    """A path option with ``~`` expanded: the shell leaves ``--out=~/x`` as it is, and a directory named ``~``
    would be created beside the one the user meant."""
    return Path(text).expanduser()


# --------------------------------------------------------------------------------------------- the table
@dataclasses.dataclass(frozen=True)
class Option:
    """One option: its flags, help group and help, and ``argparse.add_argument``'s other keywords. Its ``dest``
    is the table's key."""

    flags: tuple[str, ...]
    group: str
    help: str
    kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)


WHAT, MODEL, RECIPE, DATA_GROUP, HOSTS, OUT = ("what to train", "model options",
                                               "recipe overrides (default: the recipe's value)", "data",
                                               "devices and hosts", "output")
FLAG = {"action": "store_true", "default": None}  # None when not given, so a preset's value can stand


def _model_option(arg: registry.ModelArg) -> Option:
    """A ``registry.MODEL_ARGS`` entry as an option; the registry keeps the bounds, this makes the argparse type."""
    kind = number(arg.kind, minimum=arg.minimum, maximum=arg.maximum, exclusive_max=arg.exclusive_max)
    takers = ", ".join(s.name for s in registry.MODELS.values() if arg.name in s.args)
    return Option((arg.flag,), MODEL, f"{arg.help} ({takers} only)",
                  {"type": kind, "nargs": arg.nargs, "metavar": arg.metavar})


OPTIONS: dict[str, Option] = {
    # what to train
    "model": Option(("--model",), WHAT, "model class (listed in `train --help`)",
                    {"choices": registry.model_names(), "metavar": "NAME"}),
    "recipe": Option(("--recipe",), WHAT, f"training recipe (see `train --help`); default: the model's notebook's, "
                     f"{DEFAULT_RECIPE} when no model is given", {"choices": list(RECIPES), "metavar": "NAME"}),
    "framework": Option(("--framework",), WHAT, "train the Flax model, or the PyTorch reference on the same batch "
                        "stream (default: jax)", {"choices": ("jax", "torch")}),
    "init_from": Option(("--init-from",), WHAT, "initial weights: a state_dict (.safetensors or .pt) or a checkpoint "
                        "directory of either framework; default: the framework's own initialisation from --seed. "
                        "Ignored when --resume finds a checkpoint", {"type": expanded_path, "metavar": "PATH"}),
    "dtype": Option(("--dtype",), WHAT, "floating-point type of weights and computation (default: float32)",
                    {"choices": ("float32", "float64")}),
    "precision": Option(("--precision",), WHAT, "bf16: bfloat16 convolutions and activations with float32 weights "
                        "and statistics (docs/speed.md); default: fp32", {"choices": PRECISIONS}),
    "seed": Option(("--seed",), WHAT, "seed of the initialisation, the batch order and augmentation, and generated "
                   "inputs (default: 0)", {"type": seed, "metavar": "N"}),
    # model options: one per registry.MODEL_ARGS entry
    **{name: _model_option(arg) for name, arg in registry.MODEL_ARGS.items()},
    # recipe overrides: one per number of a Recipe
    "epochs": Option(("--epochs",), RECIPE, "number of epochs; multistep milestones not given scale with it",
                     {"type": number(int, minimum=1), "metavar": "N"}),
    "batch_size": Option(("--batch-size",), RECIPE, "training batch size (the last batch of an epoch may be short)",
                         {"type": number(int, minimum=1), "metavar": "N"}),
    "eval_batch_size": Option(("--eval-batch-size",), RECIPE, "test batch size",
                              {"type": number(int, minimum=1), "metavar": "N"}),
    "lr": Option(("--lr",), RECIPE, "initial learning rate of SGD",
                 {"type": finite_float(minimum=0, exclusive_min=True)}),
    "momentum": Option(("--momentum",), RECIPE, "SGD momentum, in [0, 1)",
                       {"type": finite_float(minimum=0, maximum=1, exclusive_max=True), "metavar": "M"}),
    "weight_decay": Option(("--weight-decay",), RECIPE, "SGD weight decay (coupled, on every parameter)",
                           {"type": finite_float(minimum=0), "metavar": "WD"}),
    "schedule": Option(("--schedule",), RECIPE, "learning-rate schedule, stepped per epoch",
                       {"choices": ("multistep", "cosine", "constant")}),
    "milestones": Option(("--milestones",), RECIPE, "epochs at which multistep multiplies the learning rate by "
                         "--gamma", {"type": number(int, minimum=1), "nargs": "*", "metavar": "EPOCH"}),
    "gamma": Option(("--gamma",), RECIPE, "multistep factor",
                    {"type": finite_float(minimum=0, exclusive_min=True), "metavar": "G"}),
    "augment": Option(("--augment",), RECIPE, "random crop 32 with 4 pixels of zero padding + horizontal flip",
                      {"action": argparse.BooleanOptionalAction, "default": None}),
    "mean": Option(("--mean",), RECIPE, "normalisation mean",
                   {"type": finite_float(), "nargs": 3, "metavar": ("R", "G", "B")}),
    "std": Option(("--std",), RECIPE, "normalisation std",
                  {"type": finite_float(minimum=0, exclusive_min=True), "nargs": 3, "metavar": ("R", "G", "B")}),
    "train_loss_mean": Option(("--train-loss-mean",), RECIPE, "train loss as mean over samples (notebook 000) or "
                              "over batches (notebook 004)", {"choices": ("samples", "batches")}),
    # data
    "dataset": Option(("--dataset",), DATA_GROUP, "CIFAR-10, or a small generated set that needs no download "
                      "(default: cifar10; synthetic with --quick)", {"choices": ("cifar10", "synthetic")}),
    "data_dir": Option(("--data-dir",), DATA_GROUP, "where CIFAR-10 is (or gets) prepared (default: data)",
                       {"type": expanded_path, "metavar": "DIR"}),
    "archive": Option(("--archive",), DATA_GROUP, "prepare CIFAR-10 from this official archive "
                      "(cifar-10-binary.tar.gz or cifar-10-python.tar.gz) instead of downloading it",
                      {"type": expanded_path, "metavar": "PATH"}),
    "no_download": Option(("--no-download",), DATA_GROUP, "never download: use prepared data or --archive only", FLAG),
    "skip_checksum": Option(("--skip-checksum",), DATA_GROUP, "do not check the archive's md5", FLAG),
    "train_samples": Option(("--train-samples",), DATA_GROUP, "use only the first N training images (synthetic: "
                            "generate N; default 2048 there, all 50000 for CIFAR-10)",
                            {"type": number(int, minimum=1), "metavar": "N"}),
    "test_samples": Option(("--test-samples",), DATA_GROUP, "use only the first N test images (synthetic: generate "
                           "N; default 512 there)", {"type": number(int, minimum=0), "metavar": "N"}),
    "image_size": Option(("--image-size",), DATA_GROUP, "side of the generated images (synthetic data, verify's "
                         f"batch; default 32, at most {MAX_IMAGE_SIZE}); smaller is faster",
                         {"type": number(int, minimum=8, maximum=MAX_IMAGE_SIZE, why=IMAGE_SIZE_WHY), "metavar": "PX"}),
    # devices and hosts
    "parallel": Option(("--parallel",), HOSTS, "how steps run: 'single' one device with jax.jit; 'jit' one "
                       "jax.jit over a mesh of all devices, the batch sharded (JAX's recommended path); 'shard_map' "
                       "jax.jit + jax.shard_map of a per-device step; 'pmap' that step with jax.pmap; 'auto' "
                       "(default) jit when more than one device is visible (shard_map with --bn-sync off), else "
                       "single. A global batch is split evenly across all devices: results equal a one-device run",
                       {"choices": PARALLEL_KINDS}),
    "bn_sync": Option(("--bn-sync",), HOSTS, "'on' (default): BatchNorm statistics over the whole global batch, as "
                      "one device computes them; 'off': per-device statistics, like torch DDP without SyncBatchNorm "
                      "(shard_map, pmap)",
                      {"choices": ("on", "off")}),
    "devices": Option(("--devices",), HOSTS, "number of devices (simulated CPU devices where fewer are present)",
                      {"type": number(int, minimum=2), "metavar": "N"}),
    "coordinator": Option(("--coordinator",), HOSTS, "multi-host: address of process 0, where it serves the JAX "
                          "coordinator; give it, --num-processes and --process-id to every process, or none of them "
                          "under SLURM/Open MPI", {"metavar": "HOST:PORT"}),
    "num_processes": Option(("--num-processes",), HOSTS, "multi-host: number of processes in the run",
                            {"type": number(int, minimum=1), "metavar": "N"}),
    "process_id": Option(("--process-id",), HOSTS, "multi-host: this process's rank in [0, N); rank 0 runs the "
                         "coordinator and writes history, plots and logs",
                         {"type": number(int, minimum=0), "metavar": "I"}),
    "distributed_timeout": Option(("--distributed-timeout",), HOSTS, "multi-host: seconds to wait for the "
                                  "coordinator and the other processes before failing (default: 300)",
                                  {"type": finite_float(minimum=0, exclusive_min=True), "metavar": "SECONDS"}),
    # output
    "out": Option(("--out",), OUT, "output directory", {"type": expanded_path, "metavar": "DIR"}),
    "resume": Option(("--resume",), OUT, "continue from what is already in --out (same settings; the result equals "
                     "an uninterrupted run); starts afresh if there is nothing", FLAG),
    "overwrite": Option(("--overwrite",), OUT, "replace what is already at the output (--out, or port's --to)", FLAG),
    "max_to_keep": Option(("--max-to-keep",), OUT, "checkpoints kept (the last N epochs; default: 3)",
                          {"type": number(int, minimum=1), "metavar": "N"}),
    "no_progress": Option(("--no-progress",), OUT, "no progress bar (epoch lines are still printed)", FLAG),
    "no_tensorboard": Option(("--no-tensorboard",), OUT, "no TensorBoard event files in --out (by default each "
                             "epoch's history.json values and the training loss of every 50th step; view with "
                             "`tensorboard --logdir runs`)", FLAG),
    "quick": Option(("--quick",), OUT, "a small run of the same code paths, sized for a CPU", FLAG),
    # weights: port, verify
    "source": Option(("--from",), "weights", "a state_dict file (.safetensors or .pt), or a checkpoint directory",
                     {"type": expanded_path, "required": True, "metavar": "PATH"}),
    "target": Option(("--to",), "weights", "where to write, in the form its name says: a .safetensors or "
                     ".pt file, else a new checkpoint directory",
                     {"type": expanded_path, "required": True, "metavar": "PATH"}),
    "step": Option(("--step",), "weights", "which checkpoint step to read (default: the latest)",
                   {"type": number(int, minimum=0), "metavar": "N"}),
    "weights": Option(("--weights",), "weights", "a state_dict (.safetensors or .pt) or a checkpoint directory of "
                      "either framework; default: torch's initialisation from --seed",
                      {"type": expanded_path, "metavar": "PATH"}),
    # measurements: verify, bench
    "float64": Option(("--float64",), "measurement", "compare in float64 only, where agreement proves the port exact "
                      "(to ~1e-14); default float32, with float64 references deciding any comparison beyond its "
                      "tolerance (flax_resnet.parity.TOLERANCES)", FLAG),
    "batch": Option(("--batch",), "measurement", "images in the one measured batch (at least 2, for train-mode "
                    "BatchNorm)", {"type": number(int, minimum=2), "metavar": "N"}),
    "steps": Option(("--steps",), "measurement", "steps to run", {"type": number(int, minimum=1), "metavar": "K"}),
    "steps_per_epoch": Option(("--steps-per-epoch",), "measurement", "with --steps: the steps of an epoch, after "
                              "which torch's scheduler is stepped",
                              {"type": number(int, minimum=1), "metavar": "N"}),
    "warmup": Option(("--warmup",), "measurement", "untimed steps before the timed ones",
                     {"type": number(int, minimum=0), "metavar": "N"}),
    "epoch_images": Option(("--epoch-images",), "measurement", "images in the timed epoch (0: no epoch rows)",
                           {"type": number(int, minimum=0), "metavar": "N"}),
    "torch_compile": Option(("--torch-compile",), "measurement", "include the torch.compile rows",
                            {"action": argparse.BooleanOptionalAction, "default": None}),
    "json": Option(("--json",), OUT, "also write the rows and the environment as JSON",
                   {"type": expanded_path, "metavar": "FILE"}),
    "skip": Option(("--skip",), "measurement", f"selftest parts to leave out: {', '.join(SELFTEST_PARTS)} "
                   "(torch.compile: the bench's torch.compile rows)",
                   {"nargs": "+", "choices": SELFTEST_PARTS, "metavar": "PART"}),
}

MODEL_OPTIONS = tuple(registry.MODEL_ARGS)
RECIPE_OVERRIDES = tuple(f.name for f in dataclasses.fields(Recipe) if f.name in OPTIONS and f.name != "model")
DATA = tuple(f.name for f in dataclasses.fields(DataConfig) if f.name in OPTIONS) + ("no_download",)
PARALLEL = ("parallel", "bn_sync", "coordinator", "num_processes", "process_id", "distributed_timeout")
OUTPUT = ("out", "resume", "overwrite", "max_to_keep", "no_progress", "no_tensorboard")


def add(parser: argparse.ArgumentParser, *names: str, defaults: Mapping[str, Any] | None = None,
        helps: Mapping[str, str] | None = None) -> argparse.ArgumentParser:
    """Put the options ``names`` on ``parser``, each in its help group (created on first use). ``defaults``: a
    command's own default of an option that no config holds (``bench --batch-size 128``), shown in its help;
    ``helps``: what the option means for this command, appended to its help."""
    groups = {g.title: g for g in parser._action_groups}
    defaults, helps = defaults or {}, helps or {}
    for name in names:
        option = OPTIONS[name]
        group = groups.get(option.group) or groups.setdefault(option.group, parser.add_argument_group(option.group))
        kwargs = dict(option.kwargs)
        text = option.help + (f"; {helps[name]}" if name in helps else "")
        if name in defaults:
            kwargs["default"] = defaults[name]
            text += " (here: %(default)s)"
        group.add_argument(*option.flags, dest=name, help=text, **kwargs)
    return parser


def given(args: argparse.Namespace, names: tuple[str, ...] | list[str]) -> dict[str, Any]:
    """The options of ``names`` that the user gave (parsed to something other than None), lists as tuples."""
    values = {name: getattr(args, name, None) for name in names}
    return {k: tuple(v) if isinstance(v, list) else v for k, v in values.items() if v is not None}


def chosen_model(args: argparse.Namespace) -> tuple[str, dict[str, Any]] | None:
    """--model with its constructor arguments (``port``, ``verify``), or None when the weights are to name their
    model; model options without --model are a ``ConfigError``."""
    if args.model is None:
        if given(args, MODEL_OPTIONS):
            raise ConfigError("model options (--n-blocks, ...) need --model: name the model they belong to.")
        return None
    return args.model, model_kwargs(args, args.model)


def model_kwargs(args: argparse.Namespace, name: str, recipe: str | None = None,
                 preset: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The constructor arguments of model ``name`` from the model options given (over ``preset``'s, then the
    recipe's and the class's defaults); one the model does not take is a ``ConfigError``."""
    takes = registry.get_spec(name).args
    try:
        return registry.model_kwargs(name, {**{k: v for k, v in (preset or {}).items() if k in takes},
                                            **given(args, MODEL_OPTIONS)}, recipe)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def run_config(args: argparse.Namespace, *, recipe: str | None = None, model: str | None = None,
               preset: Preset | None = None, out: Path | None = None) -> RunConfig:
    """The run that the parsed options describe; any option a command does not have takes its default.

    ``recipe`` / ``model``: the command's defaults (the user's --recipe / --model win); otherwise the model's
    notebook recipe, and the recipe's model. ``preset``'s values come first, then the user's. ``out``: the output
    directory when --out is not given (default: ``runs/<model>-<recipe>-<framework>``). A setting the config
    refuses is a ``ConfigError`` naming the option (the command line's usage error, exit 2)."""
    preset = preset or Preset("none")
    model_name = getattr(args, "model", None) or model
    recipe_name = getattr(args, "recipe", None) or recipe or (registry.get_spec(model_name).recipe if model_name
                                                              else DEFAULT_RECIPE)
    model_name = model_name or RECIPES[recipe_name].model
    kwargs = model_kwargs(args, model_name, recipe_name, preset.model_kwargs)
    run_recipe = with_recipe(RECIPES[recipe_name], **{**preset.recipe, **given(args, RECIPE_OVERRIDES)})
    data_values = given(args, DATA)
    if data_values.pop("no_download", False):
        data_values["download"] = False
    data = DataConfig(**{**preset.data, **data_values})
    parallel = {{"parallel": "kind", "distributed_timeout": "timeout_s"}.get(k, k): v == "on" if k == "bn_sync" else v
                for k, v in given(args, PARALLEL).items()}
    framework = getattr(args, "framework", None) or "jax"
    suffix = "-synthetic" if data.dataset == "synthetic" else ""
    output = given(args, OUTPUT)
    output["progress"] = not output.pop("no_progress", False)
    output["tensorboard"] = not output.pop("no_tensorboard", False)
    output["out_dir"] = output.pop("out", None) or out or RUNS_DIR / f"{model_name}-{recipe_name}-{framework}{suffix}"
    return RunConfig(recipe=run_recipe, model=ModelConfig(model_name, kwargs, getattr(args, "init_from", None)),
                     data=data, parallel=ParallelConfig(**parallel), output=OutputConfig(**output),
                     **given(args, ("framework", "seed", "dtype", "precision")))
