"""Data sets as uint8 NHWC NumPy arrays (:class:`Dataset`): CIFAR-10 through TFDS without TensorFlow, and a
synthetic stand-in. Importing this package imports neither TensorFlow nor tensorflow_datasets."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from flax_resnet.config import ConfigError, DataConfig
from flax_resnet.data import cifar10
from flax_resnet.data.cifar10 import load_cifar10
from flax_resnet.data.dataset import DATASETS, NUM_CLASSES, DataError, Dataset, synthetic_dataset

__all__ = ["DATASETS", "NUM_CLASSES", "DataError", "Dataset", "check", "load", "load_cifar10", "load_dataset",
           "synthetic_dataset"]


def load_dataset(name: str, **kwargs: Any) -> Dataset:
    """The data set called `name` ("cifar10" or "synthetic"), with the keyword arguments of its loader."""
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}")
    return load_cifar10(**kwargs) if name == "cifar10" else synthetic_dataset(**kwargs)


def check(config: DataConfig) -> None:
    """Refuse ``config`` before anything is read or written: paths that cannot be what they name
    (``ConfigError``), and CIFAR-10 without its optional dependencies (``MissingExtraError``)."""
    if config.dataset == "cifar10":
        cifar10.require_dependencies()
    if config.data_dir.exists() and not config.data_dir.is_dir():
        raise ConfigError(f"--data-dir {config.data_dir} is a file; give a directory (it is created if missing).")
    if config.archive is not None and config.archive.is_dir():
        raise ConfigError(f"--archive {config.archive} is a directory; give the archive file itself "
                          "(cifar-10-python.tar.gz or cifar-10-binary.tar.gz).")
    if config.archive is not None and not config.archive.exists():
        raise ConfigError(f"--archive {config.archive}: no such file.")


def load(config: DataConfig, log: Callable[[str], None] | None = None) -> Dataset:
    """The data set ``config`` describes: generated (2048 training and 512 test images unless given), or CIFAR-10
    cut to its first ``train_samples`` / ``test_samples`` (``DataError`` if it has fewer: a smaller run than asked
    for would go unnoticed). ``log`` hears notes about the data."""
    check(config)
    if config.dataset == "synthetic":
        return synthetic_dataset(num_train=config.train_samples or 2048,
                                 num_test=512 if config.test_samples is None else config.test_samples,
                                 seed=0, image_size=config.image_size)
    ds = load_cifar10(data_dir=config.data_dir, archive=config.archive, download=config.download,
                      skip_checksum=config.skip_checksum)
    n_train, n_test = config.train_samples, config.test_samples  # None: all of them
    for option, asked, have, split in (("--train-samples", n_train, len(ds.train_labels), "training"),
                                       ("--test-samples", n_test, len(ds.test_labels), "test")):
        if asked is not None and asked > have:
            raise DataError(f"{option} {asked} is more than the {have} {split} images of the CIFAR-10 prepared in "
                            f"{config.data_dir / 'cifar10'}; pass at most {have}.")
    return dataclasses.replace(ds, train_images=ds.train_images[:n_train], train_labels=ds.train_labels[:n_train],
                               test_images=ds.test_images[:n_test], test_labels=ds.test_labels[:n_test])
