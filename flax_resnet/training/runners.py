"""How the pure steps of ``flax_resnet.training.engine`` are run: the interface the training loop talks to.

A runner owns placement and compilation; the loop asks it for "the step at positions [start, start + size) of this
epoch plan" and never touches devices itself, so one loop serves one device and the three data-parallel runners
(``parallel``). Everything a step needs stays on the device (the whole uint8 split, the epoch plan, the metric
sums): the host only dispatches, and reads metrics once per epoch.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from flax_resnet.data.plan import EpochPlan
from flax_resnet.recipes import Recipe
from flax_resnet.training import cpu, engine
from flax_resnet.training.engine import Metrics, TrainState


class DeviceData(NamedTuple):
    """A split resident on the device(s): uint8 NHWC images and int32 labels."""

    images: jax.Array
    labels: jax.Array


RunnerState = list[jax.Array]
"""The state as a runner holds it between ``put_state`` and ``get_state``: the ``TrainState``'s leaves."""


def gather_uint8(data: DeviceData, plan: EpochPlan, start, size: int, augment: bool) -> tuple[jax.Array, jax.Array]:
    """The uint8 NHWC batch at plan positions [start, start + size), cropped and flipped when ``augment``;
    ``start`` may be traced. ``torch_ref.data.gather`` computes the same bytes in torch."""
    idx = jax.lax.dynamic_slice_in_dim(plan.permutation, start, size)
    x = data.images[idx]
    if augment:
        x = engine.augment(x, jax.lax.dynamic_slice_in_dim(plan.offsets, start, size),
                           jax.lax.dynamic_slice_in_dim(plan.flips, start, size))
    return x, data.labels[idx]


def gather_batch(data: DeviceData, plan: EpochPlan, start, size: int, recipe: Recipe, dtype
                 ) -> tuple[jax.Array, jax.Array]:
    """The augmented, normalised batch at positions [start, start + size) of the plan; ``start`` may be traced."""
    x, labels = gather_uint8(data, plan, start, size, recipe.augment)
    return engine.normalize(x, recipe.mean, recipe.std, dtype), labels


def gather_eval_batch(data: DeviceData, start, size: int, recipe: Recipe, dtype
                      ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Test samples [start, start + size) in order, padded past the end; the mask marks real samples."""
    idx = start + jnp.arange(size)
    mask = idx < data.labels.shape[0]
    idx = jnp.minimum(idx, data.labels.shape[0] - 1)
    return engine.normalize(data.images[idx], recipe.mean, recipe.std, dtype), data.labels[idx], mask


class Runner:
    """What the training loop needs from a way of running steps (the loop calls every public method), and what
    every runner shares. A subclass says where arrays go (``sharding``) and how its per-device steps
    ``_train_impl`` / ``_eval_impl`` are compiled (``_wrap``), once per batch size.

    ``check_batch_sizes`` comes first, before anything is compiled, so that a batch size the devices cannot share
    fails in seconds (``parallel.BatchSizeError``). ``put_state`` returns the state as a flat list of its arrays
    (a ``RunnerState``), which the compiled steps take and give back, rebuilding the ``TrainState`` only inside the
    trace: jit flattening and rebuilding its ~190 ``nnx.Variable`` objects cost ~5 ms of Python per step
    (BENCHMARKS.md). ``get_state`` gives one host-readable ``TrainState`` back (for checkpoints, export, porting).

    The model a step runs is ``step_graphdef``, the runner's own copy of ``graphdef`` made once, by the first
    ``put_state``, with what the runner sets on it (``_set_up``): on the CPU every ``layers.Conv2d`` keeps its input
    as a buffer (``cpu.materialize_conv_inputs``); the data-parallel runners name their axis on every BatchNorm.
    Made outside the traced step, so what is compiled is what was built; the caller's model and ``graphdef`` are
    not changed.
    """

    num_devices = 1
    platform: str  # the devices' platform: 'cpu', 'gpu', ...; the speed measures of ``_set_up`` follow it
    sharding: jax.sharding.Sharding  # where data, plan and metric sums go

    def __init__(self, graphdef: nnx.GraphDef, tx: optax.GradientTransformation, recipe: Recipe, dtype):
        self.graphdef, self.tx, self.recipe, self.dtype = graphdef, tx, recipe, dtype
        self.treedef: jax.tree_util.PyTreeDef | None = None  # the TrainState's, set by put_state
        self.step_graphdef: nnx.GraphDef | None = None  # the graph the steps run, made by the first put_state
        self._steps: dict[tuple[bool, int], Callable] = {}

    def _treedef(self) -> jax.tree_util.PyTreeDef:
        if self.treedef is None:
            raise RuntimeError("the runner has no state yet: call put_state first")
        return self.treedef

    def _step(self, train: bool, size: int) -> Callable:
        if train and size % self.num_devices:  # the loop's check_batch_sizes refuses such a run before this
            raise ValueError(f"a training batch of {size} samples does not split evenly across {self.num_devices} "
                             f"devices: give a batch size that is a multiple of {self.num_devices}.")
        if (train, size) not in self._steps:
            impl = functools.partial(self._train_impl if train else self._eval_impl, size=size)

            def on_leaves(leaves, *args):
                treedef = self._treedef()
                out = impl(treedef.unflatten(leaves), *args)
                # a train step's new state as leaves; flatten_up_to raises (at trace time) if its structure changed
                return (treedef.flatten_up_to(out[0]), out[1]) if train else out

            self._steps[train, size] = self._wrap(on_leaves, train, donate_argnums=(0, 1) if train else (1,))
        return self._steps[train, size]

    def check_batch_sizes(self, num_examples: int, batch_size: int) -> None:
        """One device runs batches of any size."""

    def put_data(self, images: np.ndarray, labels: np.ndarray) -> DeviceData:
        return DeviceData(*self._put((np.asarray(images), np.asarray(labels).astype(np.int32))))

    def put_state(self, state: TrainState) -> RunnerState:
        if self.step_graphdef is None:
            model = engine.merge_model(self.graphdef, state)  # a copy: new modules around the state's arrays
            self._set_up(model)
            self.step_graphdef = nnx.split(model, nnx.Param, ...)[0]
        leaves, self.treedef = jax.tree.flatten(self._put_state(state))
        return leaves

    def _set_up(self, model: nnx.Module) -> None:
        """Set on the runner's copy of the model what its steps need: the speed measures of its platform."""
        if self.platform == "cpu":
            cpu.materialize_conv_inputs(model)

    def _put_state(self, state: TrainState) -> TrainState:
        return self._put(state)

    def put_plan(self, plan: EpochPlan) -> EpochPlan:
        return EpochPlan(*self._put(tuple(np.asarray(x) for x in plan)))

    def zero_metrics(self) -> Metrics:
        """Fresh metric sums for the steps, each its own buffer (the steps donate them), the losses in the loss dtype.
        Already where the steps keep theirs: jit keys its cache on placement, so sums made elsewhere (uncommitted)
        would compile the step again."""
        f, i = functools.partial(jnp.zeros, (), self.dtype), functools.partial(jnp.zeros, (), jnp.int32)
        return self._put(Metrics(f(), f(), i(), i(), i(), jnp.full((), engine.NO_STEP, jnp.int32)))

    def get_state(self, state: RunnerState) -> TrainState:
        return self._treedef().unflatten(state)

    def _put(self, tree):
        return jax.device_put(tree, self.sharding)

    # ``start`` goes in as a NumPy scalar: ``jnp.int32(start)`` would dispatch a conversion of its own every step.
    def train_step(self, state: RunnerState, metrics: Metrics, data: DeviceData, plan: EpochPlan, start: int,
                   size: int) -> tuple[RunnerState, Metrics]:
        return self._step(True, size)(state, metrics, data, plan, np.int32(start))

    def eval_step(self, state: RunnerState, metrics: Metrics, data: DeviceData, start: int, size: int) -> Metrics:
        return self._step(False, size)(state, metrics, data, np.int32(start))

    # Ahead-of-time lowering of the very functions ``train_step`` / ``eval_step`` run, for tools that want the
    # compile time or XLA's cost analysis without running a step (``flax_resnet.bench``); nothing is executed.
    def lower_train_step(self, state, metrics, data, plan, start, size) -> jax.stages.Lowered:
        return self._step(True, size).lower(state, metrics, data, plan, np.int32(start))

    def lower_eval_step(self, state, metrics, data, start, size) -> jax.stages.Lowered:
        return self._step(False, size).lower(state, metrics, data, np.int32(start))


class SingleDeviceRunner(Runner):
    """``jax.jit`` on one device; state and metric buffers are donated so steps update in place."""

    def __init__(self, graphdef: nnx.GraphDef, tx: optax.GradientTransformation, recipe: Recipe,
                 dtype=jnp.float32, device: jax.Device | None = None):
        super().__init__(graphdef, tx, recipe, dtype)
        self.device = device or jax.devices()[0]
        self.platform = self.device.platform
        self.sharding = jax.sharding.SingleDeviceSharding(self.device)

    def _wrap(self, fn, train: bool, donate_argnums) -> Callable:
        return jax.jit(fn, donate_argnums=donate_argnums, compiler_options=cpu.compiler_options(self.device))

    def _train_impl(self, state, metrics, data, plan, start, *, size):
        images, labels = gather_batch(data, plan, start, size, self.recipe, self.dtype)
        state, step_metrics = engine.train_step(self.step_graphdef, self.tx, state, images, labels)
        return state, metrics + step_metrics

    def _eval_impl(self, state, metrics, data, start, *, size):
        images, labels, mask = gather_eval_batch(data, start, size, self.recipe, self.dtype)
        return metrics + engine.eval_step(self.step_graphdef, state, images, labels, mask)
