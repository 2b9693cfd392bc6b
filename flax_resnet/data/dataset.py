"""What the rest of the project sees of a data set: :class:`Dataset`, :class:`DataError`, and a synthetic one.
NumPy only (``cifar10``, which needs tensorflow-datasets, imports this module, never the reverse)."""

from __future__ import annotations

import dataclasses

import numpy as np

from flax_resnet.errors import FlaxResnetError

__all__ = ["DATASETS", "NUM_CLASSES", "DataError", "Dataset", "synthetic_dataset"]

NUM_CLASSES = 10
DATASETS = ("cifar10", "synthetic")


class DataError(FlaxResnetError, RuntimeError):
    """A data set cannot be provided: offline, missing, corrupt or wrong archive. The message names the fix."""


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """A whole data set in host memory: uint8 NHWC images and int32 labels, train and test. Kept as uint8 (150 MB
    for CIFAR-10) so it can be put on the device whole; normalisation and augmentation happen there."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    num_classes: int = NUM_CLASSES
    name: str = "custom"  # what the data is ('cifar10', 'synthetic'): recorded by checkpoints, checked on resume

    def __post_init__(self) -> None:
        for split, images, labels in (("train", self.train_images, self.train_labels),
                                      ("test", self.test_images, self.test_labels)):
            if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
                raise ValueError(f"{split}_images must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
            if labels.dtype != np.int32 or labels.shape != images.shape[:1]:
                raise ValueError(f"{split}_labels must be int32 ({len(images)},), got {labels.dtype} {labels.shape}")


def synthetic_dataset(num_train: int = 2048, num_test: int = 512, *, seed: int = 0, image_size: int = 32) -> Dataset:
    """A small CIFAR-shaped data set that a small CNN can learn, for tests and offline runs. A sample is its class's
    smooth random template (low-frequency colour waves) shifted by up to 1/8 of the image, scaled in contrast and
    brightness, with pixel noise: the class is in the spatial pattern, not in any pixel. Deterministic for a seed.
    """
    if num_train < 0 or num_test < 0 or image_size < 4:
        raise ValueError("need num_train, num_test >= 0 and image_size >= 4")
    rng = np.random.default_rng(seed)
    s = image_size
    grid = np.arange(s, dtype=np.float64) * (2 * np.pi / s)
    yy, xx = np.meshgrid(grid, grid, indexing="ij")
    templates = np.zeros((NUM_CLASSES, s, s, 3))
    for c in range(NUM_CLASSES):
        for _ in range(3):  # three waves of frequency 1..2 per axis, each with its own colour
            fy, fx = rng.integers(-2, 3, size=2)
            if fy == 0 and fx == 0:
                fx = 1
            wave = np.cos(fy * yy + fx * xx + rng.uniform(0, 2 * np.pi))
            templates[c] += wave[..., None] * rng.normal(0.0, 1.0, size=3)
        templates[c] *= 45.0 / templates[c].std()

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        labels = rng.permutation(np.arange(n) % NUM_CLASSES).astype(np.int32)
        shift = max(1, s // 8)
        shifts = rng.integers(-shift, shift + 1, size=(n, 2))
        contrast = rng.uniform(0.6, 1.4, size=(n, 1, 1, 1))
        brightness = rng.normal(128.0, 20.0, size=(n, 1, 1, 3))
        noise = rng.normal(0.0, 30.0, size=(n, s, s, 3))
        images = np.empty((n, s, s, 3))
        for i in range(n):  # circular shifts keep the pattern smooth (the templates are periodic)
            images[i] = np.roll(templates[labels[i]], tuple(shifts[i]), axis=(0, 1))
        images = images * contrast + brightness + noise
        return np.clip(np.rint(images), 0, 255).astype(np.uint8), labels

    return Dataset(*draw(num_train), *draw(num_test), name="synthetic")
