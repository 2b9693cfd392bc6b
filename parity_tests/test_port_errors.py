"""A state_dict that does not fit: one PortError naming every problem, and the Flax model left untouched."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch
from flax import nnx

import flax_resnet as fr
from parity_tests.helpers import CASE_PARAMS, flax_twin, torch_model


def _snapshot(model: nnx.Module) -> list[np.ndarray]:
    return [np.array(leaf) for leaf in jax.tree.leaves(nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat)))]


def _assert_unchanged(model: nnx.Module, before: list[np.ndarray]) -> None:
    after = _snapshot(model)
    assert len(after) == len(before)
    for a, b in zip(after, before, strict=True):
        assert a.dtype == b.dtype and np.array_equal(a, b)


@pytest.mark.parametrize("case", CASE_PARAMS)
def test_missing_extra_and_misshapen_keys_in_one_error(case):
    """Missing key + unexpected key + wrong shape: one PortError whose message names all three, and nothing
    in the model changed (not even the tensors that did fit)."""
    state_dict = torch_model(case, seed=5).state_dict()
    keys = [k for k in state_dict if k.endswith("weight")]
    missing, misshapen = keys[0], keys[-1]
    del state_dict[missing]
    state_dict[misshapen] = torch.zeros(*state_dict[misshapen].shape, 2)
    state_dict["extra.weight"] = torch.zeros(3)
    model = flax_twin(case)
    before = _snapshot(model)
    with pytest.raises(fr.PortError) as info:
        fr.load_torch_state_dict(model, state_dict)
    message = str(info.value)
    assert missing in message and "missing" in message
    assert "extra.weight" in message and "unexpected" in message
    assert misshapen in message and "size mismatch" in message
    _assert_unchanged(model, before)


def test_each_problem_alone_raises_and_changes_nothing():
    case = CASE_PARAMS[0].values[0]
    good = torch_model(case, seed=5).state_dict()
    model = flax_twin(case)
    before = _snapshot(model)
    key = next(iter(good))
    variants = {
        "missing": {k: v for k, v in good.items() if k != key},
        "unexpected": {**good, "bn9.weight": torch.zeros(1)},
        "size mismatch": {**good, key: good[key][:1]},
    }
    for word, state_dict in variants.items():
        with pytest.raises(fr.PortError, match=word):
            fr.load_torch_state_dict(model, state_dict)
        _assert_unchanged(model, before)
    with pytest.raises(fr.PortError):
        fr.load_torch_state_dict(model, [good[key]])  # not a mapping
    prefixed = {f"module.{k}": v for k, v in good.items()}  # a DataParallel checkpoint
    with pytest.raises(fr.PortError, match="module."):
        fr.load_torch_state_dict(model, prefixed)
    _assert_unchanged(model, before)
