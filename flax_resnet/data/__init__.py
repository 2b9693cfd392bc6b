"""Data sets as uint8 NHWC numpy arrays: CIFAR-10 (through TFDS, without TensorFlow) and a synthetic stand-in.

The rest of the project only sees :class:`Dataset`, through the names re-exported here:
``dataset`` (Dataset, DataError, the synthetic set; numpy only), ``cifar10`` (load_cifar10: prepared data, a
local archive or a download) and ``cifar10_builder`` (the TFDS builder, imported by ``cifar10`` only where
TFDS is needed). Importing this package imports neither TensorFlow nor tensorflow_datasets.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flax_resnet.data.cifar10 import load_cifar10
from flax_resnet.data.dataset import DATASETS, NUM_CLASSES, DataError, Dataset, synthetic_dataset

# Not re-exported: the settings and helpers that tests patch (SOURCE_HOST, source_answers, ...); a patch must
# reach the module that reads them, flax_resnet.data.cifar10.
__all__ = ["DATASETS", "NUM_CLASSES", "DataError", "Dataset", "load_cifar10", "load_dataset", "synthetic_dataset"]


def load_dataset(name: str, **kwargs: Any) -> Dataset:
    """The data set called `name` ("cifar10" or "synthetic"), with the keyword arguments of its loader."""
    loaders: dict[str, Callable[..., Dataset]] = {"cifar10": load_cifar10, "synthetic": synthetic_dataset}
    if name not in loaders:
        raise ValueError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}")
    return loaders[name](**kwargs)
