"""The notebooks' own shape checks, run on the Flax modules (NHWC: the notebooks' (N, C, H, W) become (N, H, W, C)).

Each check builds the module and runs it on a batch of the notebook's shape under ``jax.eval_shape``: JAX traces
construction and forward pass with the shape rules it also executes with, without spending seconds compiling
the initialisers and convolutions of channel counts no other test uses (the forward, gradient and BatchNorm
tests run the same layers for real).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

import flax_resnet as fr
from flax_resnet.layers import BatchNorm2d, Conv2d


def _output_shape(build: Callable[[nnx.Rngs], nnx.Module], *nchw: int) -> tuple[int, ...]:
    """Shape of ``build(rngs)(x)`` for x of the notebook's NCHW shape, fed as NHWC."""
    n, c, h, w = nchw
    return jax.eval_shape(lambda: build(nnx.Rngs(0))(jnp.zeros((n, h, w, c)))).shape


def _nhwc(*nchw: int) -> tuple[int, ...]:
    n, c, h, w = nchw
    return (n, h, w, c)


def _downsample(cin: int, cout: int, stride: int, rngs: nnx.Rngs) -> nnx.Sequential:
    return nnx.Sequential(Conv2d(cin, cout, kernel_size=1, stride=stride, bias=False, rngs=rngs),
                          BatchNorm2d(cout, rngs=rngs))


def test_basic_block():
    """Notebook 004's test_basic_block: same dimensions; with downsampling."""
    assert _output_shape(lambda r: fr.BasicBlock(64, 64, rngs=r), 2, 64, 32, 32) == _nhwc(2, 64, 32, 32)
    block = lambda r: fr.BasicBlock(64, 128, stride=2, downsample=_downsample(64, 128, 2, r), rngs=r)  # noqa: E731
    assert _output_shape(block, 2, 64, 32, 32) == _nhwc(2, 128, 16, 16)


def test_bottleneck():
    """Notebook 004's test_bottleneck: with downsample; with stride 2."""
    block = lambda r: fr.BottleneckBlock(64, 64, stride=1, downsample=_downsample(64, 256, 1, r), rngs=r)  # noqa: E731
    assert _output_shape(block, 2, 64, 32, 32) == _nhwc(2, 256, 32, 32)
    block = lambda r: fr.BottleneckBlock(256, 128, stride=2, downsample=_downsample(256, 512, 2, r), rngs=r)  # noqa: E731
    assert _output_shape(block, 2, 256, 32, 32) == _nhwc(2, 512, 16, 16)


def test_residual_block():
    """Notebook 000's three ResidualBlock tests: identity shortcut, channel change, stride + channels."""
    assert _output_shape(lambda r: fr.ResidualBlock(16, 16, stride=1, rngs=r), 2, 16, 32, 32) == _nhwc(2, 16, 32, 32)
    assert _output_shape(lambda r: fr.ResidualBlock(16, 32, stride=1, rngs=r), 2, 16, 32, 32) == _nhwc(2, 32, 32, 32)
    assert _output_shape(lambda r: fr.ResidualBlock(16, 32, stride=2, rngs=r), 2, 16, 32, 32) == _nhwc(2, 32, 16, 16)


def test_simple_resnet_and_plain_deep_cnn():
    """Notebook 000: SimpleResNet(n_blocks=3) and PlainDeepCNN(n_blocks=3) map (2, 3, 32, 32) to (2, 10)."""
    assert _output_shape(lambda r: fr.SimpleResNet(n_blocks=3, rngs=r), 2, 3, 32, 32) == (2, 10)
    assert _output_shape(lambda r: fr.PlainDeepCNN(n_blocks=3, rngs=r), 2, 3, 32, 32) == (2, 10)
