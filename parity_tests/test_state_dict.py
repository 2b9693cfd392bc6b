"""Same tensors on both sides: state_dict keys, shapes, dtypes, strict loading, parameter counts.

(Key order on genuinely initialised models: ``test_init_distribution.py::test_init_distribution_matches_torch``.)
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import flax_resnet as fr
import torch_ref as tr
from flax_resnet.port import torch_shapes
from parity_tests.helpers import CASE_PARAMS, flax_param_count, flax_twin, torch_model, torch_param_count


@pytest.mark.parametrize("case", CASE_PARAMS)
def test_keys_shapes_and_strict_load(case):
    """torch_keys names the torch model's state_dict keys and torch_shapes gives their shapes; the port's output
    has torch's shapes and dtypes and loads into the notebook's model with strict=True; the parameter counts
    agree.

    The Flax model here is built without running its initialisers (see ``flax_twin``), which leaves its keys in
    alphabetical order; ``test_init_distribution_matches_torch`` checks on genuinely initialised models that
    ``torch_keys(flax_model) == list(torch_model.state_dict().keys())``, order included."""
    t, f = torch_model(case), flax_twin(case, jnp.float32)
    torch_sd = t.state_dict()
    assert sorted(fr.torch_keys(f)) == sorted(torch_sd)
    assert torch_shapes(f) == {key: tuple(value.shape) for key, value in torch_sd.items()}

    ported = fr.to_torch_state_dict(f)
    assert sorted(ported) == sorted(torch_sd)
    for key, value in torch_sd.items():
        assert tuple(ported[key].shape) == tuple(value.shape), key
        assert ported[key].dtype == value.dtype, key
    result = t.load_state_dict(ported, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    for key, value in t.state_dict().items():  # the load really copied the Flax values in
        assert np.array_equal(value.cpu().numpy(), ported[key].numpy()), key

    assert flax_param_count(f) == torch_param_count(t)


@pytest.mark.parametrize(("num_blocks", "expected"), [([1, 1, 1, 1], 4_729_418), ([3, 3, 3, 3], 17_270_858)],
                         ids=["shallow", "deep"])
def test_plainnet_parameter_counts_are_the_notebooks(num_blocks, expected):
    """Notebook 004 prints 4,729,418 (shallow PlainNet) and 17,270,858 (deep): both frameworks have them."""
    torch.manual_seed(0)
    assert torch_param_count(tr.PlainNet(tr.PlainBlock, num_blocks)) == expected
    model = nnx.eval_shape(lambda: fr.PlainNet(fr.PlainBlock, num_blocks, rngs=nnx.Rngs(0)))
    assert flax_param_count(model) == expected
