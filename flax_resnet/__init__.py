"""flax-resnet: the notebooks' ResNets in Flax NNX, with weight porting to and from PyTorch.

``from flax_resnet import ResNet18`` imports JAX and Flax on first use of such a name, not with the package:
``--help`` (and a torch-only user of ``torch_ref``) would otherwise wait 1.7 s for JAX (measured on 2 cores).
"""

from __future__ import annotations

import importlib
from importlib import metadata
from typing import Any

# flax_resnet.models.__all__ (tests/test_architecture.py checks that the two lists agree)
_MODELS = ("PlainBlock", "PlainDeepCNN", "ResidualBlock", "SimpleResNet", "PlainNet", "BasicBlock", "BottleneckBlock",
           "ResNet", "ResNet18", "ResNet34", "ResNet50", "SimpleNet", "ResNetNoBN", "ResNetDropout", "ResNet18NoBN",
           "ResNet18Dropout", "check_image_batch")
_PORT = ("PortError", "load_torch_state_dict", "to_torch_state_dict", "torch_keys")
_MODULE_OF = {**dict.fromkeys(_MODELS, "models"), **dict.fromkeys(_PORT, "port"), "cast_floating": "dtypes"}

__all__ = list(_MODULE_OF)

try:
    __version__ = metadata.version("flax-resnet")  # the one version number: pyproject.toml's
except metadata.PackageNotFoundError:  # the source tree on sys.path without an install
    __version__ = "0+unknown"


def __getattr__(name: str) -> Any:
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'flax_resnet' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"flax_resnet.{_MODULE_OF[name]}"), name)
    globals()[name] = value  # once: later lookups do not come here
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_MODULE_OF})
