"""Lossless port: torch -> Flax -> torch and Flax -> torch -> Flax give back every tensor bit for bit.

Every value is random (weights, BN statistics, and num_batches_tracked as a large integer), so a tensor that
is dropped, swapped with another of the same shape, transposed wrongly or rounded cannot come back equal.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import flax_resnet as fr
from parity_tests.helpers import CASE_PARAMS, flax_twin, state_arrays, torch_model

DTYPES = {"float32": (torch.float32, jnp.float32), "float64": (torch.float64, jnp.float64)}


def _randomise_torch(model: torch.nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for value in model.state_dict().values():  # the state_dict's tensors share storage with the model
            if value.is_floating_point():
                value.copy_(torch.randn(value.shape, generator=generator, dtype=value.dtype))
            else:
                value.fill_(int(torch.randint(1, 10**6, (), generator=generator)))


def _randomise_flax(model: nnx.Module, seed: int) -> None:
    rng = np.random.default_rng(seed)

    def fill(leaf: jax.Array) -> jax.Array:
        if jnp.issubdtype(leaf.dtype, jnp.floating):
            return jnp.asarray(rng.standard_normal(leaf.shape), leaf.dtype)
        if jnp.issubdtype(leaf.dtype, jnp.integer):
            return jnp.asarray(rng.integers(1, 10**6, leaf.shape), leaf.dtype)
        return leaf  # RNG keys of the dropout layer: not part of any state_dict

    nnx.update(model, jax.tree.map(fill, nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat))))


def _assert_bit_equal(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        assert got[key].dtype == value.dtype, key
        assert np.array_equal(got[key], value), key


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("case", CASE_PARAMS)
def test_torch_flax_torch_is_bit_exact(case, dtype):
    torch_dtype, jax_dtype = DTYPES[dtype]
    t = torch_model(case, dtype=torch_dtype)
    _randomise_torch(t, seed=1)
    f = flax_twin(case, jax_dtype)
    fr.load_torch_state_dict(f, t.state_dict())
    _assert_bit_equal(state_arrays(fr.to_torch_state_dict(f)), state_arrays(t.state_dict()))


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("case", CASE_PARAMS)
def test_flax_torch_flax_is_bit_exact(case, dtype):
    torch_dtype, jax_dtype = DTYPES[dtype]
    f = flax_twin(case, jax_dtype)
    _randomise_flax(f, seed=2)
    t = torch_model(case, dtype=torch_dtype)
    t.load_state_dict(fr.to_torch_state_dict(f), strict=True)
    back = flax_twin(case, jax_dtype)
    fr.load_torch_state_dict(back, t.state_dict())
    want = nnx.state(f, nnx.Any(nnx.Param, nnx.BatchStat))
    got = nnx.state(back, nnx.Any(nnx.Param, nnx.BatchStat))
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for (path, a), b in zip(jax.tree.leaves_with_path(want), jax.tree.leaves(got), strict=True):
        assert a.dtype == b.dtype, jax.tree_util.keystr(path)
        assert np.array_equal(np.asarray(a), np.asarray(b)), jax.tree_util.keystr(path)
