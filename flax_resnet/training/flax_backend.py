"""The JAX/Flax side of the training loop: a ``runners.Runner`` (placement and compilation) driving the pure steps of
``engine``. Steps are dispatched back to back: metrics are summed on the device and read once per epoch."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from flax_resnet import _codecs
from flax_resnet.config import RunConfig
from flax_resnet.data.plan import EpochPlan, batch_bounds, steps_per_epoch
from flax_resnet.dtypes import cast_floating
from flax_resnet.recipes import Recipe
from flax_resnet.training import engine
from flax_resnet.training.engine import Metrics, TrainState
from flax_resnet.training.loop import EpochResult, StepHook
from flax_resnet.training.runners import Runner, SingleDeviceRunner

__all__ = ["FlaxBackend", "epoch_result"]


def _host_metrics(metrics: Metrics) -> dict[str, float]:
    """One device-to-host read of the epoch's sums (replicated over devices and processes by the parallel
    runners: this process's first copy is read)."""
    host = jax.device_get([m.addressable_data(0) for m in metrics])
    return dict(zip(Metrics._fields, map(float, host), strict=True))


def _ratio(num: float, den: float) -> float:
    return num / den if den else float("nan")


def epoch_result(recipe: Recipe, sums: Mapping[str, float], first_step: int) -> EpochResult:
    """An epoch's result from its metric sums (``engine.Metrics`` read to the host), the loss as the recipe's
    notebook averages it; ``first_step``: the global step the epoch began with."""
    if recipe.train_loss_mean == "samples":
        loss = _ratio(sums["loss_x_count"], sums["count"])
    else:
        loss = _ratio(sums["loss_of_batches"], sums["batches"])
    first = int(sums["first_nonfinite"])
    return EpochResult(loss=loss, accuracy=_ratio(100.0 * sums["correct"], sums["count"]), count=int(sums["count"]),
                       first_nonfinite=None if first == engine.NO_STEP else first - first_step)


class FlaxBackend:
    """Trains an NNX model (cast to the config's dtype; it holds the trained state after ``finish``)."""

    def __init__(self, model: nnx.Module, config: RunConfig, runner: Runner | Callable[..., Runner] | None = None):
        dtype = jnp.dtype(config.dtype)
        if dtype == jnp.float64 and not jax.config.read("jax_enable_x64"):
            raise ValueError("float64 training needs jax.config.update('jax_enable_x64', True) first")
        self.model, self.config, self.dtype, self._runner_arg = model, config, dtype, runner
        cast_floating(model, dtype)
        self.is_main_process = jax.process_index() == 0

    def prepare(self, train_images: np.ndarray, train_labels: np.ndarray, test_images: np.ndarray,
                test_labels: np.ndarray) -> None:
        recipe = self.config.recipe
        self.num_train, self.num_test = len(train_labels), len(test_labels)
        self.spe = steps_per_epoch(self.num_train, recipe.batch_size)
        self.tx = engine.make_optimizer(recipe, self.spe)
        self.graphdef, self._template = engine.init_train_state(self.model, self.tx)
        runner = self._runner_arg or SingleDeviceRunner
        if not isinstance(runner, Runner):
            runner = runner(self.graphdef, self.tx, recipe, dtype=self.dtype)
        self.runner: Runner = runner
        runner.check_batch_sizes(self.num_train, recipe.batch_size)  # before anything is compiled
        self.state_value = runner.put_state(self._template)
        self.train_data = runner.put_data(train_images, train_labels)
        self.test_data = runner.put_data(test_images, test_labels) if self.num_test else None

    def train_epoch(self, epoch: int, plan: EpochPlan, on_step: StepHook) -> EpochResult:
        recipe, device_plan = self.config.recipe, self.put_plan(plan)
        metrics = self.runner.zero_metrics()
        read = [0.0]  # the running sum of batch losses as last read by a step's loss()

        def step_loss() -> float:
            # the sums' buffers are donated to the next step, so the sum before this step is gone unless it was
            # read: the loss since the last read, which is the step's own when the step before was read too
            total = float(np.asarray(metrics.loss_of_batches.addressable_data(0)))
            loss, read[0] = total - read[0], total
            return loss

        for step in range(self.spe):
            start, stop = batch_bounds(step, self.num_train, recipe.batch_size)
            metrics = self.train_step(device_plan, start, stop - start, metrics)
            on_step(step, functools.cache(step_loss))  # read at most once a step: every hook gets the same value
        return epoch_result(recipe, _host_metrics(metrics), epoch * self.spe)  # the epoch's one wait for the device

    def evaluate(self) -> tuple[float, float]:
        size, metrics = self.config.recipe.eval_batch_size, self.runner.zero_metrics()
        for start in range(0, self.num_test, size):
            metrics = self.eval_step(start, size, metrics)
        sums = _host_metrics(metrics)
        return _ratio(sums["loss_of_batches"], sums["batches"]), _ratio(100.0 * sums["correct"], sums["count"])

    # One step at a time, for the loop above and for tools that time a step (``flax_resnet.bench``); each returns as
    # soon as the step is dispatched.
    def put_plan(self, plan: EpochPlan) -> EpochPlan:
        """``plan`` placed where the steps read it (once per epoch: a step then takes it as it is)."""
        return self.runner.put_plan(plan)

    def train_step(self, plan: EpochPlan, start: int, size: int, metrics: Metrics | None = None) -> Metrics:
        """One optimizer step on the training samples at positions [start, start + size) of ``plan`` (as
        ``put_plan`` placed it), the model's state advanced; returns ``metrics`` (default: zeros) plus the step's."""
        metrics = self.runner.zero_metrics() if metrics is None else metrics
        self.state_value, metrics = self.runner.train_step(self.state_value, metrics, self.train_data, plan, start,
                                                           size)
        return metrics

    def eval_step(self, start: int, size: int, metrics: Metrics | None = None) -> Metrics:
        """The eval step on test samples [start, start + size); returns ``metrics`` (default: zeros) plus its."""
        metrics = self.runner.zero_metrics() if metrics is None else metrics
        return self.runner.eval_step(self.state_value, metrics, self.test_data, start, size)

    def lower_train_step(self, plan: EpochPlan, start: int, size: int) -> jax.stages.Lowered:
        """The function ``train_step`` runs, lowered for its compile time or XLA's cost analysis; runs nothing."""
        return self.runner.lower_train_step(self.state_value, self.runner.zero_metrics(), self.train_data, plan,
                                            start, size)

    def lower_eval_step(self, start: int, size: int) -> jax.stages.Lowered:
        """The function ``eval_step`` runs, lowered; runs nothing."""
        return self.runner.lower_eval_step(self.state_value, self.runner.zero_metrics(), self.test_data, start, size)

    def block_until_ready(self) -> None:
        """Wait until the steps dispatched so far have updated the state."""
        jax.block_until_ready(self.state_value)

    def state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """The ``TrainState`` as a dict, so that its ``params`` and ``model_state`` have the names a weights-only
        checkpoint gives them (``weights.load`` reads either)."""
        return _codecs.flax_to_arrays(self.runner.get_state(self.state_value)._asdict()), {}

    def load_state(self, arrays: Mapping[str, np.ndarray], extra: Mapping[str, Any]) -> None:
        state = _codecs.flax_from_arrays(self._template._asdict(), arrays)
        self.state_value = self.runner.put_state(TrainState(**state))

    def barrier(self, name: str) -> None:
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(name)

    def finish(self) -> nnx.Module:
        """The model with the trained weights; ``final_state`` keeps the whole ``TrainState`` (with the optimiser's)."""
        self.final_state = state = self.runner.get_state(self.state_value)
        nnx.update(self.model, state.params, state.model_state)
        return self.model
