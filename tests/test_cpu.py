"""The CPU speed measures (``training.cpu``): applied by the runners, invisible in the numbers, and a jaxlib that
refuses the XLA options costs speed, never a run."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flax_resnet import layers, registry
from flax_resnet.training import cpu, engine
from flax_resnet.training.runners import step_graph


def test_conv_inputs_are_materialized_in_the_step_graph_only(make_recipe):
    """The runner's graph on the CPU has every Conv2d swapped for the materialising one; the model and its
    graphdef are untouched, and loss and gradients are bit-identical (the gather is an identity)."""
    model = registry.build_flax("SimpleResNet", {"n_blocks": 1}, seed=0)
    tx = engine.make_optimizer(make_recipe(), 4)
    graphdef, state = engine.init_train_state(model, tx)
    graph = step_graph(graphdef, state, "cpu")
    assert step_graph(graphdef, state, "gpu") is graphdef
    swapped = [m for _, m in nnx.iter_modules(engine.merge_model(graph, state)) if isinstance(m, layers.Conv2d)]
    assert swapped and all(type(m) is cpu.MaterializedInputConv2d for m in swapped)
    assert all(type(m) is layers.Conv2d for _, m in nnx.iter_modules(model) if isinstance(m, layers.Conv2d))

    x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
    y = jnp.arange(4) % 10
    outs = [jax.jit(lambda s, g=g: engine.train_step(g, tx, s, x, y))(state) for g in (graphdef, graph)]
    for a, b in zip(jax.tree.leaves(outs[0]), jax.tree.leaves(outs[1]), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    hlo = jax.jit(lambda s: engine.train_step(graph, tx, s, x, y)).lower(state).as_text()
    assert hlo.count("gather") >= len(swapped)  # one identity gather per convolution input at least


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
