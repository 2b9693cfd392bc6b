"""The batch stream of an epoch, drawn with NumPy from ``(seed, epoch, num_examples)`` alone: which samples form each
batch and how each is augmented (torchvision's ``RandomCrop(32, padding=4)`` + ``RandomHorizontalFlip``). So a
resumed run sees the batches an uninterrupted one would have, any device count sees the same global batches, and
the Flax runners (on the device) and ``torch_ref.data`` (in torch) see bit-identical uint8 batches.

Batches follow torch's ``DataLoader(drop_last=False)``: the last batch of an epoch may be short.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

__all__ = ["CROP_PADDING", "EpochPlan", "batch_bounds", "epoch_plan", "steps_per_epoch"]

CROP_PADDING = 4  # RandomCrop(32, padding=4): offsets are drawn from [0, 2 * CROP_PADDING]


class EpochPlan(NamedTuple):
    """The order and augmentation of one epoch: equal for every framework, device count and resume."""

    permutation: np.ndarray  # (N,) int32 sample order
    offsets: np.ndarray  # (N, 2) int32 crop offsets in [0, 2 * CROP_PADDING] for (row, column), per position
    flips: np.ndarray  # (N,) bool horizontal flip, per position


def epoch_plan(seed: int, epoch: int, num_examples: int) -> EpochPlan:
    """Draw an epoch's plan (augmentation fields are ignored when it is off). ``SeedSequence([seed, epoch])``
    keeps every bit of both numbers (seeds 0 and 2**32 give different plans) and refuses negative ones."""
    if seed < 0 or epoch < 0:
        raise ValueError(f"seed and epoch must be >= 0, got seed {seed} and epoch {epoch}")
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, epoch])))
    return EpochPlan(
        permutation=rng.permutation(num_examples).astype(np.int32),
        offsets=rng.integers(0, 2 * CROP_PADDING + 1, size=(num_examples, 2), dtype=np.int32),
        flips=rng.random(num_examples) < 0.5,
    )


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    """Batches per epoch with torch's DataLoader default ``drop_last=False`` (the last one may be short)."""
    return -(-num_examples // batch_size)


def batch_bounds(step: int, num_examples: int, batch_size: int) -> tuple[int, int]:
    """Plan positions ``[start, stop)`` of batch ``step``."""
    start = step * batch_size
    return start, min(start + batch_size, num_examples)
