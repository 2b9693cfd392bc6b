"""What an experiment is before it runs: its name, default ``RunConfig`` (``base``), its own frozen settings and its
``--quick`` preset, one ``Experiment`` each (``EXPERIMENTS``). The command line builds its parsers and configs from
these; the module that runs an experiment (``flax_resnet.experiments.<module>``, with JAX) is imported after
parsing, so ``--help`` loads no framework.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from flax_resnet.config import ConfigError, ModelConfig, Preset, RunConfig, with_recipe
from flax_resnet.recipes import RECIPES

__all__ = ["ABLATION", "COMPARE", "DEPTH", "EXPERIMENTS", "HE_INIT", "HE_INIT_MODELS", "LANDSCAPE",
           "LANDSCAPE_SPLITS", "PLAIN_VS_RESIDUAL", "AblationSettings", "CompareSettings", "DepthSettings",
           "Experiment", "HeInitSettings", "LandscapeSettings", "PlainVsResidualSettings"]


@dataclasses.dataclass(frozen=True)
class Experiment:
    """One experiment: the command ``name``, the module that runs it (``flax_resnet.experiments.<module>``, whose
    ``run(config, settings)`` writes summary.md, results.json and a figure), its default config, its ``Settings``
    class and its ``--quick`` preset."""

    name: str
    module: str
    base: RunConfig
    settings: type
    quick: Preset


# --------------------------------------------------------------------------------------- plain-vs-residual
@dataclasses.dataclass(frozen=True)
class PlainVsResidualSettings:
    """``n_blocks``: blocks per stage of both networks, 1 + 6n conv layers (5: the notebook's 31 layers)."""

    n_blocks: int = 5

    def __post_init__(self) -> None:
        if self.n_blocks < 1:
            raise ConfigError(f"--n-blocks must be at least 1, got {self.n_blocks}.")


PLAIN_VS_RESIDUAL = Experiment(
    "plain-vs-residual", "plain_vs_residual", RunConfig(recipe=RECIPES["plain-vs-residual"]), PlainVsResidualSettings,
    Preset("quick", recipe={"epochs": 4, "batch_size": 32, "eval_batch_size": 64},
           data={"dataset": "synthetic", "train_samples": 256, "test_samples": 64}, settings={"n_blocks": 1}))


# --------------------------------------------------------------------------------------------------- depth
@dataclasses.dataclass(frozen=True)
class DepthSettings:
    """``plain_blocks``: PlainNet depths, blocks in its four layers (notebook 004's shallow and deep);
    ``resnet_blocks``: SimpleResNet depths, blocks per stage (7 and 25 conv layers)."""

    plain_blocks: tuple[tuple[int, ...], ...] = ((1, 1, 1, 1), (3, 3, 3, 3))
    resnet_blocks: tuple[int, ...] = (1, 4)

    def __post_init__(self) -> None:
        object.__setattr__(self, "plain_blocks", tuple(tuple(b) for b in self.plain_blocks))
        object.__setattr__(self, "resnet_blocks", tuple(self.resnet_blocks))
        for blocks in self.plain_blocks:
            if len(blocks) != 4 or min(blocks) < 1:
                raise ConfigError(f"--plain-blocks takes four block counts >= 1 like 3,3,3,3, got {blocks}.")
        if not self.resnet_blocks or min(self.resnet_blocks) < 1:
            raise ConfigError(f"--resnet-blocks takes block counts >= 1, got {self.resnet_blocks}.")


DEPTH = Experiment(
    "depth", "depth", RunConfig(recipe=RECIPES["plain-vs-residual"]), DepthSettings,  # one recipe for all runs
    Preset("quick", recipe={"epochs": 2, "batch_size": 32, "eval_batch_size": 32},
           data={"dataset": "synthetic", "image_size": 8, "train_samples": 64, "test_samples": 32},
           settings={"plain_blocks": ((1, 1, 1, 1), (2, 2, 2, 2)), "resnet_blocks": (1, 2)}))


# ------------------------------------------------------------------------------------------------- he-init
HE_INIT_MODELS = ("SimpleNet", "ResNet18", "ResNet34", "ResNet50")


@dataclasses.dataclass(frozen=True)
class HeInitSettings:
    """``models`` to measure; ``batch``: images of the unit-variance input (64: the notebook's input_shape
    (64, 3, 32, 32)); ``stock``: measure Flax's stock default init (lecun_normal) too."""

    models: tuple[str, ...] = ("SimpleNet", "ResNet18")
    batch: int = 64
    stock: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "models", tuple(self.models))
        unknown = [m for m in self.models if m not in HE_INIT_MODELS]
        if unknown or not self.models:
            raise ConfigError(f"--models takes names of {', '.join(HE_INIT_MODELS)}, "
                              f"got {', '.join(unknown) or 'none'}.")
        if self.batch < 2:
            raise ConfigError(f"--batch must be at least 2 (a variance needs two values per feature), "
                              f"got {self.batch}.")


HE_INIT = Experiment(
    "he-init", "init_variance",
    RunConfig(recipe=RECIPES["resnet18-cifar"]),  # only the seed and the output directory are used
    HeInitSettings, Preset("quick", settings={"batch": 16}))


# ------------------------------------------------------------------------------------------------ ablation
@dataclasses.dataclass(frozen=True)
class AblationSettings:
    """``dropout_p``: dropout probability after each block of the dropout configuration."""

    dropout_p: float = 0.2

    def __post_init__(self) -> None:
        if not (math.isfinite(self.dropout_p) and 0 <= self.dropout_p < 1):
            raise ConfigError(f"--dropout-p must be in [0, 1), got {self.dropout_p}.")


ABLATION = Experiment(
    "ablation", "ablation",
    RunConfig(recipe=with_recipe(RECIPES["resnet18-cifar"], epochs=10)),  # the notebook's ablation_study(epochs=10)
    AblationSettings,
    Preset("quick", recipe={"epochs": 2, "batch_size": 32, "eval_batch_size": 32},
           data={"dataset": "synthetic", "image_size": 8, "train_samples": 64, "test_samples": 16}))


# ----------------------------------------------------------------------------------------------- landscape
LANDSCAPE_SPLITS = ("test", "train")


@dataclasses.dataclass(frozen=True)
class LandscapeSettings:
    """The networks (run directories of ``train`` or of an experiment: ``plain``, ``residual`` and any number of
    ``checkpoints``), or ``train_own``: none named, train PlainDeepCNN(1) and SimpleResNet(1) first. ``points``
    along [-radius, radius]; ``relative``: the direction scaled to the weights' norm; ``batch``: images of the
    fixed batch (None: the run's test batch size); ``splits`` it is drawn from (the notebook's: test)."""

    plain: Path | None = None
    residual: Path | None = None
    checkpoints: tuple[Path, ...] = ()
    train_own: bool = False
    points: int = 21
    radius: float = 1.0
    relative: bool = False
    batch: int | None = None
    splits: tuple[str, ...] = ("test",)

    def __post_init__(self) -> None:
        object.__setattr__(self, "checkpoints", tuple(self.checkpoints))
        object.__setattr__(self, "splits", tuple(self.splits))
        if self.points < 2:
            raise ConfigError(f"--points must be at least 2, got {self.points}.")
        if not (math.isfinite(self.radius) and self.radius > 0):
            raise ConfigError(f"--radius must be a number above 0, got {self.radius}.")
        if self.batch is not None and self.batch < 1:
            raise ConfigError(f"--batch must be at least 1, got {self.batch}.")
        if not self.splits or not set(self.splits) <= set(LANDSCAPE_SPLITS):
            raise ConfigError(f"--split takes test, train or both, got {self.splits}.")
        if not self.networks() and not self.train_own:
            raise ConfigError("name the trained networks: --plain DIR --residual DIR, or --checkpoint DIR "
                              "(repeatable).")

    def networks(self) -> list[tuple[str | None, Path]]:
        """(label, run directory) of each network named; the label None for a --checkpoint."""
        given = [(label, path) for label, path in (("plain", self.plain), ("residual", self.residual)) if path]
        return given + [(None, path) for path in self.checkpoints]


LANDSCAPE = Experiment(
    "landscape", "landscape",
    # the recipe of the networks it trains itself (PlainDeepCNN(1) and SimpleResNet(1)), notebook 004's test batch
    RunConfig(recipe=with_recipe(RECIPES["plain-vs-residual"], eval_batch_size=100)), LandscapeSettings,
    Preset("quick", recipe={"epochs": 4, "batch_size": 32},
           data={"dataset": "synthetic", "train_samples": 256, "test_samples": 128},
           settings={"relative": True, "splits": LANDSCAPE_SPLITS, "train_own": True}))


# ------------------------------------------------------------------------------------------------- compare
@dataclasses.dataclass(frozen=True)
class CompareSettings:
    """The model, recipe, dtype and weights are the run's (``RunConfig``). ``yardstick``: in float32, also train
    each framework in float64 from the same weights on the same batches, to show how large a gap rounding alone
    makes (it doubles compare's cost; float64 compares have none: their gap is the parity statement itself)."""

    yardstick: bool = True


COMPARE = Experiment(
    "compare", "compare", RunConfig(recipe=RECIPES["plain-vs-residual"], model=ModelConfig("SimpleResNet")),
    CompareSettings,
    Preset("quick", recipe={"epochs": 2, "batch_size": 32, "eval_batch_size": 64},
           data={"dataset": "synthetic", "train_samples": 128, "test_samples": 64}, model_kwargs={"n_blocks": 1}))

EXPERIMENTS: tuple[Experiment, ...] = (PLAIN_VS_RESIDUAL, DEPTH, HE_INIT, ABLATION, LANDSCAPE, COMPARE)
