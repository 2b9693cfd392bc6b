"""Data parallelism: one per-device step of ``flax_resnet.training.engine``, run on many devices (and hosts) two ways.

The step is the engine's pure ``train_step`` / ``eval_step`` with its collectives named by one axis, ``AXIS``.
What differs is only the wrapper that maps it over devices:

- ``ShardMapRunner``: ``jax.jit`` + ``jax.shard_map`` over a 1-D ``jax.sharding.Mesh`` (the path JAX recommends).
  The state lives as globally replicated ``jax.Array``s (``NamedSharding(mesh, P())``) on every device.
- ``PmapRunner``: ``jax.pmap`` (in maintenance since JAX 0.8 and itself implemented on shard_map). The state
  lives the classic pmap way, stacked with a leading axis of one row per local device.

Both implement ``flax_resnet.training.runners.Runner`` and give the same numbers as ``SingleDeviceRunner`` with the same
global batch: every device holds the whole uint8 split and gathers its own contiguous share of each global
batch (device d of N takes plan positions [start + d*size/N, start + (d+1)*size/N)); the loss and gradients are
averaged over devices (``pmean``), the metric sums added (``psum``), and BatchNorm statistics are computed over
the global batch (``bn_sync=True``, the default).

``bn_sync=False`` computes BatchNorm statistics per device, like torch DDP without SyncBatchNorm. The devices'
running statistics then drift apart; like DDP (``broadcast_buffers=True``, its default), which broadcasts rank 0's
buffers to every rank before each forward pass, the runner keeps **device 0's** running statistics: after each
step they are broadcast to all devices. What is checkpointed and evaluated is therefore what rank 0 of a DDP run
would save and evaluate with.

Evaluation is sharded too: an eval batch of any size is padded up to a multiple of the device count and the
padding masked out. Training batches must divide by the device count (``validate_batch_sizes`` says so before
training, with a batch size that works). Dropout keys are folded with the device index inside the step, so
devices draw different masks for their different samples.

Multi-host: after ``training.distributed.initialize`` the mesh spans the devices of all processes, grouped by
process; each process puts the same (seeded) state and the same data, and its devices compute only their shares.
``get_state`` returns globally replicated ``jax.Array``s; the checkpoint store writes process 0's copy while the
others wait at a barrier.
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable, Sequence
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from flax_resnet.data.plan import EpochPlan
from flax_resnet.errors import FlaxResnetError
from flax_resnet.recipes import Recipe
from flax_resnet.training import engine
from flax_resnet.training.engine import Metrics, TrainState
from flax_resnet.training.runners import (
    DeviceData,
    Runner,
    RunnerState,
    SingleDeviceRunner,
    StateLeaves,
    gather_batch,
    gather_eval_batch,
    step_graph,
)
from flax_resnet.training.runners import zero_metrics as _zero_metrics

AXIS = "data"  # the one mesh / pmap axis every collective of the step names

ParallelKind = Literal["single", "pmap", "shard_map", "auto"]
PARALLEL_KINDS: tuple[str, ...] = ("auto", "single", "pmap", "shard_map")


# ------------------------------------------------------------------------------------------ batch sizes
class BatchSizeError(FlaxResnetError, ValueError):
    """A training batch that the devices cannot share evenly; the message names a batch size that works."""


def validate_batch_sizes(num_examples: int, batch_size: int, num_devices: int) -> None:
    """Fail before training when some training batch of an epoch cannot be split evenly across the devices.

    The rule: every global training batch, including the short last one that torch's ``drop_last=False``
    keeps (``num_examples % batch_size`` samples), must divide by the device count, so that each device takes
    the same number of samples and the averaged per-device losses equal the global mean. Evaluation batches
    are padded and masked, so they may have any size.
    """
    if num_devices < 1:
        raise ValueError(f"num_devices must be at least 1, got {num_devices}")
    if num_examples < 1 or batch_size < 1:
        raise ValueError(f"num_examples and batch_size must be positive, got {num_examples} and {batch_size}")
    if num_devices == 1:
        return
    if num_examples % num_devices:
        fits = [d for d in range(1, min(num_devices * 2, num_examples) + 1) if num_examples % d == 0]
        raise BatchSizeError(
            f"cannot split the training set across {num_devices} devices: its {num_examples} samples do not "
            f"divide by {num_devices}, so the short last batch of every epoch (kept, as torch's drop_last=False "
            f"keeps it) cannot be shared evenly whatever the batch size. Use a device count that divides "
            f"{num_examples} (e.g. {', '.join(map(str, fits[-4:]))}; --parallel single uses one device).")
    last = num_examples % batch_size
    if batch_size % num_devices or (last and last % num_devices):
        lower = batch_size - batch_size % num_devices
        options = [b for b in (lower, lower + num_devices) if b > 0]
        raise BatchSizeError(
            f"global batch size {batch_size} does not split evenly across {num_devices} devices: every training "
            f"batch must divide by the device count, including the short last batch of an epoch "
            f"({num_examples} % {batch_size} = {last} samples). Use a multiple of {num_devices}, "
            f"e.g. --batch-size {' or '.join(map(str, options))}.")


def _check_step_size(size: int, num_devices: int) -> None:
    if size % num_devices:
        raise ValueError(f"a training batch of {size} samples does not split evenly across {num_devices} devices; "
                         "(the runner's check_batch_sizes, which the training loop calls first, catches this up front)")


# ------------------------------------------------------------------------------------------ the device step
def with_bn_axis(graphdef: nnx.GraphDef, state: TrainState, axis_name: str | None) -> nnx.GraphDef:
    """The graph with ``axis_name`` set on every BatchNorm (``None``: per-device statistics).

    BatchNorm reads ``axis_name`` from its (static) attributes, so it lives in the graphdef; this rebuilds the
    graphdef at trace time from the step's own state (no run-time cost).
    """
    model = nnx.merge(graphdef, state.params, state.model_state)
    for _, module in nnx.iter_modules(model):
        if isinstance(module, nnx.BatchNorm):
            module.axis_name = axis_name
    return nnx.split(model, nnx.Param, ...)[0]


def _broadcast_from_device0(tree, axis_name: str):
    """Every device gets device 0's floating-point leaves (``jax.lax.pbroadcast`` has no CPU lowering, so a masked
    psum: exact, since the other devices add zeros). Non-float leaves (counters, RNG keys) agree already."""
    first = jax.lax.axis_index(axis_name) == 0

    def bcast(x):
        if not jnp.issubdtype(x.dtype, jnp.inexact):
            return x
        return jax.lax.psum(jnp.where(first, x, jnp.zeros_like(x)), axis_name)

    return jax.tree.map(bcast, tree)


def _is_key(x) -> bool:
    return jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def _per_device_keys(model_state, axis_name: str):
    """Dropout keys folded with the device index, so devices draw different masks for their different samples."""
    d = jax.lax.axis_index(axis_name)
    return jax.tree.map(lambda x: jax.random.fold_in(x, d) if _is_key(x) else x, model_state)


def device_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, recipe: Recipe, dtype,
                      bn_sync: bool, num_devices: int, state: TrainState, metrics: Metrics, data: DeviceData,
                      plan: EpochPlan, start, size: int, platform: str = "") -> tuple[TrainState, Metrics]:
    """One device's share of the global step at plan positions [start, start + size); collectives over ``AXIS``.

    This is the function both wrappers map over the devices; it must run inside ``pmap`` or ``shard_map``.
    """
    local = size // num_devices
    local_start = start + jax.lax.axis_index(AXIS) * local
    images, labels = gather_batch(data, plan, local_start, local, recipe, dtype)
    keys = state.model_state
    state = state._replace(model_state=_per_device_keys(state.model_state, AXIS))
    graph = with_bn_axis(step_graph(graphdef, state, platform), state, AXIS if bn_sync else None)
    state, step_metrics = engine.train_step(graph, tx, state, images, labels, axis_name=AXIS)
    # the stored keys stay the replicated ones (only the RNG counters advance, equally on every device)
    state = state._replace(model_state=jax.tree.map(lambda new, old: old if _is_key(old) else new,
                                                    state.model_state, keys))
    if not bn_sync:  # DDP's rule: rank 0's BatchNorm buffers win
        state = state._replace(model_state=_broadcast_from_device0(state.model_state, AXIS))
    return state, metrics + step_metrics


def device_eval_step(graphdef: nnx.GraphDef, recipe: Recipe, dtype, num_devices: int, state: TrainState,
                     metrics: Metrics, data: DeviceData, start, size: int, platform: str = "") -> Metrics:
    """One device's share of the eval batch [start, start + size), padded up to a multiple of the devices."""
    local = -(-size // num_devices)
    local_start = start + jax.lax.axis_index(AXIS) * local
    images, labels, mask = gather_eval_batch(data, local_start, local, recipe, dtype)
    mask = mask & (local_start + jnp.arange(local) < start + size)  # the padding belongs to the next batch
    return metrics + engine.eval_step(step_graph(graphdef, state, platform), state, images, labels, mask,
                                      axis_name=AXIS)


# ------------------------------------------------------------------------------------------ placement helpers
def default_devices() -> list[jax.Device]:
    """All devices of all processes, grouped by process, so each host's devices take contiguous batch shares."""
    return sorted(jax.devices(), key=lambda d: (d.process_index, d.id))


def _host_value(x) -> tuple[np.ndarray, object]:
    """A leaf as host numpy (this process's copy of a replicated global array) and its PRNG impl, if a key."""
    impl = None
    if isinstance(x, jax.Array) and _is_key(x):
        impl = jax.random.key_impl(x)
        x = jax.random.key_data(x)
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        if not x.is_fully_replicated:
            raise ValueError(f"expected a replicated array, got one sharded as {x.sharding}")
        x = x.addressable_data(0)
    return np.asarray(x), impl


def _rewrap(x: jax.Array, impl) -> jax.Array:
    return x if impl is None else jax.random.wrap_key_data(x, impl=impl)


def _replicate(x, sharding: NamedSharding):
    """A leaf as a replicated array on ``sharding``'s devices; a no-op when it is one already.

    In one process this is a device-to-device copy; with several, each process contributes its own copy of the
    value (they are equal: same seed, same checkpoint), which is how a replicated global array is made.
    """
    if isinstance(x, jax.Array) and x.sharding.is_equivalent_to(sharding, x.ndim):
        return x
    if jax.process_count() == 1:
        return jax.device_put(x, sharding)
    value, impl = _host_value(x)
    return _rewrap(jax.make_array_from_process_local_data(sharding, value, value.shape), impl)


class _DataParallel:
    """What both wrappers share: the mesh, resident data, cached epoch plans and the batch-size rule."""

    def __init__(self, graphdef: nnx.GraphDef, tx: optax.GradientTransformation, recipe: Recipe, dtype=jnp.float32,
                 bn_sync: bool = True, devices: Sequence[jax.Device] | None = None):
        self.graphdef, self.tx, self.recipe, self.dtype, self.bn_sync = graphdef, tx, recipe, dtype, bn_sync
        self.devices = list(devices) if devices is not None else default_devices()
        self.num_devices = len(self.devices)
        self.platform = self.devices[0].platform  # the speed measures of ``runners.step_graph`` follow it
        self.mesh = Mesh(np.array(self.devices), (AXIS,))
        self.local_devices = [d for d in self.devices if d.process_index == jax.process_index()]
        self.replicated = NamedSharding(self.mesh, P())
        # where inputs (data, plan, metrics) go: global arrays for shard_map, host-local ones for pmap
        self.inputs = self.replicated
        self.leaves = StateLeaves()

    def put_data(self, images: np.ndarray, labels: np.ndarray) -> DeviceData:
        """The whole split on every device (150 MB of uint8 for CIFAR-10); each device gathers its own share."""
        return DeviceData(_replicate(np.asarray(images), self.inputs),
                          _replicate(np.asarray(labels).astype(np.int32), self.inputs))

    def check_batch_sizes(self, num_examples: int, batch_size: int) -> None:
        validate_batch_sizes(num_examples, batch_size, self.num_devices)

    def put_plan(self, plan: EpochPlan) -> EpochPlan:
        """The epoch plan on every device (the loop calls this once per epoch)."""
        return EpochPlan(*(_replicate(np.asarray(x), self.inputs) for x in plan))

    def zero_metrics(self) -> Metrics:
        """Fresh metric sums already where the step keeps them (the trainer asks for these once per epoch)."""
        return self._put_metrics(_zero_metrics(self.dtype))

    def _put_metrics(self, metrics: Metrics) -> Metrics:
        if isinstance(metrics.count, jax.Array) and metrics.count.sharding.is_equivalent_to(self.inputs, 0):
            return metrics
        return jax.tree.map(lambda x: _replicate(x, self.inputs), metrics)


# ------------------------------------------------------------------------------------------ shard_map
class ShardMapRunner(_DataParallel):
    """``jax.jit`` + ``jax.shard_map`` over a 1-D mesh; state, data and metrics replicated on every device.

    ``check_vma=False``: with JAX's varying-axes checking on, the gradient of a replicated parameter taken inside
    shard_map is already summed over devices (the transpose of the implicit broadcast is a psum), and the step's
    own ``pmean`` would then give N times the gradient. Off, shard_map differentiates per device, as pmap does,
    and one step serves both wrappers.
    """

    def __init__(self, graphdef: nnx.GraphDef, tx: optax.GradientTransformation, recipe: Recipe, dtype=jnp.float32,
                 bn_sync: bool = True, devices: Sequence[jax.Device] | None = None):
        super().__init__(graphdef, tx, recipe, dtype, bn_sync, devices)
        self._train = jax.jit(self._train_impl, static_argnames="size", donate_argnums=(0, 1))
        self._eval = jax.jit(self._eval_impl, static_argnames="size", donate_argnums=(1,))

    def _map(self, fn, num_args: int):
        return jax.shard_map(fn, mesh=self.mesh, in_specs=(P(),) * num_args, out_specs=P(), check_vma=False)

    def _train_impl(self, state, metrics, data, plan, start, *, size):
        step = functools.partial(device_train_step, self.graphdef, self.tx, self.recipe, self.dtype, self.bn_sync,
                                 self.num_devices, size=size, platform=self.platform)
        return self._map(self.leaves.train(step), 5)(state, metrics, data, plan, start)

    def _eval_impl(self, state, metrics, data, start, *, size):
        step = functools.partial(device_eval_step, self.graphdef, self.recipe, self.dtype, self.num_devices,
                                 size=size, platform=self.platform)
        return self._map(self.leaves.eval(step), 4)(state, metrics, data, start)

    def put_state(self, state: TrainState) -> RunnerState:
        return self.leaves.flatten(jax.tree.map(lambda x: _replicate(x, self.replicated), state))

    def get_state(self, state: RunnerState) -> TrainState:
        """The state as it is: globally replicated ``jax.Array``s (process 0's copy is what a checkpoint holds)."""
        return self.leaves.unflatten(state)

    def train_step(self, state, metrics, data, plan, start, size):
        _check_step_size(size, self.num_devices)
        return self._train(state, self._put_metrics(metrics), data, plan, np.int32(start),
                           size=size)

    def eval_step(self, state, metrics, data, start, size):
        return self._eval(state, self._put_metrics(metrics), data, np.int32(start), size=size)


# ------------------------------------------------------------------------------------------ pmap
class PmapRunner(_DataParallel):
    """``jax.pmap`` of the same device step: the state stacked with one row per local device (pmap's idiom),
    data, plan and metrics broadcast (``in_axes=None``; metrics come back unmapped, ``out_axes=None``)."""

    def __init__(self, graphdef: nnx.GraphDef, tx: optax.GradientTransformation, recipe: Recipe, dtype=jnp.float32,
                 bn_sync: bool = True, devices: Sequence[jax.Device] | None = None):
        super().__init__(graphdef, tx, recipe, dtype, bn_sync, devices)
        self.stacked = NamedSharding(self.mesh.local_mesh, P(AXIS))
        # pmap takes and returns host-local arrays (this process's devices) and makes them global itself
        self.inputs = NamedSharding(self.mesh.local_mesh, P())
        self._train_fns: dict[int, object] = {}
        self._eval_fns: dict[int, object] = {}

    def _train_fn(self, size: int):
        if size not in self._train_fns:
            step = functools.partial(device_train_step, self.graphdef, self.tx, self.recipe, self.dtype,
                                     self.bn_sync, self.num_devices, size=size, platform=self.platform)
            self._train_fns[size] = jax.pmap(self.leaves.train(step), AXIS, in_axes=(0, None, None, None, None),
                                             out_axes=(0, None), devices=self.devices, donate_argnums=(0, 1))
        return self._train_fns[size]

    def _eval_fn(self, size: int):
        if size not in self._eval_fns:
            step = functools.partial(device_eval_step, self.graphdef, self.recipe, self.dtype, self.num_devices,
                                     size=size, platform=self.platform)
            self._eval_fns[size] = jax.pmap(self.leaves.eval(step), AXIS, in_axes=(0, None, None, None), out_axes=None,
                                            devices=self.devices, donate_argnums=(1,))
        return self._eval_fns[size]

    def put_state(self, state: TrainState) -> RunnerState:
        """Each leaf stacked into (local devices, ...), one row per local device (no extra host copies)."""
        n = len(self.local_devices)

        def stack(x):
            value, impl = _host_value(x)
            return _rewrap(jax.device_put(np.broadcast_to(value[None], (n, *value.shape)), self.stacked), impl)

        return self.leaves.flatten(jax.tree.map(stack, state))

    def get_state(self, state: RunnerState) -> TrainState:
        """Row 0 of the stacked state as globally replicated ``jax.Array``s (what a checkpoint holds)."""

        def unstack(x):
            impl = None
            if _is_key(x):
                impl, x = jax.random.key_impl(x), jax.random.key_data(x)
            shape = x.shape[1:]
            rows = {s.device: s.data.reshape(shape) for s in x.addressable_shards}
            arrays = [rows[d] for d in self.replicated.addressable_devices_indices_map(shape)]
            return _rewrap(jax.make_array_from_single_device_arrays(shape, self.replicated, arrays), impl)

        return jax.tree.map(unstack, self.leaves.unflatten(state))

    def train_step(self, state, metrics, data, plan, start, size):
        _check_step_size(size, self.num_devices)
        return self._train_fn(size)(state, self._put_metrics(metrics), data, plan, np.int32(start))

    def eval_step(self, state, metrics, data, start, size):
        return self._eval_fn(size)(state, self._put_metrics(metrics), data, np.int32(start))


# ------------------------------------------------------------------------------------------ factory
def make_runner(kind: ParallelKind, graphdef: nnx.GraphDef, tx: optax.GradientTransformation, recipe: Recipe, *,
                dtype=jnp.float32, bn_sync: bool = True, devices: Sequence[jax.Device] | None = None) -> Runner:
    """The runner for ``kind``; ``'auto'`` is shard_map when more than one device is present, else single.

    ``devices`` defaults to every device of every process (``jax.devices()``, grouped by process).
    """
    if kind not in PARALLEL_KINDS:
        raise ValueError(f"unknown parallel kind {kind!r}; choose from {', '.join(PARALLEL_KINDS)}")
    devices = list(devices) if devices is not None else default_devices()
    if kind == "auto":
        kind = "shard_map" if len(devices) > 1 else "single"
    if kind == "single":
        if jax.process_count() > 1:
            raise ValueError("--parallel single runs on one device of one process; with several processes "
                             "use shard_map or pmap")
        return SingleDeviceRunner(graphdef, tx, recipe, dtype=dtype, device=devices[0])
    cls = ShardMapRunner if kind == "shard_map" else PmapRunner
    return cls(graphdef, tx, recipe, dtype=dtype, bn_sync=bn_sync, devices=devices)


# ------------------------------------------------------------------------------------------ command line
def add_parallel_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The flags of data-parallel and multi-host training, in their own help group."""
    g = parser.add_argument_group(
        "devices and hosts",
        "Data parallelism: each global batch is split evenly across all devices (of all processes); results "
        "equal a one-device run with the same --batch-size.")
    g.add_argument("--parallel", choices=PARALLEL_KINDS, default="auto",
                   help="how steps run: 'single' one device with jax.jit; 'shard_map' jax.jit + jax.shard_map over "
                        "a mesh of all devices (JAX's recommended path); 'pmap' the same step with jax.pmap; "
                        "'auto' (default) shard_map when more than one device is visible, else single")
    g.add_argument("--bn-sync", choices=("on", "off"), default="on",
                   help="'on' (default): BatchNorm statistics over the whole global batch (synchronised across "
                        "devices, as one device would compute them); 'off': per-device statistics, like torch DDP "
                        "without SyncBatchNorm, keeping device 0's running statistics as DDP keeps rank 0's")
    g.add_argument("--coordinator", metavar="HOST:PORT",
                   help="multi-host: address of process 0, where it serves the JAX coordinator (a free port on its "
                        "host, reachable from all processes); give it, --num-processes and --process-id to every "
                        "process, or none of them under SLURM/Open MPI, whose environment JAX reads itself")
    g.add_argument("--num-processes", type=int, metavar="N", help="multi-host: number of processes in the run")
    g.add_argument("--process-id", type=int, metavar="I",
                   help="multi-host: this process's rank in [0, N); rank 0 runs the coordinator and writes history, "
                        "plots and logs")
    g.add_argument("--distributed-timeout", type=float, default=300.0, metavar="SECONDS",
                   help="multi-host: how long to wait for the coordinator and the other processes before failing "
                        "(default: %(default)s)")
    return parser


def runner_factory(kind: ParallelKind = "auto", *, bn_sync: bool = True,
                   devices: Sequence[jax.Device] | None = None) -> Callable[..., Runner]:
    """``make_runner`` with the parallel choices bound: ``factory(graphdef, tx, recipe, dtype=dtype)``, the form
    ``flax_resnet.trainer.train(runner=...)`` accepts."""
    return functools.partial(make_runner, kind, bn_sync=bn_sync, devices=devices)


def runner_factory_from_args(args: argparse.Namespace) -> Callable[..., Runner]:
    """``runner_factory`` from the flags of ``add_parallel_arguments``."""
    return runner_factory(args.parallel, bn_sync=args.bn_sync == "on")


__all__ = ["AXIS", "PARALLEL_KINDS", "ParallelKind", "PmapRunner", "ShardMapRunner", "add_parallel_arguments",
           "default_devices", "device_eval_step", "device_train_step", "make_runner", "runner_factory",
           "runner_factory_from_args", "validate_batch_sizes", "with_bn_axis", "BatchSizeError"]
