"""Data parallelism on many devices (and hosts), three ways (docs/multi-device.md): ``JitRunner`` (one ``jax.jit``
over global arrays with ``NamedSharding``: the batch sharded over a 1-D ``data`` mesh, the compiler inserts the
collectives; JAX's recommended path), and one per-device step of ``flax_resnet.training.engine`` with its
collectives named by one axis, ``AXIS``, under ``ShardMapRunner`` (``jax.jit`` + ``jax.shard_map``) or
``PmapRunner`` (``jax.pmap``, in maintenance since JAX 0.8).

Every device holds the whole uint8 split and gathers its own contiguous share of each global batch; eval batches are
padded up to a multiple of the device count and the padding masked out. With ``bn_sync=False`` (shard_map, pmap)
the runner broadcasts device 0's BatchNorm statistics after each step (DDP broadcasts rank 0's before each forward
pass), so what is checkpointed and evaluated is what rank 0 of a DDP run would have. Multi-host: the mesh spans all
processes' devices, grouped by process; each process puts the same (seeded) state and data.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from flax_resnet.config import ConfigError, ParallelConfig
from flax_resnet.data.plan import EpochPlan
from flax_resnet.dtypes import is_prng_key
from flax_resnet.errors import FlaxResnetError
from flax_resnet.recipes import BN_SYNC_OFF_KINDS, PARALLEL_KINDS, ParallelKind, Recipe
from flax_resnet.training import cpu, engine
from flax_resnet.training.engine import TrainState
from flax_resnet.training.runners import (
    Runner,
    RunnerState,
    SingleDeviceRunner,
    gather_batch,
    gather_eval_batch,
)

AXIS = "data"  # the one mesh / pmap axis every collective of the step names


# ------------------------------------------------------------------------------------------ batch sizes
class BatchSizeError(FlaxResnetError, ValueError):
    """A training batch that the devices cannot share evenly; the message names a batch size that works."""


def validate_batch_sizes(num_examples: int, batch_size: int, num_devices: int) -> None:
    """Fail before training when some training batch of an epoch, the short last one that torch's
    ``drop_last=False`` keeps included, cannot be split evenly across the devices: each device must take the same
    number of samples for the averaged per-device losses to equal the global mean. Once ``num_examples`` divides by
    the device count, any batch size that does leaves a short last batch that does too."""
    if min(num_examples, batch_size, num_devices) < 1:
        raise ValueError(f"num_examples, batch_size and num_devices must be positive, got {num_examples}, "
                         f"{batch_size} and {num_devices}")
    if num_devices == 1:
        return
    if num_examples % num_devices:
        fits = [d for d in range(1, min(num_devices * 2, num_examples) + 1) if num_examples % d == 0]
        raise BatchSizeError(
            f"cannot split the training set across {num_devices} devices: its {num_examples} samples do not "
            f"divide by {num_devices}, so the short last batch of an epoch cannot be shared evenly. Use a device "
            f"count that divides {num_examples} (e.g. {', '.join(map(str, fits[-4:]))}) or --parallel single.")
    last = num_examples % batch_size
    if batch_size % num_devices or (last and last % num_devices):
        lower = batch_size - batch_size % num_devices
        options = [b for b in (lower, lower + num_devices) if b > 0]
        raise BatchSizeError(
            f"global batch size {batch_size} does not split evenly across {num_devices} devices; use a multiple of "
            f"{num_devices}, e.g. --batch-size {' or '.join(map(str, options))}")


# ------------------------------------------------------------------------------------------ the device step
def _broadcast_from_device0(tree, axis_name: str):
    """Every device gets device 0's floating-point leaves (``jax.lax.pbroadcast`` has no CPU lowering, so a masked
    psum: exact, since the other devices add zeros). Non-float leaves (counters, RNG keys) agree already."""
    first = jax.lax.axis_index(axis_name) == 0
    return jax.tree.map(lambda x: jax.lax.psum(jnp.where(first, x, jnp.zeros_like(x)), axis_name)
                        if jnp.issubdtype(x.dtype, jnp.inexact) else x, tree)


# ------------------------------------------------------------------------------------------ placement helpers
def default_devices() -> list[jax.Device]:
    """All devices of all processes, grouped by process, so each host's devices take contiguous batch shares."""
    return sorted(jax.devices(), key=lambda d: (d.process_index, d.id))


def _via_key_data(fn: Callable, x):
    """``fn(x)``; for a PRNG key array, ``fn`` of its raw data, wrapped back into keys of the same impl."""
    if not is_prng_key(x):
        return fn(x)
    return jax.random.wrap_key_data(fn(jax.random.key_data(x)), impl=jax.random.key_impl(x))


def _local_copy(x) -> np.ndarray:
    """This process's copy of a replicated leaf, as host numpy."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        if not x.is_fully_replicated:
            raise ValueError(f"expected a replicated array, got one sharded as {x.sharding}")
        x = x.addressable_data(0)
    return np.asarray(x)


def _replicate(x, sharding: NamedSharding):
    """A leaf replicated on ``sharding``'s devices (a no-op when it is already); with several processes, made of
    each process's own copy (they are equal: same seed, same checkpoint)."""
    if isinstance(x, jax.Array) and x.committed and x.sharding.is_equivalent_to(sharding, x.ndim):
        return x
    if jax.process_count() == 1:
        return jax.device_put(x, sharding)

    def make(value):
        value = _local_copy(value)
        return jax.make_array_from_process_local_data(sharding, value, value.shape)

    return _via_key_data(make, x)


class _DataParallel(Runner):
    """What both wrappers share: the mesh, resident data, epoch plans, metrics and the batch-size rule."""

    def __init__(self, graphdef: nnx.GraphDef, tx: optax.GradientTransformation, recipe: Recipe, dtype=jnp.float32,
                 bn_sync: bool = True, devices: Sequence[jax.Device] | None = None):
        super().__init__(graphdef, tx, recipe, dtype)
        self.bn_sync = bn_sync
        self.devices = list(devices) if devices is not None else default_devices()
        self.num_devices = len(self.devices)
        self.platform = self.devices[0].platform
        self.mesh = Mesh(np.array(self.devices), (AXIS,))
        self.replicated = self.sharding = NamedSharding(self.mesh, P())  # pmap: host-local arrays (PmapRunner)

    def _set_up(self, model: nnx.Module) -> None:
        """The platform's speed measures, and ``AXIS`` (``bn_sync``, synchronised statistics) or None (per device)
        as every BatchNorm's ``axis_name``: a static attribute, so it is set on the graph, not passed to the step."""
        super()._set_up(model)
        for _, module in nnx.iter_modules(model):
            if isinstance(module, nnx.BatchNorm):
                module.axis_name = AXIS if self.bn_sync else None

    # The per-device steps both wrappers map over the devices, with their collectives over ``AXIS``.
    def _train_impl(self, state, metrics, data, plan, start, *, size):
        """One device's share of the global step at plan positions [start, start + size)."""
        d, local = jax.lax.axis_index(AXIS), size // self.num_devices
        images, labels = gather_batch(data, plan, start + d * local, local, self.recipe, self.dtype)
        keys = state.model_state  # dropout keys folded with the device index: different masks for different samples
        folded = jax.tree.map(lambda x: jax.random.fold_in(x, d) if is_prng_key(x) else x, keys)
        state = state._replace(model_state=folded)
        state, step_metrics = engine.train_step(self.step_graphdef, self.tx, state, images, labels, axis_name=AXIS)
        # the stored keys stay the replicated ones (only the RNG counters advance, equally on every device)
        state = state._replace(model_state=jax.tree.map(lambda new, old: old if is_prng_key(old) else new,
                                                        state.model_state, keys))
        if not self.bn_sync:  # DDP's rule: rank 0's BatchNorm buffers win
            state = state._replace(model_state=_broadcast_from_device0(state.model_state, AXIS))
        return state, metrics + step_metrics

    def _eval_impl(self, state, metrics, data, start, *, size):
        """One device's share of the eval batch [start, start + size), padded up to a multiple of the devices."""
        local = -(-size // self.num_devices)
        local_start = start + jax.lax.axis_index(AXIS) * local
        images, labels, mask = gather_eval_batch(data, local_start, local, self.recipe, self.dtype)
        mask = mask & (local_start + jnp.arange(local) < start + size)  # the padding belongs to the next batch
        return metrics + engine.eval_step(self.step_graphdef, state, images, labels, mask, axis_name=AXIS)

    def check_batch_sizes(self, num_examples: int, batch_size: int) -> None:
        validate_batch_sizes(num_examples, batch_size, self.num_devices)

    def _put(self, tree):
        """Replicated on every device: the state, the epoch plan, the metric sums, and the whole data split (150 MB
        of uint8 for CIFAR-10), from which each device gathers its own share of a batch."""
        return jax.tree.map(lambda x: _replicate(x, self.sharding), tree)


class ShardMapRunner(_DataParallel):
    """``jax.jit`` + ``jax.shard_map`` over a 1-D mesh; state, data and metrics replicated on every device.

    ``check_vma=False``: with JAX's varying-axes checking on, the gradient of a replicated parameter taken inside
    shard_map is already summed over devices (the transpose of the implicit broadcast is a psum), and the step's
    own ``pmean`` would then give N times the gradient. Off, shard_map differentiates per device, as pmap does,
    and one step serves both wrappers.
    """

    def _wrap(self, fn, train: bool, donate_argnums):
        specs = (P(),) * (5 if train else 4)
        mapped = jax.shard_map(fn, mesh=self.mesh, in_specs=specs, out_specs=P(), check_vma=False)
        return jax.jit(mapped, donate_argnums=donate_argnums)


class PmapRunner(_DataParallel):
    """``jax.pmap`` of the same device step: the state stacked with one row per local device (pmap's idiom),
    data, plan and metrics broadcast (``in_axes=None``; metrics come back unmapped, ``out_axes=None``)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.stacked = NamedSharding(self.mesh.local_mesh, P(AXIS))
        # pmap takes and returns host-local arrays (this process's devices) and makes them global itself
        self.sharding = NamedSharding(self.mesh.local_mesh, P())

    def _wrap(self, fn, train: bool, donate_argnums):
        return jax.pmap(fn, AXIS, in_axes=(0,) + (None,) * (4 if train else 3), out_axes=(0, None) if train else None,
                        devices=self.devices, donate_argnums=donate_argnums)

    def _put_state(self, state: TrainState) -> TrainState:
        """Each leaf stacked into (local devices, ...), one row per local device (no extra host copies)."""
        n = len(self.stacked.addressable_devices)

        def stack(x):
            value = _local_copy(x)
            return jax.device_put(np.broadcast_to(value[None], (n, *value.shape)), self.stacked)

        return jax.tree.map(lambda x: _via_key_data(stack, x), state)

    def get_state(self, state: RunnerState) -> TrainState:
        """Row 0 of the stacked state as globally replicated ``jax.Array``s (what a checkpoint holds)."""

        def unstack(x):
            shape = x.shape[1:]
            rows = {s.device: s.data.reshape(shape) for s in x.addressable_shards}
            arrays = [rows[d] for d in self.replicated.addressable_devices_indices_map(shape)]
            return jax.make_array_from_single_device_arrays(shape, self.replicated, arrays)

        return jax.tree.map(lambda x: _via_key_data(unstack, x), super().get_state(state))


class JitRunner(_DataParallel):
    """One ``jax.jit`` step over global arrays: the state replicated on a 1-D ``data`` mesh, each batch sharded
    over it. The step is the one-device step (``engine.train_step`` with no axis name): XLA's SPMD partitioner
    splits forward and backward by batch and inserts the collectives, so BatchNorm normalises over the global
    batch with no axis name, as one device does (``bn_sync=False`` is refused: ``ParallelConfig``).

    The batch is sharded where it is made: the window of the epoch plan it comes from (sample indices, crop
    offsets, flips) and the batch are constrained to ``P('data')``, so each device gathers, augments and
    normalises only its own share from the resident split (on the CPU the per-device conv-input buffers below
    would shard it too; without either, the step would run replicated). Read from the compiled HLO of a float64
    training step of SimpleResNet(1), 8 simulated CPU devices, batch 32 (tests/test_parallel.py checks it): the
    uint8 image gathers take 4 rows per device (``u8[4,1,8,8,3]``), never 32; there are 34 all-reduces
    (BatchNorm's batch sums forward and backward, the loss, the gradients and the metric sums; XLA packs some
    into tuples) and no all-gather, once the CPU's conv-input buffers are kept per device
    (``cpu.MaterializedInputConv2d``).

    Several processes: the data split is resident on every device (as for shard_map and pmap) and every
    process holds the same epoch plan, so the rows of the global batch a device gathers come from its own
    process's copy: each process feeds exactly its own part of the global batch and no image crosses processes,
    which is what ``jax.make_array_from_process_local_data`` of per-process batches would give, without a host
    copy per step (the cost is the whole uint8 split on every device, 150 MB for CIFAR-10).
    """

    def __init__(self, graphdef: nnx.GraphDef, tx: optax.GradientTransformation, recipe: Recipe, dtype=jnp.float32,
                 bn_sync: bool = True, devices: Sequence[jax.Device] | None = None):
        ParallelConfig(kind="jit", bn_sync=bn_sync)  # the one rule: per-device statistics need a per-device step
        super().__init__(graphdef, tx, recipe, dtype, bn_sync, devices)
        self.batch_sharding = NamedSharding(self.mesh, P(AXIS))

    def _set_up(self, model: nnx.Module) -> None:
        """The platform's speed measures; no axis name on BatchNorm: the global batch's statistics come from the
        sharding (a mean over a sharded axis is an all-reduce)."""
        if self.platform == "cpu":
            cpu.materialize_conv_inputs(model, batch_mesh=self.mesh)
        for _, module in nnx.iter_modules(model):
            if isinstance(module, nnx.BatchNorm):
                module.axis_name = None

    def _shard(self, tree):
        return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, self.batch_sharding), tree)

    def _train_impl(self, state, metrics, data, plan, start, *, size):
        window = EpochPlan(*self._shard([jax.lax.dynamic_slice_in_dim(x, start, size) for x in plan]))
        images, labels = self._shard(gather_batch(data, window, 0, size, self.recipe, self.dtype))
        state, step_metrics = engine.train_step(self.step_graphdef, self.tx, state, images, labels)
        return state, metrics + step_metrics

    def _eval_impl(self, state, metrics, data, start, *, size):
        padded = -(-size // self.num_devices) * self.num_devices  # a multiple of the devices, padding masked out
        images, labels, mask = self._shard(gather_eval_batch(data, start, padded, self.recipe, self.dtype))
        mask = mask & (jnp.arange(padded) < size)
        return metrics + engine.eval_step(self.step_graphdef, state, images, labels, mask)

    def _wrap(self, fn, train: bool, donate_argnums):
        # the state and metric sums come back replicated, where put_state put them: the next step reuses this
        # executable and the donated buffers
        return jax.jit(fn, out_shardings=self.replicated, donate_argnums=donate_argnums)


def make_runner(kind: ParallelKind, graphdef: nnx.GraphDef, tx: optax.GradientTransformation, recipe: Recipe, *,
                dtype=jnp.float32, bn_sync: bool = True, devices: Sequence[jax.Device] | None = None) -> Runner:
    """The runner for ``kind`` on ``devices`` (default: ``default_devices()``); ``'auto'`` is ``auto_kind``'s
    choice. A kind that cannot have ``bn_sync`` (jit without it) is a ``ConfigError`` naming those that can."""
    if kind not in PARALLEL_KINDS:
        raise ValueError(f"unknown parallel kind {kind!r}; choose from {', '.join(PARALLEL_KINDS)}")
    ParallelConfig(kind=kind, bn_sync=bn_sync)  # the rules between kind and bn_sync, as the command line has them
    devices = list(devices) if devices is not None else default_devices()
    if kind == "auto":
        kind = auto_kind(len(devices), bn_sync)
    if kind == "single":
        if jax.process_count() > 1:
            raise ConfigError("--parallel single runs on one device of one process; with several processes "
                              "use jit, shard_map or pmap.")
        return SingleDeviceRunner(graphdef, tx, recipe, dtype=dtype, device=devices[0])
    cls = {"jit": JitRunner, "shard_map": ShardMapRunner, "pmap": PmapRunner}[kind]
    return cls(graphdef, tx, recipe, dtype=dtype, bn_sync=bn_sync, devices=devices)


def auto_kind(num_devices: int, bn_sync: bool = True) -> ParallelKind:
    """What ``--parallel auto`` runs: single on one device; on several, jit, or shard_map when ``bn_sync`` is off
    (per-device statistics need a per-device step)."""
    if num_devices == 1:
        return "single"
    # jit: JAX's recommended data-parallel path, and not slower within noise. benchmarks/parallel_kinds.py
    # (BENCHMARKS.md, "Data-parallel paths"), SimpleResNet(1), batch 64, 2-core Xeon at load 7: median ms/step
    # jit / shard_map / pmap 208 / 207 / 206 on 2 simulated devices, 142 / 135 / 130 on 8, with rounds spread
    # over 120-270 ms. No GPU figures yet.
    return "jit" if bn_sync else "shard_map"


def runner_factory(config: ParallelConfig) -> Callable[..., Runner]:
    """``make_runner`` with ``config``'s kind and BatchNorm synchronisation bound: ``factory(graphdef, tx, recipe,
    dtype=dtype)``, the form ``flax_resnet.training.train(runner=...)`` accepts."""
    return functools.partial(make_runner, config.kind, bn_sync=config.bn_sync)


__all__ = ["AXIS", "PARALLEL_KINDS", "BN_SYNC_OFF_KINDS", "ParallelKind", "JitRunner", "PmapRunner", "ShardMapRunner",
           "auto_kind", "default_devices", "make_runner", "runner_factory", "validate_batch_sizes", "BatchSizeError"]
