"""float64 convolutions at a usable speed on the CPU: image patches and one matrix product instead of ``lax.conv``.

Why: with the runners' XLA:CPU options (``training.cpu.COMPILER_OPTIONS``, which put dots on YNNPACK) XLA's
float64 convolution has no fast kernel: one 3x3 convolution, forward + both gradients at batch 128, takes
602 / 814 / 716 ms through ``lax.conv_general_dilated`` against 138 / 75 / 46 ms as patches times a matrix
(C = 16 / 32 / 64; float64 matrix products are fast), 4-16x; ``train --dtype float64`` (SimpleResNet(3)) ran
Flax at 10 img/s, with patches 87, torch 163 (a quiet 2-core Intel Xeon, 2026-12-05).
Under XLA's default options (eager ops: the parity suite) the two are within 2x either way. float32
keeps ``lax.conv``: 2-3x faster than patches. BENCHMARKS.md ("float64 convolutions on the CPU") has the
figures and the commands that give them.

Where it applies, decided in ``conv_general_dilated`` alone, from static facts:

- the dtype: float64 inputs (float32 keeps ``lax.conv``: its Eigen convolution is faster than patches, measured
  in BENCHMARKS.md);
- the layout and arguments ``layers.Conv2d`` gives (channels last, explicit or named padding, no input
  dilation, no feature groups); anything else goes to ``lax.conv_general_dilated`` unchanged;
- the platform: the CPU, chosen with ``jax.lax.platform_dependent``. That is JAX's own "which platform is this
  computation lowered for" (resolved at lowering; only the chosen branch is compiled). A Python test such as
  ``jax.default_backend() == 'cpu'`` would be wrong for a computation placed on a CPU device of a machine with
  a GPU (or the reverse), and the devices of a runner's mesh are not known to a layer called eagerly by the
  parity suite. Eagerly, the platform is known and the branch is picked in Python.

Why in the layer, not in ``flax_resnet.training.cpu`` (where the runners apply XLA:CPU speed measures): this one
must also serve ``parity.compare`` and the parity suite, which run models without a runner, and it changes no
number beyond float64 rounding (the sums are taken in another order), so it needs no opt-in.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["conv_as_patches", "conv_general_dilated", "uses_patches"]

_CHANNELS_LAST = {1: ("NWC", "WIO", "NWC"), 2: ("NHWC", "HWIO", "NHWC"), 3: ("NDHWC", "DHWIO", "NDHWC")}


def _pairs(padding: str | Sequence[tuple[int, int]], lhs_shape, rhs_shape, strides, rhs_dilation
           ) -> tuple[tuple[int, int], ...] | None:
    """Explicit (low, high) padding per spatial axis, or None when it is not non-negative zero padding."""
    spatial = len(lhs_shape) - 2
    if isinstance(padding, str):
        if padding.upper() not in ("SAME", "VALID", "SAME_LOWER"):
            return None
        window = [(k - 1) * d + 1 for k, d in zip(rhs_shape[:spatial], rhs_dilation, strict=True)]
        pads = lax.padtype_to_pads(lhs_shape[1:-1], window, strides, padding)
    else:
        pads = padding
    pads = tuple((int(lo), int(hi)) for lo, hi in pads)
    return pads if len(pads) == spatial and all(lo >= 0 and hi >= 0 for lo, hi in pads) else None


def uses_patches(lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int], padding, lhs_dilation=None,
                 rhs_dilation=None, dimension_numbers=None, feature_group_count: int = 1,
                 batch_group_count: int = 1, preferred_element_type=None, out_sharding=None) -> bool:
    """Whether ``conv_general_dilated`` with these arguments computes as patches on the CPU (static facts only:
    float64, channels last, zero padding, no input dilation or groups); on other platforms it never does."""
    spatial = lhs.ndim - 2
    if spatial not in _CHANNELS_LAST or rhs.ndim != lhs.ndim:
        return False
    if jnp.result_type(lhs) != jnp.float64 or jnp.result_type(rhs) != jnp.float64:
        return False
    if feature_group_count != 1 or batch_group_count != 1 or out_sharding is not None:
        return False
    if preferred_element_type is not None and jnp.dtype(preferred_element_type) != jnp.float64:
        return False
    if any(d != 1 for d in (lhs_dilation or ())):
        return False
    if dimension_numbers is None or (lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
                                     != lax.conv_dimension_numbers(lhs.shape, rhs.shape, _CHANNELS_LAST[spatial])):
        return False
    rhs_dilation = tuple(rhs_dilation or (1,) * spatial)
    return _pairs(padding, lhs.shape, rhs.shape, tuple(window_strides), rhs_dilation) is not None


@functools.partial(jax.jit, static_argnames=("strides", "padding", "rhs_dilation", "precision"))
def conv_as_patches(x: jax.Array, kernel: jax.Array, *, strides: tuple[int, ...],
                    padding: tuple[tuple[int, int], ...], rhs_dilation: tuple[int, ...],
                    precision=None) -> jax.Array:
    """A channels-last convolution (input N...C, kernel ...IO) as one ``dot_general`` over its image patches.

    The patches are the kernel's shifted, strided slices of the zero-padded input, concatenated along the
    channels in the kernel's (spatial..., in) order: (N, out spatial..., prod(kernel spatial) * C). Their
    gradient is a sum of padded slices, elementwise work XLA fuses; the weight gradient is one more matrix
    product. Slices beat ``lax.conv_general_dilated_patches`` here: that is itself a float64 convolution (with
    an identity kernel), as slow as the one it would replace (BENCHMARKS.md). jit-compiled, so an eager call
    (the parity suite runs models eagerly) is one compiled program per shape, as ``lax.conv`` is.
    """
    spatial = x.ndim - 2
    window = kernel.shape[:spatial]
    x = jnp.pad(x, ((0, 0), *padding, (0, 0)))
    out = [(x.shape[1 + a] - (window[a] - 1) * rhs_dilation[a] - 1) // strides[a] + 1 for a in range(spatial)]
    if any(n <= 0 for n in out):
        raise ValueError(f"the convolution's window {window} (dilation {rhs_dilation}) is larger than its padded "
                         f"input {x.shape[1:-1]}; pad the input more or use a smaller kernel")
    slices = []
    for offset in itertools.product(*(range(k) for k in window)):
        start = (0, *(o * d for o, d in zip(offset, rhs_dilation, strict=True)), 0)
        limit = (x.shape[0], *(s + (n - 1) * st + 1 for s, n, st in zip(start[1:-1], out, strides, strict=True)),
                 x.shape[-1])
        slices.append(lax.slice(x, start, limit, (1, *strides, 1)))
    patches = slices[0] if len(slices) == 1 else jnp.concatenate(slices, axis=-1)
    matrix = kernel.reshape(-1, kernel.shape[-1])
    return lax.dot_general(patches, matrix, (((patches.ndim - 1,), (0,)), ((), ())), precision=precision)


def conv_general_dilated(lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int], padding,
                         lhs_dilation: Sequence[int] | None = None, rhs_dilation: Sequence[int] | None = None,
                         dimension_numbers=None, feature_group_count: int = 1, batch_group_count: int = 1,
                         precision=None, preferred_element_type=None, out_sharding=None) -> jax.Array:
    """``lax.conv_general_dilated``, computed as ``conv_as_patches`` on the CPU in float64 (see the module
    docstring); the one place that decides. ``layers.Conv2d`` hands it to ``nnx.Conv`` as its convolution."""
    lax_conv = functools.partial(
        lax.conv_general_dilated, window_strides=window_strides, padding=padding, lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
        batch_group_count=batch_group_count, precision=precision, preferred_element_type=preferred_element_type,
        out_sharding=out_sharding)
    if not uses_patches(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
                        feature_group_count, batch_group_count, preferred_element_type, out_sharding):
        return lax_conv(lhs, rhs)
    spatial = lhs.ndim - 2
    strides = tuple(int(s) for s in window_strides)
    dilation = tuple(int(d) for d in (rhs_dilation or (1,) * spatial))
    pads = _pairs(padding, lhs.shape, rhs.shape, strides, dilation)
    patches = functools.partial(conv_as_patches, strides=strides, padding=pads, rhs_dilation=dilation,
                                precision=precision)
    return lax.platform_dependent(lhs, rhs, cpu=patches, default=lax_conv)
