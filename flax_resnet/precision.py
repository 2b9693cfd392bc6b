"""Mixed precision for the Flax models: bfloat16 compute, float32 parameters and BatchNorm statistics (which layer
computes in which dtype: docs/design.md, Training). ``apply_precision(model, "bf16")`` changes only the layers'
static ``dtype`` attributes, never a variable, so parameters, optimizer state and checkpoints stay float32 and
interchangeable with fp32 runs. ``torch_fp32_precision`` scopes torch's float32 precision on GPUs (TF32 or full).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Literal

import jax.numpy as jnp
from flax import nnx

from flax_resnet.recipes import PRECISIONS, Precision

__all__ = ["PRECISIONS", "Precision", "apply_precision", "torch_fp32_precision"]


def apply_precision(model: nnx.Module, precision: Precision) -> nnx.Module:
    """Set the computation dtype of every conv, linear and BatchNorm layer of ``model`` in place (static attributes:
    they live in the graphdef); returns it. ``"fp32"`` restores the default (compute in the variables' dtype)."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose from {', '.join(PRECISIONS)}")
    half = precision == "bf16"
    for _, module in nnx.iter_modules(model):
        if isinstance(module, nnx.Conv | nnx.BatchNorm | nnx.Linear):
            module.dtype = jnp.bfloat16 if half else None
        if isinstance(module, nnx.Linear):  # float32 logits: loss and accuracy in float32 whatever the layers do
            module.preferred_element_type = jnp.float32 if half else None
    return model


@contextlib.contextmanager
def torch_fp32_precision(mode: Literal["ieee", "tf32"]) -> Iterator[None]:
    """Within the block, torch computes float32 matmuls and cuDNN convolutions in ``mode``: "ieee" (full float32)
    or "tf32" (10-bit mantissa); restored afterwards. Only CUDA devices read these settings.

    Through torch >= 2.9's ``fp32_precision`` settings, not the deprecated ``allow_tf32`` flags (torch refuses to
    read a legacy flag once the new settings differ, so one process must not mix the two); older torch has only
    the flags.
    """
    import torch

    cudnn = torch.backends.cudnn
    new = hasattr(cudnn, "conv")  # torch >= 2.9
    name, value = ("fp32_precision", mode) if new else ("allow_tf32", mode == "tf32")
    settings = (torch.backends.cuda.matmul, cudnn.conv if new else cudnn)
    saved = [getattr(setting, name) for setting in settings]
    for setting in settings:
        setattr(setting, name, value)
    try:
        yield
    finally:
        for setting, old in zip(settings, saved, strict=True):
            setattr(setting, name, old)
