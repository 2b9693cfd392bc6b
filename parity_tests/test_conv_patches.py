"""float64 convolutions as image patches + one matrix product on the CPU (``flax_resnet.conv_patches``): the same
numbers as ``lax.conv`` and as torch, outputs and gradients, for every kernel size, stride, padding and bias the
notebooks use; and the path is taken only where it is meant to be (float64 on the CPU), so that float32 and
GPUs keep XLA's convolution.

Tolerances: the suite's float64 ones (``F64_TOL`` 1e-12 for outputs, ``GRAD_TOL`` 1e-10 for gradients). A
convolution here sums at most 3 * 3 * 6 = 54 products, so the two summation orders differ by a few units of
1.1e-16 (measured: 0 to 4e-16 relative); a wrong offset, stride or kernel order is off by O(1).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import flax_resnet as fr
from flax_resnet import conv_patches
from flax_resnet.layers import Conv2d
from flax_resnet.training import cpu
from parity_tests.helpers import F64_TOL, GRAD_TOL, TORCH_DEVICE, assert_close, numpy, to_nchw, to_nhwc

NHWC = ("NHWC", "HWIO", "NHWC")
CPU = jax.default_backend() == "cpu"


@pytest.fixture
def patch_calls(monkeypatch) -> list[tuple]:
    """Records every call of ``conv_as_patches``: proves the fast path ran, not ``lax.conv`` by a silent fallback."""
    calls: list[tuple] = []
    original = conv_patches.conv_as_patches

    def spy(x, kernel, **kwargs):
        calls.append((x.shape, kernel.shape))
        return original(x, kernel, **kwargs)

    monkeypatch.setattr(conv_patches, "conv_as_patches", spy)
    return calls


def _pair(k: int, stride: int, padding: int, bias: bool) -> tuple[torch.nn.Conv2d, Conv2d]:
    torch.manual_seed(0)
    t = torch.nn.Conv2d(4, 6, k, stride=stride, padding=padding, bias=bias).double().to(TORCH_DEVICE)
    f = fr.cast_floating(Conv2d(4, 6, k, stride=stride, padding=padding, bias=bias, rngs=nnx.Rngs(0)), jnp.float64)
    fr.load_torch_state_dict(f, t.state_dict())
    return t, f


def _lax_conv(module: Conv2d, x: jax.Array) -> jax.Array:
    """The same layer through ``lax.conv_general_dilated``: what ``nnx.Conv`` computes without the patches path."""
    y = jax.lax.conv_general_dilated(x, module.kernel[...], module.strides, module.padding, dimension_numbers=NHWC)
    return y if module.bias is None else y + module.bias[...]


def _loss(y: jax.Array, target: jax.Array) -> jax.Array:
    return jnp.sum(y * target)  # a random cotangent: every output element's gradient differs


@pytest.mark.skipif(not CPU, reason="the patches path is the CPU's; elsewhere lax.conv runs (tested below)")
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("padding", [0, 1])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("k", [1, 3])
def test_float64_conv_as_patches_equals_lax_conv_and_torch(k, stride, padding, bias, patch_calls):
    t, f = _pair(k, stride, padding, bias)
    rng = np.random.default_rng(k * 100 + stride * 10 + padding)
    x_nchw = rng.standard_normal((2, 4, 8, 8))
    x = jnp.asarray(to_nhwc(x_nchw))

    # torch: output and gradients of sum(y * target)
    xt = torch.tensor(x_nchw, device=TORCH_DEVICE, requires_grad=True)
    yt = t(xt)
    target_nchw = rng.standard_normal(tuple(yt.shape))
    (yt * torch.tensor(target_nchw, device=TORCH_DEVICE)).sum().backward()
    target = jnp.asarray(to_nhwc(target_nchw))

    def loss(module, x):
        return _loss(module(x), target)

    def lax_loss(module, x):
        return _loss(_lax_conv(module, x), target)

    y = f(x)  # eagerly, as the parity suite runs models
    assert len(patch_calls) == 1, "the float64 convolution did not take the patches path"
    (g_params, g_x) = nnx.grad(loss, argnums=(0, 1))(f, x)
    (l_params, l_x) = nnx.grad(lax_loss, argnums=(0, 1))(f, x)
    # jitted, as the training step runs it: the compiled program must hold no convolution at all
    step = jax.jit(lambda kernel, x: jax.grad(lambda kernel, x: _loss(conv_patches.conv_general_dilated(
        x, kernel, f.strides, f.padding, dimension_numbers=jax.lax.conv_dimension_numbers(
            x.shape, kernel.shape, NHWC)), target), argnums=(0, 1))(kernel, x))
    hlo = step.lower(f.kernel[...], x).compile().as_text()
    assert "convolution(" not in hlo and " dot(" in hlo
    jit_g_kernel, jit_g_x = step(f.kernel[...], x)

    assert_close(y, _lax_conv(f, x), F64_TOL, "output vs lax.conv")
    assert_close(to_nchw(numpy(y)), yt, F64_TOL, "output vs torch")
    assert_close(g_x, l_x, GRAD_TOL, "input gradient vs lax.conv")
    assert_close(jit_g_x, l_x, GRAD_TOL, "input gradient (jit) vs lax.conv")
    assert_close(to_nchw(numpy(g_x)), xt.grad, GRAD_TOL, "input gradient vs torch")
    assert_close(g_params["kernel"][...], l_params["kernel"][...], GRAD_TOL, "kernel gradient vs lax.conv")
    assert_close(jit_g_kernel, l_params["kernel"][...], GRAD_TOL, "kernel gradient (jit) vs lax.conv")
    assert_close(numpy(g_params["kernel"][...]).transpose(3, 2, 0, 1), t.weight.grad, GRAD_TOL,
                 "kernel gradient vs torch")
    if bias:
        assert_close(g_params["bias"][...], t.bias.grad, GRAD_TOL, "bias gradient vs torch")


def test_float32_other_platforms_and_other_arguments_keep_lax_conv(patch_calls):
    """float32 stays on XLA's convolution (faster than patches there: BENCHMARKS.md), float64 lowered for a GPU
    too, and so does any argument the patches do not cover (feature groups, input dilation)."""
    x64 = jnp.asarray(np.random.default_rng(0).standard_normal((2, 8, 8, 4)))
    k64 = jnp.asarray(np.random.default_rng(1).standard_normal((3, 3, 4, 6)))
    dn = jax.lax.conv_dimension_numbers(x64.shape, k64.shape, NHWC)

    def conv(x, k, **kw):
        return conv_patches.conv_general_dilated(x, k, (2, 2), ((1, 1), (1, 1)), dimension_numbers=dn, **kw)

    f32 = jax.jit(conv).lower(x64.astype(jnp.float32), k64.astype(jnp.float32)).as_text()
    assert "convolution" in f32 and "dot_general" not in f32
    gpu = jax.export.export(jax.jit(conv), platforms=["cuda"])(x64, k64).mlir_module()
    assert "convolution" in gpu and "dot_general" not in gpu
    if CPU:
        cpu64 = jax.jit(conv).lower(x64, k64).compile().as_text()
        assert "convolution(" not in cpu64
    grouped = conv_patches.uses_patches(x64, k64[:, :, :2], (1, 1), "SAME", dimension_numbers=dn,
                                        feature_group_count=2)
    dilated = conv_patches.uses_patches(x64, k64, (1, 1), "SAME", lhs_dilation=(2, 2), dimension_numbers=dn)
    assert conv_patches.uses_patches(x64, k64, (1, 1), "SAME", dimension_numbers=dn)
    assert not grouped and not dilated
    patch_calls.clear()
    conv(x64.astype(jnp.float32), k64.astype(jnp.float32))
    assert patch_calls == []


@pytest.mark.skipif(not CPU, reason="the patches path is the CPU's")
def test_materialized_input_conv_takes_the_patches_path(patch_calls):
    """The runners' CPU subclass (``training.cpu.MaterializedInputConv2d``) calls ``layers.Conv2d``'s convolution:
    same numbers, through the patches."""
    _, f = _pair(3, 2, 1, True)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 8, 8, 4)))
    want = f(x)
    materialized = nnx.clone(f)
    cpu.materialize_conv_inputs(materialized)
    assert type(materialized) is cpu.MaterializedInputConv2d
    patch_calls.clear()
    np.testing.assert_array_equal(np.asarray(materialized(x)), np.asarray(want))
    assert len(patch_calls) == 1
