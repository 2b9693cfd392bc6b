"""Fixtures shared by the tests: tiny synthetic data sets and tiny recipes, so each test trains in seconds.

Two CPU cores serve the whole suite: models here are the smallest of the notebooks (SimpleResNet(1),
PlainDeepCNN(1)), data sets a few dozen to a few hundred images.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest

# ``python -m pytest`` and plain ``pytest`` both find the repository's packages and train.py
_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from flax_resnet.data import Dataset, synthetic_dataset  # noqa: E402
from flax_resnet.recipes import RECIPES, Recipe  # noqa: E402


@pytest.fixture(scope="session")
def tiny_dataset() -> Dataset:
    """64 training and 16 test images: enough for a few steps per epoch and a padded test batch."""
    return synthetic_dataset(num_train=64, num_test=16, seed=0)


@pytest.fixture(scope="session")
def small_dataset() -> Dataset:
    """384 training and 128 test images: enough for a small network to learn well above chance."""
    return synthetic_dataset(num_train=384, num_test=128, seed=0)


def tiny_recipe(name: str = "resnet18-cifar", **overrides) -> Recipe:
    """A notebook recipe cut down to test size (override anything else by keyword)."""
    return dataclasses.replace(RECIPES[name], **{"epochs": 2, "batch_size": 16, "eval_batch_size": 8, **overrides})


@pytest.fixture(scope="session")
def make_recipe():
    """``tiny_recipe`` as a fixture: ``make_recipe('plain-vs-residual', epochs=3)`` (test modules cannot import
    it: ``parity_tests`` has a conftest module too, and only one module named conftest can be imported)."""
    return tiny_recipe
