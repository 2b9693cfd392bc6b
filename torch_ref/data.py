"""Batches for the notebooks' loops, as the notebooks build them::

    transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),   # notebook 004's training set
    transforms.ToTensor(), transforms.Normalize(mean, std)
    DataLoader(dataset, batch_size=128, shuffle=True)

but from uint8 NHWC arrays, with the shuffle order, crop offsets and flips handed in (``PlannedBatches.set_plan``)
instead of drawn, so that the Flax twin sees bit-identical uint8 batches.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

__all__ = ["PlannedBatches", "augment", "gather", "to_tensor_normalize"]

PADDING = 4  # RandomCrop(32, padding=4)


def augment(images: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    """RandomCrop(size, padding=4) with zero padding, then RandomHorizontalFlip, on uint8 NHWC images.

    ``offsets[i] = (row, column)`` is where image ``i``'s crop starts in its padded copy (in [0, 2 * PADDING]);
    ``flips[i]`` mirrors it left to right.
    """
    n, h, w, _ = images.shape
    device = images.device
    padded = torch.nn.functional.pad(images, (0, 0, PADDING, PADDING, PADDING, PADDING))
    rows = offsets[:, 0, None] + torch.arange(h, device=device)  # (n, h)
    cols = offsets[:, 1, None] + torch.arange(w, device=device)  # (n, w)
    cropped = padded[torch.arange(n, device=device)[:, None, None], rows[:, :, None], cols[:, None, :]]
    return torch.where(flips[:, None, None, None], cropped.flip(2), cropped)


def to_tensor_normalize(images: torch.Tensor, mean: Sequence[float] | torch.Tensor,
                        std: Sequence[float] | torch.Tensor, dtype: torch.dtype = torch.float32,
                        memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """``ToTensor()`` + ``Normalize(mean, std)`` on a uint8 NHWC batch: (x / 255 - mean) / std, in NCHW laid out
    in ``memory_format`` (``torch.channels_last`` keeps the NHWC memory order)."""
    x = images.to(dtype) / 255.0
    x = (x - torch.as_tensor(mean, dtype=dtype, device=x.device)) / torch.as_tensor(std, dtype=dtype, device=x.device)
    return x.permute(0, 3, 1, 2).contiguous(memory_format=memory_format)


def gather(images: torch.Tensor, labels: torch.Tensor, permutation: torch.Tensor, offsets: torch.Tensor | None,
           flips: torch.Tensor | None, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The uint8 NHWC batch at plan positions ``[start, stop)``, augmented when ``offsets`` is given."""
    idx = permutation[start:stop]
    x = images[idx]
    if offsets is not None:
        x = augment(x, offsets[start:stop], flips[start:stop])
    return x, labels[idx]


class PlannedBatches:
    """An iterable of ``(images NCHW float, labels int64)`` batches, like a ``DataLoader`` (``drop_last=False``).

    ``set_plan(permutation, offsets, flips)`` fixes the next epoch's order and augmentation (``offsets=None``:
    none); without one the split is read in order, as the notebooks' test loaders do. Each batch is prepared on the
    CPU and moved to ``device``, as a ``DataLoader`` does, or with ``resident=True`` prepared on ``device``, where
    the split and plan then live (to time the model, not the loader).
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, batch_size: int, mean: Sequence[float],
                 std: Sequence[float], *, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 resident: bool = False, memory_format: torch.memory_format = torch.contiguous_format):
        self.batch_size, self.dtype, self.device, self.memory_format = batch_size, dtype, device, memory_format
        self._home = torch.device(device) if resident else torch.device("cpu")  # where the split and plan live
        self.images = torch.from_numpy(np.ascontiguousarray(images)).to(self._home)
        self.labels = torch.from_numpy(np.asarray(labels).astype(np.int64)).to(self._home)
        self._mean = torch.tensor(mean, dtype=dtype, device=self._home)  # once, not a copy per batch
        self._std = torch.tensor(std, dtype=dtype, device=self._home)
        self.num_examples = len(self.labels)
        self.set_plan(np.arange(self.num_examples))

    def set_plan(self, permutation: np.ndarray, offsets: np.ndarray | None = None, flips: np.ndarray | None = None
                 ) -> None:
        home = self._home
        self.permutation = torch.from_numpy(np.asarray(permutation).astype(np.int64)).to(home)
        self.offsets = None if offsets is None else torch.from_numpy(np.asarray(offsets).astype(np.int64)).to(home)
        self.flips = None if flips is None else torch.from_numpy(np.asarray(flips, bool)).to(home)

    def __len__(self) -> int:
        return -(-self.num_examples // self.batch_size)

    def uint8_batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch ``step`` before ``ToTensor``/``Normalize``: uint8 NHWC images and labels, where the split lives."""
        start = step * self.batch_size
        return gather(self.images, self.labels, self.permutation, self.offsets, self.flips, start,
                      min(start + self.batch_size, self.num_examples))

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch ``step`` as iterating yields it: normalised NCHW images and int64 labels, on ``device``."""
        x, y = self.uint8_batch(step)
        x = to_tensor_normalize(x, self._mean, self._std, self.dtype, self.memory_format)
        return x.to(self.device), y.to(self.device)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for step in range(len(self)):
            yield self.batch(step)
