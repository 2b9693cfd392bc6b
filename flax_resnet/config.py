"""The settings of a run as typed dataclasses, carried as they are from the command line (or a notebook) into
``training.train(config)``: what to train (``ModelConfig``, a ``Recipe``), on what (``DataConfig``), on which devices
(``ParallelConfig``) and where the outputs go (``OutputConfig``), gathered in ``RunConfig``.

Defaults live here and in ``recipes.RECIPES``; named sets of them (an experiment's ``--quick``) are ``Preset``s.
Rules between settings are checked when a config is built (``ConfigError``, naming the option), so a notebook gets
the same refusal as the command line. Nothing here imports JAX: the command line builds configs before it decides
what to load.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from flax_resnet import registry
from flax_resnet.errors import FlaxResnetError
from flax_resnet.recipes import BN_SYNC_OFF_KINDS, PARALLEL_KINDS, PRECISIONS, Recipe

__all__ = ["BENCH_QUICK", "IMAGE_SIZE_WHY", "MAX_IMAGE_SIZE", "SELFTEST_PARTS", "BenchConfig", "ConfigError",
           "DataConfig", "ModelConfig", "OutputConfig", "ParallelConfig", "Preset", "RunConfig", "check_image_size",
           "with_recipe"]

Framework = Literal["jax", "torch"]
RUNS_DIR = Path("runs")  # where outputs go when no directory is given
# Generated images and verify's batch are at most 64x64: the models are built for CIFAR's 32x32, and memory grows
# with the pixels (verify of ResNet18, 4 images, 2-core Xeon: 1.4 GB at 32, 3.5 GB at 64, 9.3 GB at 128, and killed
# at 24 GB at 256; ResNet50 took 10 GB at 64).
MAX_IMAGE_SIZE = 64
IMAGE_SIZE_WHY = " (the models are built for 32x32; memory grows with the pixels: verify took 9.3 GB at 128)"


class ConfigError(FlaxResnetError, ValueError):
    """Settings that cannot go together (or a value out of range); the message names the option to change."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A registered model (``flax_resnet.registry``) by name and constructor arguments, or a user's own
    (``name='custom'``, passed to ``train`` as a module); ``init_from``: weights to start from (a state_dict
    mapping, a .safetensors or .pt file, or a checkpoint directory of either framework, as ``weights`` reads them;
    None: the framework's initialisation from the run's seed)."""

    name: str = "custom"
    kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    init_from: Path | Mapping[str, Any] | None = None


def check_image_size(model: str, image_size: int) -> None:
    """``ConfigError`` when the registered ``model`` cannot take ``image_size`` x ``image_size`` images (SimpleNet's
    fc layer is sized for 32x32): for ``RunConfig`` and ``verify``'s batch."""
    try:
        registry.check_image_size(model, image_size)
    except ValueError as error:
        raise ConfigError(str(error)) from None


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """The data set: CIFAR-10 (prepared in ``data_dir``, from ``archive`` or a download) or generated images.
    ``train_samples`` / ``test_samples``: the first N of each split (None: all of CIFAR-10; 2048 and 512 generated);
    ``image_size`` is the side of generated images."""

    dataset: Literal["cifar10", "synthetic"] = "cifar10"
    data_dir: Path = Path("data")
    archive: Path | None = None
    download: bool = True
    skip_checksum: bool = False
    train_samples: int | None = None
    test_samples: int | None = None
    image_size: int = 32

    def __post_init__(self) -> None:
        if self.dataset not in ("cifar10", "synthetic"):
            raise ConfigError(f"--dataset must be cifar10 or synthetic, got {self.dataset!r}.")
        if self.image_size != 32 and (self.dataset != "synthetic" or not 8 <= self.image_size <= MAX_IMAGE_SIZE):
            raise ConfigError(f"--image-size is for --dataset synthetic only, from 8 (three stride-2 stages) to "
                              f"{MAX_IMAGE_SIZE}{IMAGE_SIZE_WHY}.")


@dataclasses.dataclass(frozen=True)
class ParallelConfig:
    """How the Flax steps run on the devices (``training.parallel.make_runner``) and, for several processes, how
    they meet (``training.distributed``; all three of coordinator / num_processes / process_id, or none)."""

    kind: str = "auto"
    bn_sync: bool = True
    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    timeout_s: float = 300.0

    def __post_init__(self) -> None:
        if self.kind not in PARALLEL_KINDS:
            raise ConfigError(f"--parallel must be one of {', '.join(PARALLEL_KINDS)}, got {self.kind!r}.")
        if not self.bn_sync and self.kind not in ("auto", "single", *BN_SYNC_OFF_KINDS):
            # jit has one program over the global batch: BatchNorm sees all of it (docs/multi-device.md)
            raise ConfigError(f"--bn-sync off needs a per-device step: use --parallel "
                              f"{' or '.join(BN_SYNC_OFF_KINDS)} (--parallel {self.kind} normalises over the "
                              "global batch).")
        given = [v is not None for v in (self.coordinator, self.num_processes, self.process_id)]
        if any(given) and not all(given):
            raise ConfigError("--coordinator, --num-processes and --process-id go together (or none of them, "
                              "under SLURM).")

    @property
    def is_default(self) -> bool:
        return self == ParallelConfig()


@dataclasses.dataclass(frozen=True)
class OutputConfig:
    """Where a run writes (``out_dir``: checkpoints, history.json, curves.png, TensorBoard event files unless
    ``tensorboard`` is off; None: nothing is written), whether it continues the checkpoints there (``resume``) or
    removes them (``overwrite``), how many it keeps, and whether progress bars are shown."""

    out_dir: Path | None = None
    resume: bool = False
    overwrite: bool = False
    max_to_keep: int | None = 3
    progress: bool = True
    # TensorBoard event files in out_dir (training.tensorboard_log), with the training loss of every
    # tensorboard_every-th step: reading it is a host sync, which every 50 steps costs nothing measurable
    tensorboard: bool = True
    tensorboard_every: int = 50

    def __post_init__(self) -> None:
        if self.resume and self.overwrite:
            raise ConfigError("--resume and --overwrite exclude each other: pass one of them.")
        if self.max_to_keep is not None and self.max_to_keep < 1:
            raise ConfigError(f"--max-to-keep must be at least 1, got {self.max_to_keep}.")
        if self.tensorboard_every < 1:
            raise ConfigError(f"tensorboard_every must be at least 1, got {self.tensorboard_every}.")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything about a training run. The fields that decide its result (``checkpoint_meta``) are recorded in
    every checkpoint; ``resume_problems`` is what ``--resume`` checks against them.

    ``dtype``: the floating type of weights and computation; ``precision``: 'fp32', or 'bf16' mixed precision
    (Flax only, float32 weights).
    """

    recipe: Recipe
    model: ModelConfig = ModelConfig()
    framework: Framework = "jax"
    seed: int = 0
    dtype: Literal["float32", "float64"] = "float32"
    precision: str = "fp32"
    data: DataConfig = DataConfig()
    parallel: ParallelConfig = ParallelConfig()
    output: OutputConfig = OutputConfig()

    def __post_init__(self) -> None:
        if self.framework not in ("jax", "torch"):
            raise ConfigError(f"--framework must be jax or torch, got {self.framework!r}.")
        if self.dtype not in ("float32", "float64"):
            raise ConfigError(f"--dtype must be float32 or float64, got {self.dtype!r}.")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}.")
        if not 0 <= self.seed < 2**32:
            raise ConfigError(f"--seed must be in [0, 2**32) (JAX seeds are 32-bit), got {self.seed}.")
        if self.framework == "torch" and not self.parallel.is_default:
            raise ConfigError("--parallel, --bn-sync and the multi-host options are for --framework jax.")
        if self.precision == "bf16" and (self.framework != "jax" or self.dtype != "float32"):
            raise ConfigError("--precision bf16 is for --framework jax with --dtype float32.")
        if self.model.name in registry.MODELS:
            check_image_size(self.model.name, self.data.image_size)

    def replace(self, **changes: Any) -> RunConfig:
        """A copy with ``changes``; a section may be given as a mapping of its fields to change
        (``config.replace(output={"resume": True})``)."""
        for name, value in changes.items():
            if isinstance(value, Mapping) and name in ("model", "data", "parallel", "output", "recipe"):
                changes[name] = dataclasses.replace(getattr(self, name), **value)
        return dataclasses.replace(self, **changes)

    def checkpoint_meta(self, dataset: str | None = None, num_train: int | None = None,
                        num_test: int | None = None) -> dict[str, Any]:
        """What decides the run's result, as plain JSON values: the metadata of every checkpoint. ``dataset`` and the
        split sizes are those of the data the run trains on."""
        return json.loads(json.dumps({
            "recipe": dataclasses.asdict(self.recipe), "model": self.model.name,
            "model_kwargs": dict(self.model.kwargs), "framework": self.framework,
            "dataset": dataset or self.data.dataset, "num_train": num_train, "num_test": num_test,
            "seed": self.seed, "dtype": self.dtype, "precision": self.precision,
            "bn_sync": self.parallel.bn_sync}))

    def resume_problems(self, saved: Mapping[str, Any], dataset: str | None = None, num_train: int | None = None,
                        num_test: int | None = None) -> list[str]:
        """Why a checkpoint with metadata ``saved`` cannot be continued by this run: one line per field that differs.

        A run may be made longer (more epochs) unless the schedule depends on the run's length: cosine annealing's
        T_max is the number of epochs, so a longer run would change the learning rates of epochs already planned.
        """
        mine = self.checkpoint_meta(dataset, num_train, num_test)
        problems = []
        for key, want in mine.items():
            have = saved.get(key)
            if key == "recipe" and isinstance(have, dict):
                for field, value in want.items():
                    before = have.get(field)
                    if field == "epochs" and before is not None and value != before:
                        if value > before and want.get("schedule") != "cosine":
                            continue
                        why = (" (the cosine schedule's T_max is the number of epochs)" if want.get("schedule") ==
                               "cosine" else " (a run can be continued for more epochs, not fewer)")
                        problems.append(f"--epochs: the checkpoint's run has {before}, this one {value}{why}")
                    elif value != before:
                        problems.append(f"recipe {field}: the checkpoint's run has {before!r}, this one {value!r}")
            elif have != want:
                problems.append(f"{key}: the checkpoint's run has {have!r}, this one {want!r}")
        return problems

    @classmethod
    def from_checkpoint_meta(cls, meta: Mapping[str, Any]) -> RunConfig:
        """The settings recorded in a checkpoint (``checkpoint_meta``'s inverse for the fields it records)."""
        recipe = Recipe(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta["recipe"].items()})
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in (meta.get("model_kwargs") or {}).items()}
        dataset = meta.get("dataset")
        return cls(recipe=recipe, model=ModelConfig(meta.get("model", "custom"), kwargs),
                   framework=meta.get("framework", "jax"), seed=meta.get("seed", 0),
                   dtype=meta.get("dtype", "float32"), precision=meta.get("precision", "fp32"),
                   data=DataConfig(dataset if dataset in ("cifar10", "synthetic") else "cifar10"),
                   parallel=ParallelConfig(bn_sync=meta.get("bn_sync", True)))


def with_recipe(recipe: Recipe, **values: Any) -> Recipe:
    """``recipe`` with ``values`` over it (None values ignored). A new ``epochs`` scales multistep milestones that
    are not given with it, so a short run still decays its learning rate where the notebook's would: [8, 12] of 15
    epochs become [2, 3] of 4. A value the recipe refuses is a ``ConfigError`` naming the option."""
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items() if v is not None}
    epochs = values.get("epochs", recipe.epochs)
    if recipe.milestones and epochs != recipe.epochs and "milestones" not in values:
        scaled = (round(m * epochs / recipe.epochs) for m in recipe.milestones)
        values["milestones"] = tuple(sorted({m for m in scaled if 1 <= m < epochs}))
    try:
        return dataclasses.replace(recipe, **values)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"--{str(e).replace('_', '-')}") from None


@dataclasses.dataclass(frozen=True)
class Preset:
    """Named settings that replace defaults, applied before the user's own options (which win): an experiment's
    ``--quick``. Each mapping holds fields of one section: ``recipe`` (``with_recipe``), ``data``, ``model_kwargs``
    and ``settings`` (a command's own dataclass of settings, e.g. an experiment's)."""

    name: str
    recipe: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    data: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    model_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    settings: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def apply(self, config: RunConfig) -> RunConfig:
        """``config`` with this preset's recipe, data and model values."""
        model = dataclasses.replace(config.model, kwargs={**config.model.kwargs, **self.model_kwargs})
        return dataclasses.replace(config, recipe=with_recipe(config.recipe, **self.recipe), model=model,
                                   data=dataclasses.replace(config.data, **self.data))


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """What ``bench`` times: a registered model at one batch size and precision, ``warmup`` untimed and ``steps``
    timed steps per row, then an epoch of ``epoch_images`` generated images (0: no epoch rows), with or without
    torch.compile; weights and data drawn from ``seed``."""

    model: str = "SimpleResNet"
    model_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    batch_size: int = 128
    precision: str = "fp32"
    warmup: int = 3
    steps: int = 20
    epoch_images: int = 50_000  # CIFAR-10's training split
    torch_compile: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ConfigError(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}.")
        if self.batch_size < 1 or self.steps < 1 or self.warmup < 0 or self.epoch_images < 0:
            # steps=0 would time the warm-up as the steps
            raise ConfigError("--batch-size and --steps must be >= 1, --warmup and --epoch-images >= 0; got "
                              f"{self.batch_size}, {self.steps}, {self.warmup}, {self.epoch_images}.")


# ``bench --quick``: CI-sized, well under a minute on 2 cores; torch.compile compiles for about a minute on a CPU
BENCH_QUICK = BenchConfig(model_kwargs={"n_blocks": 1}, batch_size=16, warmup=2, steps=5, epoch_images=256,
                          torch_compile=False)
# the self-test's parts in the order they run (``selftest --skip`` names them; torch.compile: bench's rows)
SELFTEST_PARTS: tuple[str, ...] = ("parity", "default-precision", "bench", "torch.compile", "epochs")
