"""Layer kinds beyond conv / linear / BatchNorm, both ways: ported and compared against torch.

Each small model mixes the kinds a hand-written port meets: grouped, depthwise and dilated Conv2d, Conv1d,
ConvTranspose2d (the ``layers`` twin and stock ``nnx.ConvTranspose``), BatchNorm1d on (N, C) and (N, C, L),
LayerNorm, GroupNorm, Embedding, Linear on (N, L, D), and modules without parameters (activations, pooling,
flatten, Dropout). The Flax twins use stock NNX layers wherever they compute what torch does given torch's
settings. Every model must pass ``parity.compare`` in float64 (outputs in both modes and every gradient, to the
tolerances of ``parity.TOLERANCES``: 1e-12 values, 1e-10 gradients) after ``port.load_torch_state_dict``, and
its weights must round-trip into torch with ``load_state_dict(strict=True)``. Flax's defaults where they differ
from torch's (epsilon 1e-6, the tanh GELU, 'SAME' transposed padding, Embed's init) must fail, located at the
layer that has them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import flax_resnet as fr
from flax_resnet import layers, parity
from flax_resnet.parity import perturb_batchnorm

nn = torch.nn


# ---------------------------------------------------------------------- functions where torch has modules
def _max_pool_2x2(x: jax.Array) -> jax.Array:
    return nnx.max_pool(x, (2, 2), strides=(2, 2))


def _global_average_pool(x: jax.Array) -> jax.Array:  # AdaptiveAvgPool{1,2}d(1) on channels-last maps
    return x.mean(axis=tuple(range(1, x.ndim - 1)), keepdims=True)


def _flatten(x: jax.Array) -> jax.Array:  # after a global pool: (N, 1, ..., C) -> (N, C), as torch's (N, C, 1, ...)
    return x.reshape(x.shape[0], -1)


def _exact_gelu(x: jax.Array) -> jax.Array:
    return jax.nn.gelu(x, approximate=False)  # torch's nn.GELU() is the erf one; jax.nn.gelu defaults to tanh


class GELU(nnx.Module):
    """A parameter-free module with torch's name, so the report compares its output too."""

    def __init__(self, approximate: bool = False):
        self.approximate = approximate

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.gelu(x, approximate=self.approximate)


# ------------------------------------------------------------------------------------------- the models
def grouped_conv2d_torch() -> nn.Module:
    return nn.Sequential(nn.Conv2d(4, 8, 3, padding=1, groups=2), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=8, bias=False), nn.BatchNorm2d(8),
                         nn.MaxPool2d(2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))


def grouped_conv2d_flax(rngs: nnx.Rngs) -> nnx.Module:
    return nnx.Sequential(
        nnx.Conv(4, 8, (3, 3), padding=((1, 1), (1, 1)), feature_group_count=2, rngs=rngs), nnx.relu,
        nnx.Conv(8, 8, (3, 3), padding=((2, 2), (2, 2)), kernel_dilation=2, feature_group_count=8, use_bias=False,
                 rngs=rngs),
        layers.BatchNorm2d(8, rngs=rngs), _max_pool_2x2, _global_average_pool, _flatten, nnx.Linear(8, 5, rngs=rngs))


def conv1d_torch() -> nn.Module:
    # No biases before a train-mode BatchNorm: it cancels them, and their gradients would be rounding alone.
    return nn.Sequential(nn.Conv1d(3, 8, 5, padding=2, bias=False), nn.BatchNorm1d(8), nn.GELU(),
                         nn.Conv1d(8, 8, 3, stride=2, padding=1, groups=4, bias=False), nn.AdaptiveAvgPool1d(1),
                         nn.Flatten(), nn.BatchNorm1d(8), nn.Linear(8, 6), nn.ReLU(), nn.Dropout(0.2),
                         nn.Linear(6, 4))


def conv1d_flax(rngs: nnx.Rngs, gelu=_exact_gelu) -> nnx.Module:
    return nnx.Sequential(
        nnx.Conv(3, 8, (5,), padding=((2, 2),), use_bias=False, rngs=rngs), layers.BatchNorm1d(8, rngs=rngs), gelu,
        nnx.Conv(8, 8, (3,), strides=2, padding=((1, 1),), feature_group_count=4, use_bias=False, rngs=rngs),
        _global_average_pool, _flatten, layers.BatchNorm1d(8, rngs=rngs), nnx.Linear(8, 6, rngs=rngs), nnx.relu,
        nnx.Dropout(0.2, rngs=rngs), nnx.Linear(6, 4, rngs=rngs))


def conv_transpose_torch() -> nn.Module:
    return nn.Sequential(nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1), nn.ReLU(),
                         nn.ConvTranspose2d(6, 4, 4, stride=2, padding=1, groups=2, bias=False), nn.GroupNorm(2, 4))


def conv_transpose_flax(rngs: nnx.Rngs, group_norm_epsilon: float = 1e-5) -> nnx.Module:
    return nnx.Sequential(
        layers.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, rngs=rngs), nnx.relu,
        layers.ConvTranspose2d(6, 4, 4, stride=2, padding=1, groups=2, bias=False, rngs=rngs),
        nnx.GroupNorm(4, num_groups=2, epsilon=group_norm_epsilon, rngs=rngs))


def stock_conv_transpose_torch() -> nn.Module:
    return nn.Sequential(nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1), nn.ReLU(),
                         nn.ConvTranspose2d(6, 3, 3, padding=1, dilation=2))


def stock_conv_transpose_flax(rngs: nnx.Rngs, padding=((1, 2), (1, 2))) -> nnx.Module:
    # torch's padding p, output_padding q, dilation d, kernel k are lax's (d (k - 1) - p, d (k - 1) - p + q)
    return nnx.Sequential(nnx.ConvTranspose(4, 6, (3, 3), strides=2, padding=padding, rngs=rngs), nnx.relu,
                          nnx.ConvTranspose(6, 3, (3, 3), padding=((3, 3), (3, 3)), kernel_dilation=2,
                                            transpose_kernel=True, rngs=rngs))


def sequence_torch() -> nn.Module:
    return nn.Sequential(nn.Embedding(11, 8), nn.LayerNorm(8), nn.Linear(8, 16), nn.GELU(), nn.Dropout(0.1),
                         nn.Linear(16, 11))


def sequence_flax(rngs: nnx.Rngs, layer_norm_epsilon: float = 1e-5, approximate: bool = False) -> nnx.Module:
    return nnx.Sequential(nnx.Embed(11, 8, rngs=rngs), nnx.LayerNorm(8, epsilon=layer_norm_epsilon, rngs=rngs),
                          nnx.Linear(8, 16, rngs=rngs), GELU(approximate), nnx.Dropout(0.1, rngs=rngs),
                          nnx.Linear(16, 11, rngs=rngs))


class TextCNNTorch(nn.Module):
    """Embedding, then Conv1d over the sequence: torch permutes (N, L, D) to (N, D, L) between them."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(11, 8)
        self.conv = nn.Conv1d(8, 6, 3, padding=1)
        self.norm = nn.LayerNorm(6, bias=False)
        self.fc = nn.Linear(6, 3)

    def forward(self, ids):
        x = torch.relu(self.conv(self.embed(ids).transpose(1, 2)))
        return self.fc(self.norm(x.mean(dim=2)))


class TextCNNFlax(nnx.Module):
    """The twin: Flax's embedding output (N, L, D) is already the channels-last input of its Conv."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.embed = nnx.Embed(11, 8, rngs=rngs)
        self.conv = nnx.Conv(8, 6, (3,), padding=((1, 1),), rngs=rngs)
        self.norm = nnx.LayerNorm(6, epsilon=1e-5, use_bias=False, rngs=rngs)
        self.fc = nnx.Linear(6, 3, rngs=rngs)

    def __call__(self, ids):
        x = nnx.relu(self.conv(self.embed(ids)))
        return self.fc(self.norm(x.mean(axis=1)))


def _ids(shape: tuple[int, ...], high: int = 11, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, high, shape)


# id -> (torch builder, Flax builder, compare keywords)
MODELS = {
    "grouped-depthwise-dilated-conv2d": (grouped_conv2d_torch, grouped_conv2d_flax, {"input_shape": (2, 4, 8, 8)}),
    "conv1d-batchnorm1d": (conv1d_torch, conv1d_flax, {"input_shape": (4, 3, 16)}),
    "conv-transpose2d-groupnorm": (conv_transpose_torch, conv_transpose_flax, {"input_shape": (2, 4, 5, 5)}),
    "stock-conv-transpose": (stock_conv_transpose_torch, stock_conv_transpose_flax, {"input_shape": (2, 4, 5, 5)}),
    "embedding-layernorm-linear-sequence": (sequence_torch, sequence_flax,
                                            {"inputs": _ids((4, 6)), "layout": "same"}),
    "embedding-conv1d": (TextCNNTorch, lambda rngs: TextCNNFlax(rngs=rngs), {"inputs": _ids((4, 7))}),
}


def _pair(model_id: str, seed: int = 0, **flax_options) -> tuple[nn.Module, nnx.Module]:
    """The torch model (norms perturbed off 1 / 0) and its Flax twin holding torch's weights (ported)."""
    torch_builder, flax_builder, _ = MODELS[model_id]
    torch.manual_seed(seed)
    torch_model = torch_builder().double()
    perturb_batchnorm(torch_model, seed)
    flax_model = flax_builder(nnx.Rngs(seed), **flax_options)
    fr.load_torch_state_dict(flax_model, torch_model.state_dict())
    return torch_model, flax_model


def _compare(model_id: str, torch_model: nn.Module, flax_model: nnx.Module, **options) -> parity.ParityReport:
    return parity.compare(torch_model, flax_model, **{**MODELS[model_id][2], **options})


def _assert_located(report: parity.ParityReport, layer: str) -> None:
    assert not report.ok, str(report)
    assert report.first_divergence == layer, str(report)


# --------------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("model_id", list(MODELS))
def test_each_kind_matches_torch_in_float64(model_id):
    """Ported with load_torch_state_dict, then compared (port_weights=False): every weight, output (eval and
    train), running statistic and gradient within the float64 tolerance."""
    torch_model, flax_model = _pair(model_id)
    report = _compare(model_id, torch_model, flax_model)
    assert report.ok, str(report)
    sections = {(row.mode, row.section) for row in report.rows}
    assert {("eval", "outputs"), ("train", "outputs"), ("train", "gradients"), ("", "weights")} <= sections
    gradients = [row.name for row in report.rows if row.section == "gradients"]
    assert set(gradients) >= {name for name, _ in torch_model.named_parameters()}


@pytest.mark.parametrize("model_id", list(MODELS))
def test_each_kind_round_trips_into_torch(model_id):
    """to_torch_state_dict of the Flax twin loads into a fresh torch model with strict=True, tensor for tensor."""
    torch_model, flax_model = _pair(model_id)
    torch.manual_seed(1)
    fresh = MODELS[model_id][0]().double()
    fresh.load_state_dict(fr.to_torch_state_dict(flax_model), strict=True)
    for key, value in torch_model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key


@pytest.mark.parametrize("model_id", list(MODELS))
def test_each_kind_passes_in_float32(model_id):
    """The same pairs in float32 (the copies are cast; tolerances 1e-4 values, 1e-3 gradients)."""
    torch_model, flax_model = _pair(model_id)
    report = _compare(model_id, torch_model, flax_model, dtype="float32")
    assert report.ok, str(report)


def test_the_kinds_column_and_modules_without_parameters():
    """Modules without parameters are listed in torch's forward order: compared where the Flax model has a module of
    that name (GELU, Dropout), otherwise shown as not compared, never failures and not counted."""
    torch_model, flax_model = _pair("grouped-depthwise-dilated-conv2d")
    report = _compare("grouped-depthwise-dilated-conv2d", torch_model, flax_model, modes=("eval",))
    rows = {row.name: row for row in report.rows if row.section == "outputs"}
    assert [row.name for row in report.rows if row.section == "outputs"] == [str(i) for i in range(8)] + ["(logits)"]
    assert rows["0"].kinds == "Conv2d groups=2 / Conv" and rows["0"].compared
    assert rows["2"].kinds == "Conv2d depthwise dilation=2 / Conv"
    for name, kind in (("1", "ReLU"), ("4", "MaxPool2d"), ("5", "AdaptiveAvgPool2d"), ("6", "Flatten")):
        assert rows[name].kinds == f"{kind} / (none)" and not rows[name].compared and rows[name].ok
        assert rows[name].note == "no Flax module (a function there): not compared"
    text = str(report)
    assert "  1 " in text and "ReLU / (none)" in text
    assert f"OK: all {sum(row.compared for row in report.rows)} comparisons" in text
    assert sum(not row.compared for row in report.rows) == 4

    torch_model, flax_model = _pair("embedding-layernorm-linear-sequence")
    report = _compare("embedding-layernorm-linear-sequence", torch_model, flax_model)
    kinds = {row.name: row.kinds for row in report.rows if row.mode == "train" and row.section == "outputs"}
    assert kinds == {"0": "Embedding / Embed", "1": "LayerNorm / LayerNorm", "2": "Linear / Linear",
                     "3": "GELU / GELU", "4": "Dropout / Dropout", "5": "Linear / Linear",
                     "(logits)": "Sequential / Sequential"}
    assert all(row.compared for row in report.rows)
    assert "int64 ids, the same for both" in str(report) and "per position" in report.loss


def test_inputs_are_guessed_from_the_first_layer():
    """No inputs: Conv1d -> (4, C, 32) floats, Embedding -> (4, 8) integer ids in [0, num_embeddings)."""
    torch_model, flax_model = _pair("conv1d-batchnorm1d")
    report = parity.compare(torch_model, flax_model, modes=("eval",), gradients=False)
    assert report.ok, str(report)
    assert report.input_shape == (4, 3, 32) and "NCL (NLC for Flax)" in str(report)
    torch_model, flax_model = _pair("embedding-layernorm-linear-sequence")
    report = parity.compare(torch_model, flax_model, layout="same", modes=("eval",))
    assert report.ok, str(report)
    assert report.input_shape == (4, 8)


def test_linear_on_sequences_of_floats():
    """Linear and LayerNorm on (N, L, D) floats with layout='same'; the default would move D to axis 1."""
    torch.manual_seed(0)
    torch_model = nn.Sequential(nn.LayerNorm(6), nn.Linear(6, 5)).double()
    perturb_batchnorm(torch_model)
    flax_model = nnx.Sequential(nnx.LayerNorm(6, epsilon=1e-5, rngs=nnx.Rngs(0)), nnx.Linear(6, 5, rngs=nnx.Rngs(0)))
    fr.load_torch_state_dict(flax_model, torch_model.state_dict())
    x = np.random.default_rng(0).standard_normal((2, 7, 6))
    report = parity.compare(torch_model, flax_model, x, layout="same")
    assert report.ok, str(report)
    assert "the same layout for both" in str(report)
    labels = np.random.default_rng(1).integers(0, 5, (2, 7))
    assert parity.compare(torch_model, flax_model, x, layout="same", modes=("train",), labels=labels).ok
    with pytest.raises(ValueError, match=r"labels must be integers of shape \(2, 7\)"):
        parity.compare(torch_model, flax_model, x, layout="same", modes=("train",), labels=labels[:, 0])
    with pytest.raises(ValueError, match="layout must be"):
        parity.compare(torch_model, flax_model, x, layout="NLC")


# ----------------------------------------------------------------------------- Flax defaults are caught
def test_layernorm_with_flax_default_epsilon_is_located():
    """nnx.LayerNorm's epsilon is 1e-6, torch's 1e-5: the LayerNorm is the first layer to differ."""
    torch_model, flax_model = _pair("embedding-layernorm-linear-sequence", layer_norm_epsilon=1e-6)
    report = _compare("embedding-layernorm-linear-sequence", torch_model, flax_model)
    _assert_located(report, "1")
    assert next(row for row in report.rows if row.section == "outputs" and row.name == "0").ok


def test_groupnorm_with_flax_default_epsilon_is_located():
    torch_model, flax_model = _pair("conv-transpose2d-groupnorm", group_norm_epsilon=1e-6)
    report = _compare("conv-transpose2d-groupnorm", torch_model, flax_model)
    _assert_located(report, "3")


def test_tanh_gelu_is_located():
    """jax.nn.gelu is the tanh approximation unless approximate=False; torch's nn.GELU() is exact (erf). As a
    module of torch's name it is located at that module; as a function, at the first module after it."""
    torch_model, flax_model = _pair("embedding-layernorm-linear-sequence", approximate=True)
    _assert_located(_compare("embedding-layernorm-linear-sequence", torch_model, flax_model), "3")
    torch_model, flax_model = _pair("conv1d-batchnorm1d", gelu=jax.nn.gelu)
    report = _compare("conv1d-batchnorm1d", torch_model, flax_model)
    _assert_located(report, "3")
    gelu_row = next(row for row in report.rows if row.section == "outputs" and row.name == "2")
    assert not gelu_row.compared and gelu_row.ok


def test_same_padding_in_a_transposed_conv_is_located():
    """Stock nnx.ConvTranspose with padding='SAME' gives torch's output size at stride 2 (10 x 10 from 5 x 5)
    but other values: torch's padding=1, output_padding=1 is lax's ((1, 2), (1, 2))."""
    torch_model, flax_model = _pair("stock-conv-transpose", padding="SAME")
    report = _compare("stock-conv-transpose", torch_model, flax_model)
    _assert_located(report, "0")
    first = next(row for row in report.rows if row.section == "outputs" and row.name == "0")
    assert "shape" not in first.note and first.rel_err > 1e-3


def test_embed_init_differs_from_torchs():
    """torch's nn.Embedding draws N(0, 1); nnx.Embed's default is variance_scaling(1, fan_in, normal) with fan_in
    the features: std 1/sqrt(64) = 0.125 here. embedding_init=normal(1.0) is torch's. 64 x 256 draws: the sample
    std is within 2% of the true one (5 standard errors: 1 / sqrt(2 * 16384) = 0.6%)."""
    torch.manual_seed(0)
    torch_std = float(nn.Embedding(256, 64).weight.detach().std())
    flax_std = float(jnp.std(nnx.Embed(256, 64, rngs=nnx.Rngs(0)).embedding[...]))
    torchs = nnx.Embed(256, 64, embedding_init=jax.nn.initializers.normal(1.0), rngs=nnx.Rngs(0))
    assert abs(torch_std - 1.0) < 0.02
    assert abs(flax_std - 0.125) < 0.02 * 0.125
    assert abs(float(jnp.std(torchs.embedding[...])) - 1.0) < 0.02


def test_embed_keeps_its_float32_compute_dtype():
    """nnx.Embed fixes ``dtype`` to its parameters' at construction: cast to float64 it still embeds in float32,
    which rounds its gradient to float32 (compare sets every layer's dtype to the comparison's; the float64
    parity of the embedding models above fails without that)."""
    embed = fr.cast_floating(nnx.Embed(11, 8, rngs=nnx.Rngs(0)), jnp.float64)
    assert embed.embedding.dtype == jnp.float64
    assert embed(jnp.asarray(_ids((2, 3)))).dtype == jnp.float32


def test_the_port_names_what_it_cannot_port():
    class Model(nnx.Module):
        def __init__(self, rngs: nnx.Rngs):
            self.norm = nnx.RMSNorm(4, rngs=rngs)

    with pytest.raises(TypeError, match=r"cannot port RMSNorm at 'norm'.*LayerNorm, GroupNorm and embedding"):
        fr.port.torch_keys(Model(nnx.Rngs(0)))
