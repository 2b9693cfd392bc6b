"""Same initial distributions: Flax's init (nnx.Rngs(seed)) and torch's (torch.manual_seed(seed)), tensor by tensor.

The two frameworks' random streams differ, so values cannot match; their distributions must. For every
tensor of every model the values of ``SEEDS`` inits are pooled per framework (at most ``PER_SEED`` values of
each init, drawn at random positions, so big tensors stay cheap but every tensor is tested) and compared:

- mean, variance and kurtosis: the two estimates may differ by at most ``Z_MAX`` = 5 standard errors of their
  difference, the standard errors computed from the samples themselves (mean: s^2/n; variance: (m4 - s^4)/n;
  kurtosis: the standard deviation of the standardised z^4 over sqrt(n)). Kurtosis is what separates a normal
  (3) from a truncated normal (2.37) or a uniform (1.8) of the same variance.
- a two-sample Kolmogorov-Smirnov test (``scipy.stats.ks_2samp``) must give p > ``KS_P_MIN`` = 1e-5.

False alarms: about 250 random tensors are tested; a true match fails a 5-SE bound with probability 5.7e-7
per check and the KS test with 1e-5 per tensor, so the whole file raises a false alarm with probability
about 250 * (3 * 5.7e-7 + 1e-5) ~ 0.3%. The seeds are fixed, so the outcome is deterministic, never flaky.
Tensors that torch initialises the same for every seed (BatchNorm weight 1, bias 0, running statistics 0/1,
num_batches_tracked 0) are compared exactly. The ``test_comparison_*`` tests show that the same comparison
rejects lecun_normal, a truncated normal, a uniform of the right variance, the wrong fan mode and Flax's zero
bias, and accepts the right initialisers.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import numpy as np
import pytest
import torch
from flax import nnx
from scipy import stats

import flax_resnet as fr
from flax_resnet.layers import kaiming_normal
from parity_tests.helpers import CASE_PARAMS, flax_torch_state, state_arrays

SEEDS = (0, 1, 2)
PER_SEED = 20_000
Z_MAX = 5.0
KS_P_MIN = 1e-5


@dataclass(frozen=True)
class Comparison:
    """How far apart two samples are: z-scores of the moment differences and the KS p-value."""

    n: tuple[int, int]
    mean_z: float
    var_z: float
    kurtosis_z: float
    ks_p: float

    @property
    def same(self) -> bool:
        return max(abs(self.mean_z), abs(self.var_z), abs(self.kurtosis_z)) <= Z_MAX and self.ks_p > KS_P_MIN

    def __str__(self) -> str:
        return (f"n={self.n} z(mean)={self.mean_z:.2f} z(var)={self.var_z:.2f} "
                f"z(kurtosis)={self.kurtosis_z:.2f} KS p={self.ks_p:.2g}")


def _moments(x: np.ndarray):
    """Mean, variance, kurtosis and the squared standard error of each."""
    n = x.size
    mean = x.mean()
    d = x - mean
    var = d.var()
    m4 = np.mean(d**4)
    z4 = d**4 / var**2 if var > 0 else np.zeros_like(d)
    return (mean, var / n), (var, max(m4 - var**2, 0.0) / n), (z4.mean(), z4.var() / n)


def _z(a: tuple[float, float], b: tuple[float, float]) -> float:
    (va, sa), (vb, sb) = a, b
    se = np.sqrt(sa + sb)
    if se == 0:
        return 0.0 if va == vb else np.inf
    return float((va - vb) / se)


def compare_samples(flax_values: np.ndarray, torch_values: np.ndarray) -> Comparison:
    """Compare two samples of initial values (see the module docstring for the criteria)."""
    a = np.asarray(flax_values, np.float64).ravel()
    b = np.asarray(torch_values, np.float64).ravel()
    ma, mb = _moments(a), _moments(b)
    return Comparison((a.size, b.size), _z(ma[0], mb[0]), _z(ma[1], mb[1]), _z(ma[2], mb[2]),
                      float(stats.ks_2samp(a, b).pvalue))


def _sample(values: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    flat = values.ravel()
    return flat if flat.size <= PER_SEED else rng.choice(flat, PER_SEED, replace=False)


def _pooled(states: list[dict[str, np.ndarray]], key: str) -> np.ndarray:
    rng = np.random.default_rng(0)
    return np.concatenate([_sample(state[key], rng) for state in states])


@pytest.mark.parametrize("case", CASE_PARAMS)
def test_init_distribution_matches_torch(case):
    """Every tensor: random ones from the same distribution (moments within 5 SE, KS p > 1e-5), constant ones
    equal. Also: a genuine Flax init names its tensors exactly as torch does, in torch's order."""
    flax_states, torch_states = [], []
    for seed in SEEDS:
        model = case.flax(nnx.Rngs(seed))
        torch.manual_seed(seed)
        reference = case.torch()
        assert fr.torch_keys(model) == list(reference.state_dict())
        flax_states.append(flax_torch_state(model))
        torch_states.append(state_arrays(reference.state_dict()))

    failures = []
    for key in torch_states[0]:
        flax_seeds = [state[key] for state in flax_states]
        torch_seeds = [state[key] for state in torch_states]
        if all(np.array_equal(t, torch_seeds[0]) for t in torch_seeds):
            for f, t in zip(flax_seeds, torch_seeds, strict=True):  # not random: BN 1/0, running stats, counter
                if not (np.array_equal(f, t) and f.dtype == t.dtype):
                    failures.append(f"{key}: constant {t.ravel()[:3]} ({t.dtype}), Flax has {f.ravel()[:3]}")
                    break
            continue
        result = compare_samples(_pooled(flax_states, key), _pooled(torch_states, key))
        if not result.same:
            failures.append(f"{key}: {result}")
    assert not failures, "initial distributions differ:\n" + "\n".join(failures)


# ---------------------------------------------------------------------------------------- negative controls
def _conv_weights_flax(kernel_init, seed: int, in_channels: int = 64, out_channels: int = 128) -> np.ndarray:
    conv = fr.layers.Conv2d(in_channels, out_channels, 3, padding=1, bias=True, rngs=nnx.Rngs(seed),
                            kernel_init=kernel_init)
    return fr.to_torch_state_dict(conv)


def _conv_weights_torch(he: bool, seed: int, in_channels: int = 64, out_channels: int = 128):
    torch.manual_seed(seed)
    conv = torch.nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=True)
    if he:
        torch.nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    return conv.state_dict()


WRONG_FOR_HE = {  # the ResNet's convs: kaiming_normal(fan_out, relu), untruncated
    # for 64 -> 128 channels lecun_normal's 1/fan_in equals 2/fan_out: only the truncation gives it away
    "lecun_normal": jax.nn.initializers.lecun_normal(),
    "he_truncated_normal": jax.nn.initializers.variance_scaling(2.0, "fan_out", "truncated_normal"),
    "he_uniform": jax.nn.initializers.variance_scaling(2.0, "fan_out", "uniform"),
    "he_fan_in": kaiming_normal("fan_in"),
    "torch_default": None,
}
WRONG_FOR_DEFAULT = {  # torch's default: U(+-1/sqrt(fan_in))
    "lecun_normal": jax.nn.initializers.lecun_normal(),  # Flax's default
    "normal_same_variance": jax.nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "normal"),
    "fan_out": jax.nn.initializers.variance_scaling(1.0 / 3.0, "fan_out", "uniform"),
}


def _compare_conv(kernel_init, he: bool, key: str = "weight") -> Comparison:
    flax_states = [_conv_weights_flax(kernel_init, seed) for seed in SEEDS]
    torch_states = [_conv_weights_torch(he, seed) for seed in SEEDS]
    return compare_samples(_pooled([state_arrays(s) for s in flax_states], key),
                           _pooled([state_arrays(s) for s in torch_states], key))


def test_comparison_accepts_the_right_initialisers():
    """Positive controls: the layers' own initialisers pass (64 -> 128 channels, so fan_in != fan_out)."""
    assert _compare_conv(kaiming_normal("fan_out"), he=True).same
    assert _compare_conv(None, he=False).same
    assert _compare_conv(None, he=False, key="bias").same


@pytest.mark.parametrize("name", list(WRONG_FOR_HE))
def test_comparison_detects_wrong_initialisers_for_he(name):
    result = _compare_conv(WRONG_FOR_HE[name], he=True)
    assert not result.same, f"{name} passed as kaiming_normal(fan_out): {result}"


@pytest.mark.parametrize("name", list(WRONG_FOR_DEFAULT))
def test_comparison_detects_wrong_initialisers_for_torch_default(name):
    result = _compare_conv(WRONG_FOR_DEFAULT[name], he=False)
    assert not result.same, f"{name} passed as torch's default init: {result}"


def test_comparison_detects_flax_zero_bias():
    flax_states = []
    for seed in SEEDS:
        conv = nnx.Conv(64, 128, (3, 3), padding=((1, 1), (1, 1)), rngs=nnx.Rngs(seed))  # stock: zero bias
        flax_states.append(state_arrays(fr.to_torch_state_dict(conv)))
    torch_states = [state_arrays(_conv_weights_torch(False, seed)) for seed in SEEDS]
    assert not compare_samples(_pooled(flax_states, "bias"), _pooled(torch_states, "bias")).same
