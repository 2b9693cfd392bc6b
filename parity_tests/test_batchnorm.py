"""Same BatchNorm statistics: torch's momentum and its unbiased running variance, on tiny batches.

(Whole models: ``test_forward.py`` checks every running statistic after its train-mode forwards.)

The stock ``nnx.BatchNorm`` is run through the same comparison as negative controls: with torch's momentum
number (0.1) it weights the wrong side, and even with the right one (0.9) it stores the biased batch variance,
so the checks below fail on it. They would fail the same way if ``BatchNorm2d`` lost either rule.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import flax_resnet as fr
from parity_tests.helpers import (
    F64_TOL,
    TORCH_DEVICE,
    assert_close,
    flax_forward,
    numpy,
    rel_err,
    torch_forward,
)

CHANNELS = 4


def _batches(shape: tuple[int, ...], count: int = 5) -> list[np.ndarray]:
    """Float64 NCHW batches whose mean and spread move from one to the next."""
    rng = np.random.default_rng(42)
    return [rng.standard_normal(shape) * (0.5 + i) + rng.standard_normal((1, shape[1], 1, 1)) * i
            for i in range(count)]


def _torch_bn() -> torch.nn.BatchNorm2d:
    bn = torch.nn.BatchNorm2d(CHANNELS).double().to(TORCH_DEVICE)
    with torch.no_grad():
        bn.weight.copy_(torch.linspace(0.5, 1.5, CHANNELS))
        bn.bias.copy_(torch.linspace(-0.2, 0.3, CHANNELS))
    return bn


def _running_stats_error(flax_bn: nnx.BatchNorm, shape: tuple[int, ...]) -> float:
    """Train-mode forwards through ``flax_bn`` and torch's BatchNorm2d on the same batches; the largest
    relative error of the outputs and of the running mean and variance over all steps, then eval mode."""
    torch_bn = _torch_bn()
    flax_bn.scale[...] = jnp.asarray(numpy(torch_bn.weight), jnp.float64)
    flax_bn.bias[...] = jnp.asarray(numpy(torch_bn.bias), jnp.float64)
    worst = 0.0
    for x in _batches(shape):
        worst = max(worst, rel_err(flax_forward(flax_bn, x), torch_forward(torch_bn, x)),
                    rel_err(flax_bn.mean[...], torch_bn.running_mean), rel_err(flax_bn.var[...], torch_bn.running_var))
    torch_bn.eval()
    flax_bn.eval()
    x = _batches(shape, 1)[0]
    return max(worst, rel_err(flax_forward(flax_bn, x), torch_forward(torch_bn, x)))


SMALL_SHAPES = [pytest.param((2, CHANNELS, 4, 4), id="n=2x4x4"), pytest.param((2, CHANNELS, 1, 1), id="n=2"),
                pytest.param((8, CHANNELS, 8, 8), id="n=8x8x8")]


@pytest.mark.parametrize("shape", SMALL_SHAPES)
def test_batchnorm2d_matches_torch_running_stats(shape):
    """Five train-mode forwards then eval: outputs, running_mean and running_var within 1e-12 (float64) of
    torch's, num_batches_tracked equal. n=2 is the extreme case of the unbiased factor n/(n-1) = 2."""
    bn = fr.cast_floating(fr.layers.BatchNorm2d(CHANNELS, rngs=nnx.Rngs(0)), jnp.float64)
    assert _running_stats_error(bn, shape) <= F64_TOL
    assert int(bn.num_batches_tracked[...]) == 5


@pytest.mark.parametrize("shape", SMALL_SHAPES)
def test_stock_flax_batchnorm_fails_the_same_check(shape):
    """Negative controls. torch's momentum number in Flax (momentum=0.1 weights the old average): wrong.
    The right Flax momentum (0.9) but Flax's biased running variance: still wrong (ratio n/(n-1))."""
    naive = nnx.BatchNorm(CHANNELS, momentum=0.1, epsilon=1e-5, use_running_average=False, rngs=nnx.Rngs(0))
    assert _running_stats_error(fr.cast_floating(naive, jnp.float64), shape) > 1e3 * F64_TOL
    biased = nnx.BatchNorm(CHANNELS, momentum=0.9, epsilon=1e-5, use_running_average=False, rngs=nnx.Rngs(0))
    biased = fr.cast_floating(biased, jnp.float64)
    assert _running_stats_error(biased, shape) > 1e3 * F64_TOL


def test_running_variance_is_the_unbiased_batch_variance():
    """One step from (mean 0, var 1): running_var = 0.9 + 0.1 * var(x, ddof=1) exactly as torch stores it."""
    x = _batches((2, CHANNELS, 4, 4))[3]
    bn = fr.cast_floating(fr.layers.BatchNorm2d(CHANNELS, rngs=nnx.Rngs(0)), jnp.float64)
    flax_forward(bn, x)
    unbiased = x.transpose(1, 0, 2, 3).reshape(CHANNELS, -1).var(axis=1, ddof=1)
    assert_close(bn.var[...], 0.9 + 0.1 * unbiased, F64_TOL, "running_var")
    assert_close(bn.mean[...], 0.1 * x.mean(axis=(0, 2, 3)), F64_TOL, "running_mean")
