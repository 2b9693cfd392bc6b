"""Data sets as uint8 NHWC NumPy arrays (:class:`Dataset`): CIFAR-10 through TFDS without TensorFlow, and a
synthetic stand-in. Importing this package imports neither TensorFlow nor tensorflow_datasets."""

from __future__ import annotations

from typing import Any

from flax_resnet.data.cifar10 import load_cifar10
from flax_resnet.data.dataset import DATASETS, NUM_CLASSES, DataError, Dataset, synthetic_dataset

__all__ = ["DATASETS", "NUM_CLASSES", "DataError", "Dataset", "load_cifar10", "load_dataset", "synthetic_dataset"]


def load_dataset(name: str, **kwargs: Any) -> Dataset:
    """The data set called `name` ("cifar10" or "synthetic"), with the keyword arguments of its loader."""
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}")
    return load_cifar10(**kwargs) if name == "cifar10" else synthetic_dataset(**kwargs)
