"""The CPU speed measures (``training.cpu``): applied by the runners, invisible in the numbers, and a jaxlib that
refuses the XLA options costs speed, never a run."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flax_resnet import builders, layers
from flax_resnet.data import plan
from flax_resnet.training import cpu, engine
from flax_resnet.training.runners import SingleDeviceRunner


def conv_types(model: nnx.Module) -> list[type]:
    return [type(m) for _, m in nnx.iter_modules(model) if isinstance(m, layers.Conv2d)]


def test_the_runner_compiles_the_graph_it_built(tiny_dataset, make_recipe, monkeypatch):
    """On the CPU the runner's graph, made once by ``put_state``, has every Conv2d swapped for the materialising
    one; the model and its graphdef are untouched, and loss and gradients are bit-identical (the gather is an
    identity). The traced steps run that graph as it is: with the set-up made to fail, they still trace."""
    model = builders.build_flax("SimpleResNet", {"n_blocks": 1}, seed=0)
    recipe = make_recipe()
    tx = engine.make_optimizer(recipe, 4)
    graphdef, state = engine.init_train_state(model, tx)
    runner = SingleDeviceRunner(graphdef, tx, recipe, device=jax.devices("cpu")[0])
    held = runner.put_state(state)
    graph = runner.step_graphdef
    swapped = conv_types(engine.merge_model(graph, state))
    assert swapped and set(swapped) == {cpu.MaterializedInputConv2d}
    assert set(conv_types(model)) == set(conv_types(engine.merge_model(runner.graphdef, state))) == {layers.Conv2d}
    runner.put_state(state)  # a second state (a resumed run) keeps the graph the steps were traced with
    assert runner.step_graphdef is graph

    other = SingleDeviceRunner(graphdef, tx, recipe)
    other.platform = "gpu"  # the measures are the CPU's: elsewhere the graph is the model's
    other.put_state(state)
    assert set(conv_types(engine.merge_model(other.step_graphdef, state))) == {layers.Conv2d}

    x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
    y = jnp.arange(4) % 10
    outs = [jax.jit(lambda s, g=g: engine.train_step(g, tx, s, x, y))(state) for g in (graphdef, graph)]
    for a, b in zip(jax.tree.leaves(outs[0]), jax.tree.leaves(outs[1]), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    def rebuilt(*args):
        raise AssertionError("the traced step edits the model")

    monkeypatch.setattr(cpu, "materialize_conv_inputs", rebuilt)
    monkeypatch.setattr(runner, "_set_up", rebuilt)
    data = runner.put_data(tiny_dataset.train_images, tiny_dataset.train_labels)
    device_plan = runner.put_plan(plan.epoch_plan(0, 0, len(tiny_dataset.train_labels)))
    hlo = runner.lower_train_step(held, runner.zero_metrics(), data, device_plan, 0, 4).as_text()
    assert hlo.count("gather") >= len(swapped)  # one identity gather per convolution input at least
    runner.lower_eval_step(held, runner.zero_metrics(), data, 0, 4)


def test_options_a_jaxlib_refuses_are_dropped_with_one_warning(monkeypatch):
    cpu._accepted.cache_clear()
    monkeypatch.setattr(cpu, "COMPILER_OPTIONS", {"xla_cpu_no_such_option_anywhere": "true"})
    device = jax.devices("cpu")[0]
    with pytest.warns(RuntimeWarning, match="does not accept"):
        assert cpu.compiler_options(device) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # tried once per process: no second warning
        assert cpu.compiler_options(device) is None
    cpu._accepted.cache_clear()


def test_the_real_options_are_accepted_by_this_jaxlib():
    cpu._accepted.cache_clear()
    assert cpu.compiler_options(jax.devices("cpu")[0]) == cpu.COMPILER_OPTIONS
