"""Flax NNX layers that follow PyTorch's conventions, so the models can mirror the notebooks line by line.

Each class is the stock NNX layer with torch's constructor arguments, torch's padding and torch's default
initialisation. ``BatchNorm2d`` (and ``BatchNorm1d``) changes behaviour, and ``ConvTranspose2d`` translates
torch's padding and groups into what ``lax`` takes: see their docstrings. Where a stock layer computes what torch
does given torch's settings, use it: ``nnx.LayerNorm(n, epsilon=1e-5)``, ``nnx.GroupNorm(n, num_groups=g,
epsilon=1e-5)``, ``nnx.Embed``, ``nnx.Conv(..., feature_group_count=g, kernel_dilation=d, padding=explicit)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import jax
import jax.numpy as jnp
from flax import nnx

from flax_resnet import conv_patches

Initializer = Callable[..., jax.Array]


# ------------------------------------------------------------------------------------------- initialisers
def torch_default_kernel_init() -> Initializer:
    """torch's default for Conv2d/Linear weights: kaiming_uniform(a=sqrt(5)) = U(+-1/sqrt(fan_in)).

    Variance 1/(3 fan_in), i.e. ``variance_scaling(1/3, 'fan_in', 'uniform')``. Flax's own default
    (lecun_normal, truncated) has three times that variance and another shape.
    """
    return jax.nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_default_bias_init(fan_in: int) -> Initializer:
    """torch's default bias: U(+-1/sqrt(fan_in)) with the weight's fan_in (Flax would use zeros)."""
    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0

    def init(key: jax.Array, shape, dtype=jnp.float32) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def kaiming_normal(mode: str = "fan_in") -> Initializer:
    """torch's ``kaiming_normal_(mode=..., nonlinearity='relu')``: N(0, 2/fan), untruncated like torch's."""
    return jax.nn.initializers.variance_scaling(2.0, mode, "normal")


# ------------------------------------------------------------------------------------------------ layers
class Conv2d(nnx.Conv):
    """``nnx.Conv`` with torch's ``nn.Conv2d`` arguments, explicit symmetric padding and torch's init.

    Explicit padding matters: at stride 2 on even sizes Flax's 'SAME' pads (0, 1) where torch's
    ``padding=1`` pads (1, 1), and the outputs then differ completely. In float64 on the CPU the convolution is
    computed as image patches and one matrix product (``flax_resnet.conv_patches``): XLA:CPU's float64
    convolution is 4-22x slower under the runners' options (BENCHMARKS.md), and every proof of parity runs in float64.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 padding: int = 0, bias: bool = True, *, rngs: nnx.Rngs,
                 kernel_init: Initializer | None = None):
        fan_in = in_channels * kernel_size * kernel_size
        super().__init__(
            in_channels, out_channels, (kernel_size, kernel_size), strides=(stride, stride),
            padding=((padding, padding), (padding, padding)), use_bias=bias,
            kernel_init=kernel_init or torch_default_kernel_init(),
            bias_init=torch_default_bias_init(fan_in), rngs=rngs,
            conv_general_dilated=conv_patches.conv_general_dilated,
        )


class Linear(nnx.Linear):
    """``nnx.Linear`` with torch's ``nn.Linear`` arguments and torch's default init."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, rngs: nnx.Rngs,
                 kernel_init: Initializer | None = None):
        super().__init__(
            in_features, out_features, use_bias=bias,
            kernel_init=kernel_init or torch_default_kernel_init(),
            bias_init=torch_default_bias_init(in_features), rngs=rngs,
        )


class ConvTranspose2d(nnx.ConvTranspose):
    """``nn.ConvTranspose2d`` with torch's arguments (``padding``, ``output_padding``, ``groups``, ``dilation``) and
    torch's init.

    Why not stock ``nnx.ConvTranspose`` as it comes: its default correlates with the kernel as stored
    (``transpose_kernel=False``) where torch's transposed convolution is the gradient of a convolution, which
    flips the kernel in space and swaps its channel axes; and its integer padding pads the dilated input, where
    torch's ``padding=p`` takes p from each side of the full output. Torch's output equals ``lax``'s with
    ``transpose_kernel=True`` and padding (d (k - 1) - p, d (k - 1) - p + output_padding) per axis: 'SAME' or
    (p, p) give other sizes or shifted outputs (``parity_tests/test_layer_kinds.py``). Stock also has no
    groups. The kernel is torch's weight (I, O/g, kh, kw) stored as (kh, kw, O/g, I), so the port transposes it
    as it does a convolution's.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0,
                 output_padding: int = 0, groups: int = 1, bias: bool = True, dilation: int = 1, *,
                 rngs: nnx.Rngs, kernel_init: Initializer | None = None):
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"in_channels ({in_channels}) and out_channels ({out_channels}) must both divide by "
                             f"groups ({groups}), as in torch")
        if not (output_padding < stride or output_padding < dilation):
            raise ValueError(f"output_padding ({output_padding}) must be smaller than stride ({stride}) or dilation "
                             f"({dilation}), as in torch")
        edge = dilation * (kernel_size - 1) - padding
        kernel_init = kernel_init or torch_default_kernel_init()  # fan_in: (O/g) kh kw, torch's
        super().__init__(
            in_channels, out_channels, (kernel_size, kernel_size), strides=(stride, stride),
            padding=((edge, edge + output_padding),) * 2, kernel_dilation=(dilation, dilation), use_bias=bias,
            kernel_init=kernel_init, bias_init=torch_default_bias_init(out_channels // groups * kernel_size ** 2),
            transpose_kernel=True, rngs=rngs)
        self.groups = groups
        if groups > 1:  # the stock layer made a (kh, kw, O, I) kernel: torch's grouped one is (kh, kw, O/g, I)
            self.kernel_shape = (kernel_size, kernel_size, out_channels // groups, in_channels)
            self.kernel = nnx.Param(kernel_init(rngs.params(), self.kernel_shape, self.param_dtype))

    def __call__(self, inputs: jax.Array) -> jax.Array:
        if self.groups == 1:
            return super().__call__(inputs)
        # Grouped: the forward-convolution kernel of each group, flipped in space, groups side by side along O.
        g = self.groups
        kh, kw, out_g, cin = self.kernel_shape
        bias = self.bias[...] if self.bias is not None else None
        x, kernel, bias = self.promote_dtype((inputs, self.kernel[...], bias), dtype=self.dtype)
        kernel = kernel[::-1, ::-1].reshape(kh, kw, out_g, g, cin // g)
        kernel = jnp.transpose(kernel, (0, 1, 4, 3, 2)).reshape(kh, kw, cin // g, g * out_g)
        y = jax.lax.conv_general_dilated(x, kernel, (1, 1), self.padding, lhs_dilation=self.strides,
                                         rhs_dilation=self.kernel_dilation,
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=g,
                                         precision=self.precision)
        return y if bias is None else y + bias


class BatchNorm2d(nnx.BatchNorm):
    """``nnx.BatchNorm`` with torch's momentum and epsilon, torch's running variance and its batch counter.

    Why not the stock layer: torch normalises with the biased batch variance (as Flax does) but stores the
    *unbiased* one, var * n / (n - 1), in ``running_var``; at n = 64 that is 1.6% apart, and eval-mode
    outputs would drift from torch's. Only ``__call__`` is redone here; the parameters, the running-statistics
    variables and the masked path are the parent's. ``num_batches_tracked`` mirrors torch's buffer so
    state_dicts round-trip exactly. The batch variance is torch's two-pass E[(x - E[x])^2], not Flax's default
    E[x^2] - E[x]^2 (``use_fast_variance``), which cancels in float32: with it ResNet-18's train-mode gradients
    (batch 4, 32x32) were 2e-2 from torch's, with the two-pass variance 1e-5 (measured, ``train.py verify``).
    With ``axis_name`` set the statistics (and n) are taken over all devices of that axis: synchronised
    BatchNorm.

    The statistics and the normalisation are written out with public ``jax.numpy`` / ``jax.lax`` (see
    ``_batch_stats`` and ``_normalize``) rather than borrowed from Flax's private helpers, which may change
    without notice; they repeat those helpers' arithmetic operation for operation (flax 0.12.8), so outputs
    are bit-for-bit what the stock layer's helpers give.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1, *, rngs: nnx.Rngs,
                 axis_name: str | None = None):
        # Flax's momentum weights the old average, torch's the new batch.
        super().__init__(num_features, momentum=1.0 - momentum, epsilon=eps, use_running_average=False,
                         use_fast_variance=False, axis_name=axis_name, rngs=rngs)
        self.torch_momentum = momentum
        self.num_batches_tracked = nnx.BatchStat(jnp.zeros((), jnp.int32))

    def __call__(self, x, use_running_average: bool | None = None, *, mask=None):
        if use_running_average is None:
            use_running_average = self.use_running_average
        if mask is not None:
            return super().__call__(x, use_running_average, mask=mask)
        axes = self.axis if isinstance(self.axis, Iterable) else (self.axis,)
        feature_axes = tuple(sorted({a + x.ndim if a < 0 else a for a in axes}))
        reduction_axes = tuple(i for i in range(x.ndim) if i not in feature_axes)
        # Statistics, running averages and normalisation in at least float32 even when the layer's output is
        # bfloat16 (``dtype``, see flax_resnet.precision): the stock layer would round the running statistics
        # to the output dtype before updating them. In float32 / float64 runs this is the stock arithmetic.
        scale, bias = self.scale[...], self.bias[...]
        running_mean, running_var = self.mean[...], self.var[...]
        compute = jnp.promote_types(jnp.result_type(x, scale, bias, running_mean, running_var), jnp.float32)
        if jnp.issubdtype(compute, jnp.complexfloating):
            raise TypeError(f"BatchNorm2d takes real inputs (torch's does too), got {compute}; pass the real "
                            "and imaginary parts as separate channels instead.")
        out_dtype = self.dtype or compute
        x, running_mean, running_var, scale, bias = (
            jnp.asarray(a, compute) for a in (x, running_mean, running_var, scale, bias))
        if use_running_average:
            return _normalize(x, running_mean, running_var, scale, bias, reduction_axes, out_dtype, self.epsilon)
        mean, var = self._batch_stats(x, reduction_axes)
        n = math.prod(x.shape[i] for i in reduction_axes)
        if self.axis_name is not None:
            n = n * jax.lax.psum(1, self.axis_name)
        unbiased_var = var * (n / jnp.maximum(n - 1, 1))
        m = self.torch_momentum
        self.mean[...] = jax.lax.stop_gradient((1 - m) * running_mean + m * mean).astype(self.mean.dtype)
        self.var[...] = jax.lax.stop_gradient((1 - m) * running_var + m * unbiased_var).astype(self.var.dtype)
        self.num_batches_tracked[...] = self.num_batches_tracked[...] + 1
        return _normalize(x, mean, var, scale, bias, reduction_axes, out_dtype, self.epsilon)

    def _batch_stats(self, x: jax.Array, reduction_axes: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
        """Biased batch mean and variance over ``reduction_axes`` (and over ``axis_name``'s devices), in x's dtype.

        With ``use_fast_variance`` (Flax's default) var = E[x^2] - E[x]^2, clipped at 0 against round-off, and
        both means are averaged across devices in one ``pmean`` of the stacked pair: one collective per
        layer instead of two. Otherwise var = E[(x - E[x])^2], which needs the global mean first, so two.
        """
        def mean(*arrays: jax.Array) -> tuple[jax.Array, ...]:
            means = tuple(a.mean(reduction_axes) for a in arrays)
            if self.axis_name is None:
                return means
            if len(means) == 1:
                return (jax.lax.pmean(means[0], self.axis_name, axis_index_groups=self.axis_index_groups),)
            stacked = jax.lax.pmean(jnp.stack(means, axis=0), self.axis_name,
                                    axis_index_groups=self.axis_index_groups)
            return tuple(stacked[i] for i in range(len(means)))

        if self.use_fast_variance:
            mu, mu2 = mean(x, jax.lax.square(x))
            return mu, jnp.maximum(0.0, mu2 - jax.lax.square(mu))
        (mu,) = mean(x)
        (var,) = mean(jax.lax.square(x - jnp.expand_dims(mu, reduction_axes)))
        return mu, var


class BatchNorm1d(BatchNorm2d):
    """``nn.BatchNorm1d``: the same layer as ``BatchNorm2d`` (features last, any rank), named as torch names it.

    torch's (N, C) and (N, C, L) are Flax's (N, C) and (N, L, C); both normalise each feature over every other
    axis, so only the name differs (the parity report's kinds column then reads ``BatchNorm1d / BatchNorm1d``).
    """


def _normalize(x: jax.Array, mean: jax.Array, var: jax.Array, scale: jax.Array, bias: jax.Array,
               reduction_axes: tuple[int, ...], dtype, epsilon: float) -> jax.Array:
    """(x - mean) * (rsqrt(var + eps) * scale) + bias, cast to ``dtype``.

    The per-feature factor rsqrt(var + eps) * scale is formed first and applied with one multiply, in that
    order, as Flax's helper does, so results match the stock layer bit for bit.
    """
    def per_feature(a: jax.Array) -> jax.Array:
        return jnp.expand_dims(a, reduction_axes)

    y = x - per_feature(mean)
    y = y * (jax.lax.rsqrt(per_feature(var) + epsilon) * per_feature(scale))
    return jnp.asarray(y + per_feature(bias), dtype)


class Identity(nnx.Module):
    """``nn.Identity``: what the no-BatchNorm ablation puts where BatchNorm was."""

    def __call__(self, x):
        return x


def relu(x: jax.Array) -> jax.Array:
    return jax.nn.relu(x)


def adaptive_avg_pool_1x1(x: jax.Array) -> jax.Array:
    """``nn.AdaptiveAvgPool2d(1)`` on NHWC, keeping the 1x1 spatial dims as torch does."""
    return jnp.mean(x, axis=(1, 2), keepdims=True)
