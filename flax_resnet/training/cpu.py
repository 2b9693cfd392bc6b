"""Speed measures for XLA:CPU, in one place: the runners apply them, nothing else knows about them. Measured on the
project's 2-core AMD EPYC machines with ResNet-20 at batch 128 (BENCHMARKS.md, "Where the time goes, and what was
tried", has the detail):

- ``tune_allocator``: glibc keeps freed memory for reuse. Otherwise it serves XLA's per-step temporary buffer
  (295 MB) with a fresh ``mmap`` and unmaps it afterwards, and every step page-faults it back in: 389 -> 338
  ms/step. Process-wide, so the command line calls it first thing (the library never changes the process itself).
- ``compiler_options``: convolutions on Eigen (all cores) instead of YNNPACK (one thread here, 1.5-3x slower per
  weight gradient), reductions kept on YNNPACK, and the concurrency-optimised scheduler: 0.71x -> 0.84x torch eager.
  They are experimental XLA flags: a jaxlib that refuses them would fail every compile, so they are tried once on a
  tiny function and dropped, with one warning.
- ``materialize_conv_inputs``: each convolution's input kept as a buffer, so XLA:CPU does not recompute the whole
  BatchNorm/ReLU/residual chain inside the transposes of the weight gradient (an identity gather is an op XLA will
  not duplicate; ``optimization_barrier`` is removed before fusion): 503 -> 338 ms/step. GPUs do not need it.

One XLA:CPU measure lives elsewhere: float64 convolutions computed as image patches and a matrix product
(``flax_resnet.conv_patches``, 4-22x faster than XLA:CPU's float64 convolution under these options). It is
``layers.Conv2d``'s own, not the runners', because ``parity.compare`` and the parity suite run float64 models
without a runner, and it changes no number beyond float64 rounding.
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform
import warnings

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from flax_resnet import layers

__all__ = ["COMPILER_OPTIONS", "compiler_options", "materialize_conv_inputs", "tune_allocator", "tuned_allocator"]

# ------------------------------------------------------------------------------------------------ allocator
# glibc's mallopt parameters (malloc.h): name -> (code, value)
_MALLOPT = {"M_ARENA_MAX": (-8, 1), "M_MMAP_MAX": (-4, 0), "M_TRIM_THRESHOLD": (-1, 2**31 - 1)}
_ALLOCATOR_TUNED: dict[str, int] | None = None


def tune_allocator() -> dict[str, int] | None:
    """One glibc arena, no mmap, a 2 GB trim threshold; call it before JAX runs anything (only later allocations
    profit). Linux/glibc only, idempotent; ``FLAX_RESNET_MALLOC=default`` opts out. Returns the settings applied,
    or None."""
    global _ALLOCATOR_TUNED
    if _ALLOCATOR_TUNED is not None or os.environ.get("FLAX_RESNET_MALLOC") == "default":
        return _ALLOCATOR_TUNED
    if platform.libc_ver()[0] != "glibc":
        return None
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return None
    if all(mallopt(code, value) == 1 for code, value in _MALLOPT.values()):
        _ALLOCATOR_TUNED = {name: value for name, (_, value) in _MALLOPT.items()}
    return _ALLOCATOR_TUNED


def tuned_allocator() -> dict[str, int] | None:
    """The settings ``tune_allocator`` applied in this process, or None."""
    return _ALLOCATOR_TUNED


# ------------------------------------------------------------------------------------------ compiler options
COMPILER_OPTIONS: dict[str, str] = {
    "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE",
    "xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_CONCURRENCY_OPTIMIZED",
}


@functools.cache
def _accepted(options: tuple[tuple[str, str], ...]) -> bool:
    """Whether the running jaxlib compiles with ``options`` (tried once per process on a tiny function)."""
    try:
        jax.jit(lambda x: x + 1, compiler_options=dict(options)).lower(jnp.zeros(2)).compile()
    except Exception as e:  # noqa: BLE001 - an unknown or renamed option is reported as assorted errors
        warnings.warn(f"this jaxlib ({jax.__version__}) does not accept the XLA:CPU speed options "
                      f"({', '.join(dict(options))}: {' '.join(str(e).split())[:200]}), so training on the CPU runs "
                      "without them, slower: see docs/troubleshooting.md.", RuntimeWarning, stacklevel=3)
        return False
    return True


def compiler_options(device: jax.Device) -> dict[str, str] | None:
    """``COMPILER_OPTIONS`` for steps running on ``device`` if it is a CPU whose jaxlib accepts them, else None."""
    if device.platform != "cpu" or not _accepted(tuple(COMPILER_OPTIONS.items())):
        return None
    return dict(COMPILER_OPTIONS)


# ------------------------------------------------------------------------------------- conv-input buffers
@jax.custom_vjp
def _materialize(x: jax.Array) -> jax.Array:
    """Identity as a row-wise gather (an op XLA will not fuse into its consumers); gradient unchanged."""
    return jnp.take(x, jnp.arange(x.shape[0]), axis=0, unique_indices=True, indices_are_sorted=True, mode="clip")


_materialize.defvjp(lambda x: (_materialize(x), None), lambda _, g: (g,))


class MaterializedInputConv2d(layers.Conv2d):
    """``layers.Conv2d`` whose input is kept as a buffer (see the module docstring); same numbers. With
    ``batch_mesh`` (a mesh whose first axis shards the batch), the identity gather runs per device under
    ``jax.shard_map``: left to the SPMD partitioner, its replicated indices make it all-gather every convolution's
    input (7 all-gathers of activations in a SimpleResNet(1) step on 8 devices, read from the compiled HLO)."""

    batch_mesh: Mesh | None = None

    def __call__(self, inputs: jax.Array, out_sharding=None) -> jax.Array:
        if self.batch_mesh is None:
            return super().__call__(_materialize(inputs), out_sharding=out_sharding)
        spec = P(self.batch_mesh.axis_names[0])
        kept = jax.shard_map(_materialize, mesh=self.batch_mesh, in_specs=spec, out_specs=spec)(inputs)
        return super().__call__(kept, out_sharding=out_sharding)


def materialize_conv_inputs(model: nnx.Module, batch_mesh: Mesh | None = None) -> None:
    """Make every ``layers.Conv2d`` of ``model`` a ``MaterializedInputConv2d``, in place: the runners call it once,
    on their own copy of the model (``runners.Runner.put_state``), never on the caller's. ``batch_mesh``: the
    mesh over which a ``jax.jit`` step shards the batch (``parallel.JitRunner``)."""
    for _, module in nnx.iter_modules(model):
        if type(module) is layers.Conv2d:
            module.__class__ = MaterializedInputConv2d
            if batch_mesh is not None:
                module.batch_mesh = batch_mesh
