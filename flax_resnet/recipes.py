"""How a run trains: the notebooks' recipes. Every number of a recipe is a field, so the command line can override
any of them (``config.with_recipe``); the rest of a run's settings are ``config.RunConfig``'s."""

from __future__ import annotations

import dataclasses
from typing import Literal

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
# how the steps run on the devices (flax_resnet.training.parallel.make_runner)
ParallelKind = Literal["auto", "single", "jit", "shard_map", "pmap"]
PARALLEL_KINDS: tuple[str, ...] = ("auto", "single", "jit", "shard_map", "pmap")
BN_SYNC_OFF_KINDS: tuple[str, ...] = ("shard_map", "pmap")  # the paths with per-device BatchNorm (--bn-sync off)
Precision = Literal["fp32", "bf16"]  # flax_resnet.precision applies them (it imports JAX: these are for parsers)
PRECISIONS: tuple[str, ...] = ("fp32", "bf16")


@dataclasses.dataclass(frozen=True)
class Recipe:
    """How to train: optimiser, schedule, batch sizes, augmentation, normalisation, metric definitions."""

    name: str
    model: str
    epochs: int
    batch_size: int
    eval_batch_size: int
    lr: float
    momentum: float
    weight_decay: float
    schedule: Literal["multistep", "cosine", "constant"]
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1
    augment: bool = False  # random crop 32 with 4 zero pixels of padding + horizontal flip
    mean: tuple[float, float, float] = CIFAR10_MEAN
    std: tuple[float, float, float] = (0.2470, 0.2435, 0.2616)
    # notebook 000's train_model averages the loss over samples, notebook 004's train_epoch over batches
    train_loss_mean: Literal["samples", "batches"] = "samples"
    # notebook 004's evaluate reports the test loss; notebook 000's train_model does not
    report_test_loss: bool = True

    def __post_init__(self) -> None:
        # the command lines' --epochs and batch sizes are plain ints; their float options are checked as they parse
        for field in ("epochs", "batch_size", "eval_batch_size"):
            if getattr(self, field) < 1:
                raise ValueError(f"{field} must be at least 1, got {getattr(self, field)}")


RECIPES: dict[str, Recipe] = {
    # notebook 000: PlainDeepCNN vs SimpleResNet at n_blocks=5, no augmentation
    "plain-vs-residual": Recipe(
        name="plain-vs-residual", model="SimpleResNet", epochs=15, batch_size=128, eval_batch_size=256,
        lr=0.1, momentum=0.9, weight_decay=1e-4, schedule="multistep", milestones=(8, 12), gamma=0.1,
        augment=False, std=(0.2470, 0.2435, 0.2616), train_loss_mean="samples", report_test_loss=False,
    ),
    # notebook 004: ResNet18, cosine annealing over the run, crop + flip
    "resnet18-cifar": Recipe(
        name="resnet18-cifar", model="ResNet18", epochs=20, batch_size=128, eval_batch_size=100,
        lr=0.1, momentum=0.9, weight_decay=5e-4, schedule="cosine", augment=True,
        std=(0.2023, 0.1994, 0.2010), train_loss_mean="batches", report_test_loss=True,
    ),
}


def get_recipe(name: str) -> Recipe:
    try:
        return RECIPES[name]
    except KeyError:
        raise ValueError(f"unknown recipe {name!r}; choose from {', '.join(RECIPES)}") from None
