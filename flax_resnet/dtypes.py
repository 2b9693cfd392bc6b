"""Changing the floating-point type of a whole model (float64 for exact parity checks); telling PRNG key arrays,
whose dtype no NumPy operation takes, from the others."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx


def cast_floating(model: nnx.Module, dtype) -> nnx.Module:
    """Cast every floating-point variable of ``model`` (parameters and BN statistics) to ``dtype`` in place.

    The layers compute in the dtype of their inputs and parameters, so a float64 model fed float64 inputs
    computes in float64 throughout (this needs ``jax.config.update('jax_enable_x64', True)``).
    """
    state = nnx.state(model)
    cast = jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, state)
    nnx.update(model, cast)
    return model


def is_prng_key(leaf: Any) -> bool:
    """Whether ``leaf`` is an array of typed PRNG keys (``jax.random.key``): reach its raw data through
    ``jax.random.key_data`` to store, copy or place it."""
    return hasattr(leaf, "dtype") and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key)
