"""Layer-level rules of the port, each beside a negative control showing the check fails when the rule is broken.

padding: torch's ``padding=1`` at stride 2 is symmetric, Flax's 'SAME' is not; conv kernels are OIHW in torch
and HWIO in Flax, linear weights (out, in) vs (in, out); SimpleNet flattens its feature map in torch's C, H, W
order before ``fc``.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import flax_resnet as fr
from flax_resnet.layers import Conv2d, Linear
from parity_tests.helpers import (
    CASES_BY_ID,
    F64_TOL,
    TORCH_DEVICE,
    assert_close,
    flax_forward,
    numpy,
    ported_pair,
    rel_err,
    to_nchw,
    to_nhwc,
    torch_forward,
)


def _torch_conv(cin: int, cout: int, k: int, stride: int, padding: int, bias: bool) -> torch.nn.Conv2d:
    torch.manual_seed(0)
    return torch.nn.Conv2d(cin, cout, k, stride=stride, padding=padding, bias=bias).double().to(TORCH_DEVICE)


def _ported_conv(conv: torch.nn.Conv2d, **kwargs) -> Conv2d:
    flax_conv = fr.cast_floating(Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size[0],
                                        stride=conv.stride[0], padding=conv.padding[0], bias=conv.bias is not None,
                                        rngs=nnx.Rngs(0), **kwargs), jnp.float64)
    fr.load_torch_state_dict(flax_conv, conv.state_dict())
    return flax_conv


@pytest.mark.parametrize("size", [8, 7], ids=["even", "odd"])
def test_conv_stride2_padding_is_torchs(size):
    """3x3, stride 2, padding 1 on 8x8 and 7x7 inputs: the ported conv computes torch's output (1e-12);
    nnx.Conv with padding='SAME' (pads (0, 1) at even sizes) does not."""
    conv = _torch_conv(3, 5, 3, stride=2, padding=1, bias=True)
    flax_conv = _ported_conv(conv)
    assert flax_conv.padding == ((1, 1), (1, 1))
    x = np.random.default_rng(0).standard_normal((2, 3, size, size))
    want = torch_forward(conv, x)
    assert_close(flax_forward(flax_conv, x), want, F64_TOL, "explicit padding")

    same = nnx.Conv(3, 5, (3, 3), strides=(2, 2), padding="SAME", param_dtype=jnp.float64, rngs=nnx.Rngs(0))
    same.kernel[...] = flax_conv.kernel[...]
    same.bias[...] = flax_conv.bias[...]
    got = flax_forward(same, x)
    if size % 2 == 0:
        assert got.shape == want.shape and rel_err(got, want) > 0.1
    else:  # at odd sizes SAME happens to pad (1, 1) too
        assert_close(got, want, F64_TOL, "SAME at an odd size")


@pytest.mark.parametrize(("cin", "cout", "k", "stride", "padding"), [(3, 5, 3, 1, 1), (4, 6, 1, 2, 0), (2, 3, 5, 1, 2)])
def test_conv_kernel_layout(cin, cout, k, stride, padding):
    """The port stores torch's OIHW weight as HWIO (transpose (2, 3, 1, 0)) and back; the ported conv computes
    torch's output. Control: the kernel's two spatial axes swapped (same shape) changes the output."""
    conv = _torch_conv(cin, cout, k, stride, padding, bias=True)
    flax_conv = _ported_conv(conv)
    weight = numpy(conv.weight)
    assert np.array_equal(np.asarray(flax_conv.kernel[...]), weight.transpose(2, 3, 1, 0))
    assert np.array_equal(numpy(fr.to_torch_state_dict(flax_conv)["weight"]), weight)
    x = np.random.default_rng(1).standard_normal((2, cin, 9, 9))
    want = torch_forward(conv, x)
    assert_close(flax_forward(flax_conv, x), want, F64_TOL, "ported conv")
    if k > 1:
        flax_conv.kernel[...] = jnp.swapaxes(flax_conv.kernel[...], 0, 1)
        assert rel_err(flax_forward(flax_conv, x), want) > 0.1


def test_linear_layout():
    """torch's (out, in) weight is Flax's (in, out) kernel; outputs equal (1e-12). Control: a reshape in place
    of the transpose (same shape, wrong order) computes something else."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(7, 5).double().to(TORCH_DEVICE)
    flax_linear = fr.cast_floating(Linear(7, 5, rngs=nnx.Rngs(0)), jnp.float64)
    fr.load_torch_state_dict(flax_linear, linear.state_dict())
    weight = numpy(linear.weight)
    assert np.array_equal(np.asarray(flax_linear.kernel[...]), weight.T)
    x = np.random.default_rng(0).standard_normal((3, 7))
    want = torch_forward(linear, x)
    assert_close(flax_forward(flax_linear, x), want, F64_TOL, "ported linear")
    flax_linear.kernel[...] = jnp.asarray(weight.reshape(7, 5))
    assert rel_err(flax_forward(flax_linear, x), want) > 0.1


def test_simplenet_flattens_in_torchs_order():
    """SimpleNet's fc sees the 128x16x16 feature map flattened as torch's view(N, -1) does (C, H, W): same
    logits as torch (1e-12). Control: flattening the NHWC map directly (H, W, C) gives other logits."""
    t, f = ported_pair(CASES_BY_ID["SimpleNet"], dtype="float64")
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32))
    want = torch_forward(t, x)
    assert_close(flax_forward(f, x), want, F64_TOL, "SimpleNet")

    h = jnp.asarray(to_nhwc(x))
    for conv in (f.conv1, f.conv2, f.conv3, f.conv4):
        h = jnp.maximum(conv(h), 0)
    with torch.no_grad():
        h_t = torch.from_numpy(x).to(TORCH_DEVICE)
        for conv in (t.conv1, t.conv2, t.conv3, t.conv4):
            h_t = torch.relu(conv(h_t))
    assert_close(to_nchw(np.asarray(h)), numpy(h_t), F64_TOL, "features")
    assert_close(f.fc(jnp.transpose(h, (0, 3, 1, 2)).reshape(2, -1)), want, F64_TOL, "C, H, W flatten")
    assert rel_err(f.fc(h.reshape(2, -1)), want) > 0.1
