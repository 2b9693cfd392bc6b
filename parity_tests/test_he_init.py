"""Activation variances layer by layer: the notebook's verify_he_init (torch) vs activation_variances (Flax).

Exact: the same weights (ported) and the same input give the same variances (float64, 1e-12), same names.
In distribution: independent inits and inputs (a few seeds each) give variances that agree within their spread.
And the property the notebook plots: He init keeps SimpleNet's activation variance from vanishing.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from scipy import stats

from flax_resnet.he_init import activation_variances
from flax_resnet.port import named_layers
from parity_tests.helpers import (
    CASES_BY_ID,
    F64_TOL,
    TORCH_DEVICE,
    flax_torch_state,
    ported_pair,
    rel_err,
    state_arrays,
    to_nhwc,
)
from torch_ref.he_init import verify_he_init

BATCH = {"SimpleNet": 16, "ResNet18": 4}


@pytest.mark.parametrize("name", [*BATCH, "SimpleResNet"])
def test_activation_variances_equal_verify_he_init(name):
    """Same weights, same unit-variance input, train mode as in the notebook: same layer names in the same
    order (the order the layers ran: SimpleResNet's shortcut runs before conv1), variances within 1e-12
    (float64); the BatchNorm statistics that forward pass moved agree too."""
    case = CASES_BY_ID[name]
    t, f = ported_pair(case, dtype="float64", perturb=False)
    x = np.random.default_rng(0).standard_normal((BATCH.get(name, 4), 3, 32, 32))
    var_t, names_t = verify_he_init(t, x=torch.from_numpy(x).to(TORCH_DEVICE))
    var_f, names_f = activation_variances(f, jnp.asarray(to_nhwc(x)))
    assert names_f == names_t
    layers = [n for n, m in t.named_modules() if isinstance(m, torch.nn.Conv2d | torch.nn.Linear)]
    assert sorted(names_t) == sorted(layers)
    assert np.max(np.abs(np.asarray(var_f) / np.asarray(var_t) - 1)) <= F64_TOL  # layer by layer
    flax_state, torch_state = flax_torch_state(f), state_arrays(t.state_dict())
    for key, value in torch_state.items():
        assert rel_err(flax_state[key], value) <= F64_TOL, key


def test_a_model_that_is_one_layer_is_measured_as_torch_measures_it():
    """A lone Conv2d / Linear: torch's hook sits on the model itself (name ''); the Flax side has no parent to
    put a recorder in and measures the model's own output instead."""
    from flax_resnet.dtypes import cast_floating
    from flax_resnet.layers import Conv2d, Linear
    from flax_resnet.port import load_torch_state_dict

    rngs = nnx.Rngs(0)
    x = np.random.default_rng(1).standard_normal((4, 3, 8, 8))
    for t, f, flax_x in (
        (torch.nn.Conv2d(3, 5, 3, padding=1).double(), Conv2d(3, 5, 3, padding=1, rngs=rngs), to_nhwc(x)),
        (torch.nn.Linear(3 * 8 * 8, 7).double(), Linear(3 * 8 * 8, 7, rngs=rngs), x.reshape(4, -1)),
    ):
        f = cast_floating(f, jnp.float64)
        load_torch_state_dict(f, t.state_dict())
        torch_x = torch.from_numpy(x if isinstance(t, torch.nn.Conv2d) else x.reshape(4, -1))
        var_t, names_t = verify_he_init(t, x=torch_x)
        var_f, names_f = activation_variances(f, jnp.asarray(flax_x))
        assert names_f == names_t == [""]
        assert abs(var_f[0] / var_t[0] - 1) <= F64_TOL


def test_activation_variances_leaves_the_model_as_it_was():
    """The recording wrappers are gone afterwards, also when the forward pass raises; eval mode changes
    nothing at all."""
    _, model = ported_pair(CASES_BY_ID["SimpleResNet"], dtype="float32")
    model.eval()
    graph, state = nnx.graphdef(model), jax.tree.map(np.array, nnx.state(model))
    variances, names = activation_variances(model, jax.random.normal(jax.random.key(0), (2, 32, 32, 3)))
    assert sorted(names) == sorted(n for n, m in named_layers(model) if isinstance(m, nnx.Conv | nnx.Linear))
    assert all(v > 0 for v in variances)
    with pytest.raises(ValueError, match="NHWC"):
        activation_variances(model, jnp.zeros((2, 3, 32, 32)))  # NCHW by mistake
    assert nnx.graphdef(model) == graph
    after = nnx.state(model)
    for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(state), strict=True):
        assert np.array_equal(np.asarray(a), b)


# ------------------------------------------------------------------------------------------- in distribution
SEEDS = range(4)
T_TEST_P_MIN = 1e-4  # Welch's t-test per layer; 26 layers -> false-alarm probability ~0.3% (fixed seeds)


def _torch_runs(name: str, batch: int, dtype=torch.float32) -> np.ndarray:
    runs = []
    for seed in SEEDS:
        torch.manual_seed(seed)
        runs.append(verify_he_init(CASES_BY_ID[name].torch().to(dtype), (batch, 3, 32, 32))[0])
    return np.array(runs)


def _flax_runs(name: str, batch: int, reinit=None) -> np.ndarray:
    runs = []
    for seed in SEEDS:
        model = CASES_BY_ID[name].flax(nnx.Rngs(seed))
        if reinit is not None:
            reinit(model, seed)
        x = jax.random.normal(jax.random.key(1000 + seed), (batch, 32, 32, 3))
        runs.append(activation_variances(model, x)[0])
    return np.array(runs)


def _disagreeing_layers(flax_runs: np.ndarray, torch_runs: np.ndarray) -> list[tuple[int, float]]:
    """Layers whose log-variances differ between the frameworks (Welch's t-test over the seeds)."""
    p = stats.ttest_ind(np.log(flax_runs), np.log(torch_runs), equal_var=False, axis=0).pvalue
    return [(i, float(pi)) for i, pi in enumerate(p) if not pi > T_TEST_P_MIN]


@pytest.mark.parametrize("name", list(BATCH))
def test_activation_variances_agree_in_distribution(name):
    """Independent inits and inputs, 4 seeds per framework: per layer, Welch's t-test on the log variances
    finds no difference (p > 1e-4): Flax's He init propagates variance as torch's does."""
    flax_runs, torch_runs = _flax_runs(name, BATCH[name]), _torch_runs(name, BATCH[name])
    assert flax_runs.shape == torch_runs.shape
    assert not _disagreeing_layers(flax_runs, torch_runs)


def test_distribution_check_detects_a_wrong_init():
    """Negative control: SimpleNet's convs re-drawn with lecun_normal (1/fan_in instead of 2/fan_out)."""

    def lecun(model: nnx.Module, seed: int) -> None:
        key = jax.random.key(seed)
        for i, conv in enumerate((model.conv1, model.conv2, model.conv3, model.conv4)):
            kernel = conv.kernel
            kernel[...] = jax.nn.initializers.lecun_normal()(jax.random.fold_in(key, i), kernel.shape, kernel.dtype)

    flax_runs = _flax_runs("SimpleNet", BATCH["SimpleNet"], lecun)
    torch_runs = _torch_runs("SimpleNet", BATCH["SimpleNet"])
    assert _disagreeing_layers(flax_runs, torch_runs)


def _successive_ratios(variances: list[float]) -> np.ndarray:
    v = np.asarray(variances)
    return v[1:] / v[:-1]


def test_he_init_keeps_simplenet_variance_stable():
    """He init neither explodes nor vanishes the signal: from each conv/linear layer to the next the output
    variance changes by a factor within [0.25, 4], in both frameworks, for every seed. (The input-to-conv1
    step is the exception by design: fan_out mode on a 3 -> 64 conv gives Var = 27 * 2/576 ~ 0.094 plus the
    bias' 1/81 ~ 0.012, slightly less with the zero padding: ~0.10, checked here within 20%.)
    Negative control: torch's default init (Var(w) = 1/(3 fan_in)) shrinks it ~6x per layer and fails."""
    for runs in (_flax_runs("SimpleNet", BATCH["SimpleNet"]), _torch_runs("SimpleNet", BATCH["SimpleNet"])):
        for variances in runs:
            ratios = _successive_ratios(variances)
            assert np.all((ratios >= 0.25) & (ratios <= 4)), ratios
            assert abs(variances[0] / 0.102 - 1) < 0.2, variances[0]

    torch.manual_seed(0)
    default = CASES_BY_ID["SimpleNet"].torch()
    for module in default.modules():
        if isinstance(module, torch.nn.Conv2d | torch.nn.Linear):
            module.reset_parameters()  # torch's default init
    ratios = _successive_ratios(verify_he_init(default)[0])
    assert not np.all((ratios >= 0.25) & (ratios <= 4)), ratios
