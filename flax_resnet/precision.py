"""Mixed precision for the Flax models: bfloat16 compute, float32 parameters and BatchNorm statistics.

Call ``apply_precision(model, "bf16")`` on a freshly built model, before ``engine.init_train_state``: it only
changes the layers' static ``dtype`` attributes (the computation dtype), never a variable, so parameters,
optimizer state, BatchNorm running statistics and checkpoints stay float32 and interchangeable with fp32 runs.

What runs in which dtype under "bf16":

- convolutions: inputs and kernels cast to bfloat16, bfloat16 output (GPUs accumulate in float32 inside);
- BatchNorm: batch statistics, running averages and the normalisation in float32 (``layers.BatchNorm2d``),
  bfloat16 output; the residual additions and ReLUs then run on bfloat16;
- the final Linear: bfloat16 inputs and kernel, float32 accumulation and output (``preferred_element_type``), so
  the logits, the softmax cross-entropy and the metrics are float32;
- gradients reach the float32 parameters through the casts, so the optimizer updates float32 values.

bfloat16 has float32's exponent range, so unlike float16 no loss scaling is needed.

``torch_fp32_precision`` is the torch side of float32 precision on GPUs (TF32 or full float32), scoped; the
parity harness turns TF32 off with it, the benchmark on.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Literal

import jax.numpy as jnp
from flax import nnx

Precision = Literal["fp32", "bf16"]
PRECISIONS: tuple[str, ...] = ("fp32", "bf16")

__all__ = ["PRECISIONS", "Precision", "apply_precision", "compute_dtypes", "torch_fp32_precision"]


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


def compute_dtypes(model: nnx.Module) -> dict[str, str]:
    """Layer path -> computation dtype name ('default' when unset), for reports and tests."""
    return {"/".join(map(str, path)): "default" if module.dtype is None else jnp.dtype(module.dtype).name
            for path, module in nnx.iter_modules(model) if isinstance(module, nnx.Conv | nnx.BatchNorm | nnx.Linear)}


@contextlib.contextmanager
def torch_fp32_precision(mode: Literal["ieee", "tf32"]) -> Iterator[None]:
    """Within the block, torch computes float32 matmuls (cuBLAS) and cuDNN convolutions in ``mode``: "ieee" (full
    float32) or "tf32" (TensorFloat-32 tensor cores, 10-bit mantissa); both settings are restored afterwards. Only
    CUDA devices read them: on a CPU nothing changes.

    Through torch's ``fp32_precision`` settings (torch >= 2.9), not the deprecated ``allow_tf32`` flags: torch
    refuses to read a legacy flag once the new settings of cuDNN's convolutions and RNNs differ, so one process
    must not mix the two. Older torch has only the flags, which are used there.
    """
    import torch

    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    if hasattr(cudnn, "conv"):  # torch >= 2.9
        saved = (matmul.fp32_precision, cudnn.conv.fp32_precision)
        matmul.fp32_precision = cudnn.conv.fp32_precision = mode
        try:
            yield
        finally:
            matmul.fp32_precision, cudnn.conv.fp32_precision = saved
        return
    saved_flags = (matmul.allow_tf32, cudnn.allow_tf32)
    matmul.allow_tf32 = cudnn.allow_tf32 = mode == "tf32"
    try:
        yield
    finally:
        matmul.allow_tf32, cudnn.allow_tf32 = saved_flags
