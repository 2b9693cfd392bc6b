"""``ParityReport.diagnosis`` (``flax_resnet.parity.diagnosis``): each known trap of a port, planted in a small model,
is named with its layer; none is named on an exact port.

The faults: a running variance stored biased, running statistics updated with the other momentum convention, 'SAME'
padding at a stride-2 conv, an init drawn from an uncorrected truncated normal, a flatten in (H, W, C) order, a
square linear kernel left untransposed, another BatchNorm epsilon, the tanh GELU, a layer left unported. Float64
(the faults are then 1e-4 to 1 against a tolerance of 1e-12), and float32 where the fault stands well above its
tolerance of 1e-4 (statistics, padding, flatten, epsilon); the exact ports in float64 and float32.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F  # noqa: N812 - torch's own abbreviation
from flax import nnx

import flax_resnet as fr
import flax_resnet.layers  # noqa: F401 - fr.layers
from flax_resnet import parity, registry
from flax_resnet.parity import diagnosis
from parity_tests import helpers
from parity_tests.test_harness import BIG, USER_INPUT, _notebook_pair, _ported_user_pair, _user_pair, stock_batchnorm


def _only_line(report: parity.ParityReport, layer: str, *words: str) -> str:
    """The report's one diagnosis line; it names ``layer`` and every one of ``words``, and is printed."""
    assert not report.ok
    assert len(report.diagnosis) == 1, "\n".join(report.diagnosis) or str(report)
    line = report.diagnosis[0]
    assert line.startswith((f"{layer}:", f"{layer}.", f"{layer} (")), line
    for word in words:
        assert word in line, line
    # under the table, above the verdict (which stays the last line): what `train.py verify` prints
    assert f"\ndiagnosis:\n  {line}\nDIFFERENT: " in str(report)
    return line


# ------------------------------------------------------------------------------------ running statistics
@pytest.mark.parametrize("batchnorm, traps", [
    # 1: torch's momentum and eps, but the biased variance stored
    (lambda rngs: stock_batchnorm(16, rngs), ["running variance off by n/(n-1)"]),
    # 2: torch's 0.1 given to a layer of torch's convention where Flax's convention was meant (0.9 then weights
    # the batch)
    (lambda rngs: fr.layers.BatchNorm2d(16, momentum=0.9, rngs=rngs), ["the other momentum convention"]),
    # both: stock nnx.BatchNorm with torch's number
    (lambda rngs: nnx.BatchNorm(16, momentum=0.1, epsilon=1e-5, rngs=rngs),
     ["the other momentum convention", "running variance off by n/(n-1)"]),
], ids=["biased-variance", "momentum", "both"])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_running_statistic_traps_are_named(batchnorm, traps, dtype):
    torch_model, flax_model = _user_pair()
    flax_model.bn2 = batchnorm(nnx.Rngs(0))
    torch_var, flax_var = torch_model.bn2.running_var.clone(), np.array(flax_model.bn2.var[...])
    report = parity.compare(torch_model, flax_model, input_shape=USER_INPUT, port_weights=True, dtype=dtype)
    # the diagnosis ran train-mode passes on copies: the models keep their statistics
    assert torch.equal(torch_model.bn2.running_var, torch_var) and np.array_equal(flax_model.bn2.var[...], flax_var)
    assert len(report.diagnosis) == len(traps), "\n".join(report.diagnosis)
    for line, trap in zip(report.diagnosis, traps, strict=True):
        assert line.startswith("bn2.") and trap in line, line
    if "running variance off by n/(n-1)" in traps:
        assert "x 32/31 at 32 values per channel" in report.diagnosis[-1]  # batch 2 at 4x4 after the stride-2 conv
    if "the other momentum convention" in traps:
        assert report.diagnosis[0].startswith("bn2.running_mean, bn2.running_var:")


def test_running_statistic_alone():
    """The function the training-step report calls: synthetic updates, float64 and float32."""
    rng = np.random.default_rng(0)
    before, batch, n, m = rng.uniform(0.5, 1.5, 8), rng.uniform(0.5, 1.5, 8), 32, 0.1
    torch_after = (1 - m) * before + m * batch  # batch: torch's unbiased variance
    biased = (1 - m) * before + m * batch * (n - 1) / n
    swapped = m * before + (1 - m) * batch
    assert "off by n/(n-1)" in diagnosis.running_statistic("bn.running_var", before, torch_after, biased, n)
    line = diagnosis.running_statistic("bn.running_mean", before, torch_after, swapped, n)
    assert "other momentum convention" in line and "weights the batch by 0.9" in line
    assert "off by n/(n-1)" not in line  # a mean has no variance correction
    for dtype in (np.float64, np.float32):
        args = [a.astype(dtype) for a in (before, torch_after, biased)]
        assert "off by n/(n-1)" in diagnosis.running_statistic("bn.running_var", *args, n)
        # rounding of the dtype alone, or an update no trap explains: nothing named
        noise = torch_after * (1 + 3 * np.finfo(dtype).eps * rng.standard_normal(8))
        assert diagnosis.running_statistic("bn.running_var", before, torch_after, noise.astype(dtype), n) is None
    other = torch_after + 0.01 * rng.standard_normal(8)
    assert diagnosis.running_statistic("bn.running_var", before, torch_after, other, n) is None


# ------------------------------------------------------------------------------------------------ padding
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_same_padding_at_stride_2_is_named(dtype):
    """3: Flax's 'SAME' at the stride-2 conv of an 8x8 map pads (0, 1) where torch's padding=1 pads (1, 1)."""
    torch_model, flax_model = _ported_user_pair(conv2_padding="SAME")
    report = parity.compare(torch_model, flax_model, input_shape=USER_INPUT, dtype=dtype)
    assert report.first_divergence == "conv2"
    _only_line(report, "conv2", "shifted by one pixel", "stride 2", "((0, 1), (0, 1))", "'SAME'",
               "padding=((1, 1), (1, 1))")


# --------------------------------------------------------------------------------------------------- init
class TorchHe(torch.nn.Module):
    """Two convs initialised as notebook 004's ResNet does: kaiming_normal_(fan_out, relu), untruncated."""

    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(16, 32, 3, padding=1, bias=False)  # 4,608 values
        self.conv2 = torch.nn.Conv2d(32, 32, 3, padding=1, bias=False)  # 9,216 values
        for conv in (self.conv1, self.conv2):
            torch.nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        return self.conv2(torch.relu(self.conv1(x)))


class FlaxHe(nnx.Module):
    def __init__(self, kernel_init, *, rngs: nnx.Rngs):
        pad = ((1, 1), (1, 1))
        self.conv1 = nnx.Conv(16, 32, (3, 3), padding=pad, use_bias=False, kernel_init=kernel_init(32 * 9), rngs=rngs)
        self.conv2 = nnx.Conv(32, 32, (3, 3), padding=pad, use_bias=False, kernel_init=kernel_init(32 * 9), rngs=rngs)

    def __call__(self, x):
        return self.conv2(nnx.relu(self.conv1(x)))


@pytest.mark.parametrize("corrected", [False, True])
def test_truncated_init_variance_is_named(corrected):
    """4: Flax's own init (weights not ported) drawn from truncated_normal(stddev=sqrt(2 / fan_out)): the standard
    deviation is 0.8796 of torch's at both convs. variance_scaling(2, 'fan_out', 'truncated_normal') divides by
    0.8796 and draws torch's variance: then only 'not ported' is said."""
    def uncorrected(fan_out: int):
        return jax.nn.initializers.truncated_normal(stddev=math.sqrt(2 / fan_out))

    def right(fan_out: int):
        return jax.nn.initializers.variance_scaling(2.0, "fan_out", "truncated_normal")

    torch.manual_seed(0)
    torch_model, flax_model = TorchHe(), FlaxHe(right if corrected else uncorrected, rngs=nnx.Rngs(0))
    report = parity.compare(torch_model, flax_model, input_shape=(2, 16, 8, 8))
    truncation = [line for line in report.diagnosis if "truncation factor" in line]
    assert ["no layer holds torch's weights" in line for line in report.diagnosis].count(True) == 1, report.diagnosis
    if corrected:
        assert truncation == [], report.diagnosis
        return
    assert [line.split(":")[0] for line in truncation] == ["conv1.weight", "conv2.weight"], report.diagnosis
    for line in truncation:
        assert "0.8796" in line and "sampling bound" in line


# ----------------------------------------------------------------------------------------------- flatten
class TorchFlatten(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.fc = torch.nn.Linear(4 * 4 * 4, 5)

    def forward(self, x):
        x = torch.relu(self.conv(x))
        return self.fc(x.view(x.size(0), -1))  # (C, H, W) order


class FlaxFlatten(nnx.Module):
    def __init__(self, *, rngs: nnx.Rngs):
        self.conv = nnx.Conv(3, 4, (3, 3), padding=((1, 1), (1, 1)), rngs=rngs)
        self.fc = nnx.Linear(4 * 4 * 4, 5, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.conv(x))
        return self.fc(x.reshape(x.shape[0], -1))  # the fault: NHWC flattened in (H, W, C) order


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_flatten_order_is_named(dtype):
    """5: the layers agree, the flatten between them does not: torch's fc on its input permuted gives Flax's."""
    torch.manual_seed(0)
    report = parity.compare(TorchFlatten(), FlaxFlatten(rngs=nnx.Rngs(0)), input_shape=(2, 3, 4, 4),
                            port_weights=True, dtype=dtype)
    assert report.first_divergence == "fc"
    _only_line(report, "fc", "(H, W, C) order", "C, H, W = 4, 4, 4", "transpose the NHWC map to NCHW")


# ------------------------------------------------------------------------------------------------ linear
def test_untransposed_linear_kernel_is_named():
    """6: a square fc whose kernel was copied in torch's (out, in) layout."""
    torch_model, flax_model = _ported_user_pair(classes=16)
    flax_model.fc.kernel[...] = jnp.asarray(torch_model.fc.weight.detach().numpy())
    report = parity.compare(torch_model, flax_model, input_shape=USER_INPUT)
    _only_line(report, "fc", "linear kernel not transposed", "x @ W")


# ---------------------------------------------------------------------------------------------- epsilon
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_epsilon_mismatch_is_named(dtype):
    """7: bn1 with epsilon 1e-3 for torch's 1e-5."""
    torch_model, flax_model = _user_pair()
    flax_model.bn1 = fr.layers.BatchNorm2d(8, eps=1e-3, rngs=nnx.Rngs(0))
    report = parity.compare(torch_model, flax_model, input_shape=USER_INPUT, port_weights=True, dtype=dtype)
    _only_line(report, "bn1", "epsilon mismatch", "epsilon=0.001", "eps=1e-05")


# ------------------------------------------------------------------------------------------------- GELU
class TorchMLP(torch.nn.Module):
    def __init__(self, module: bool):
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(8, 16), torch.nn.Linear(16, 4)
        self.act = torch.nn.GELU() if module else None

    def forward(self, x):
        x = self.fc1(x)
        return self.fc2(self.act(x) if self.act is not None else F.gelu(x))


class GELU(nnx.Module):
    """A user's activation module, with jax.nn.gelu's default (the tanh approximation)."""

    def __call__(self, x):
        return jax.nn.gelu(x)


class FlaxMLP(nnx.Module):
    def __init__(self, module: bool, *, rngs: nnx.Rngs):
        self.fc1, self.fc2 = nnx.Linear(8, 16, rngs=rngs), nnx.Linear(16, 4, rngs=rngs)
        self.act = GELU() if module else None

    def __call__(self, x):
        x = self.fc1(x)
        return self.fc2(self.act(x) if self.act is not None else nnx.gelu(x))


@pytest.mark.parametrize("module", [True, False], ids=["nn.GELU", "F.gelu"])
def test_approximate_gelu_is_named(module):
    """8: a GELU module (torch's nn.GELU twin, compared itself) or a GELU function between fc1 and fc2 (then fc2
    is the first to differ, with its input)."""
    torch.manual_seed(0)
    report = parity.compare(TorchMLP(module), FlaxMLP(module, rngs=nnx.Rngs(0)), input_shape=(4, 8),
                            port_weights=True)
    layer = "act" if module else "fc2"
    assert report.first_divergence == layer
    line = _only_line(report, layer, "approximate GELU", "approximate=False")
    assert module or line.startswith("fc2 (its input):")


# --------------------------------------------------------------------------------------------- unported
def test_unported_layer_is_named():
    """9: conv2 keeps Flax's own (lecun normal) kernel, every other tensor is torch's."""
    torch_model, flax_model = _user_pair()
    state_dict = torch_model.state_dict()
    state_dict["conv2.weight"] = fr.to_torch_state_dict(flax_model)["conv2.weight"]
    fr.load_torch_state_dict(flax_model, state_dict)
    report = parity.compare(torch_model, flax_model, input_shape=USER_INPUT)
    _only_line(report, "conv2", "still holds its own initialisation", "port it")


def test_verify_prints_the_diagnosis(monkeypatch, capsys):
    """``train.py verify`` (float32, its default) on a port that leaves stage2.0.conv1 with a Flax init of its own."""
    from flax_resnet import cli, port

    loaded = port.load_torch_state_dict

    def forgetful_port(model, state_dict):
        loaded(model, state_dict)
        kernel = model.stage2.layers[0].conv1.kernel
        kernel[...] = jax.random.normal(jax.random.key(0), kernel.shape, kernel.dtype) * 0.1

    monkeypatch.setattr(port, "load_torch_state_dict", forgetful_port)
    code = cli.main(["verify", "--model", "SimpleResNet", "--n-blocks", "1", "--batch", "2", "--image-size", "16"])
    lines = capsys.readouterr().out.rstrip().splitlines()
    assert code == 1
    assert lines[-3] == "diagnosis:" and lines[-2].startswith("  stage2.0.conv1: still holds its own initialisation")
    assert lines[-1].startswith("DIFFERENT:")


# ----------------------------------------------------------------------------------------- exact ports
# the blocks (the whole notebook models are the registry's, at small sizes)
SMALL_CASES = [case for case in helpers.CASES if case.id.endswith("Block") or "Block-" in case.id]
REGISTRY = [name for name in registry.model_names() if name not in BIG]


def _registry_pair(name: str, dtype: str):
    del dtype  # compare casts the copies
    from parity_tests.test_harness import _input_shape

    torch_model, flax_model = _notebook_pair(name)
    return torch_model, flax_model, _input_shape(name)


def _helpers_pair(case_id: str, dtype: str):
    case = helpers.CASES_BY_ID[case_id]
    torch_model, flax_model = helpers.ported_pair(case, dtype=dtype)
    return torch_model, flax_model, (2,) + case.input_shape[1:]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("source, name", [("registry", name) for name in REGISTRY]
                         + [("helpers", case.id) for case in SMALL_CASES])
def test_no_trap_is_named_on_an_exact_port(source, name, dtype, monkeypatch):
    """Every output and running statistic taken as failing, so that every check runs on every layer it would look
    at (the weights keep their verdict, equal: a layer whose weights differ is not recomputed): still no line.
    The models are exact ports; float32 differs by rounding alone. No gradients: no diagnosis reads them, and
    they are half of compare's time."""
    torch_model, flax_model, shape = (_registry_pair if source == "registry" else _helpers_pair)(name, dtype)
    monkeypatch.setattr(parity.Row, "ok", property(lambda row: row.section == "weights" and row.rel_err == 0))
    report = parity.compare(torch_model, flax_model, input_shape=shape, dtype=dtype, port_weights=True,
                            gradients=False)
    assert not report.ok  # the diagnosis ran
    assert report.diagnosis == [], "\n".join(report.diagnosis)


@pytest.mark.parametrize("kind", ["LayerNorm", "GroupNorm"])
def test_epsilon_is_read_from_any_flax_norm_layer(kind):
    """7, for the norms compare cannot port yet: stock nnx.LayerNorm / nnx.GroupNorm keep Flax's epsilon 1e-6 for
    torch's 1e-5. The layer-local check (torch's input through both layers), called directly."""
    torch.manual_seed(0)
    rngs = nnx.Rngs(0)
    if kind == "LayerNorm":
        torch_layer, x = torch.nn.LayerNorm(8).double(), np.random.default_rng(0).standard_normal((4, 8))
        flax_layer = nnx.LayerNorm(8, param_dtype=jnp.float64, rngs=rngs)
    else:
        torch_layer, x = torch.nn.GroupNorm(2, 8).double(), np.random.default_rng(0).standard_normal((2, 8, 4, 4))
        flax_layer = nnx.GroupNorm(8, num_groups=2, param_dtype=jnp.float64, rngs=rngs)
    with torch.no_grad():
        torch_layer.weight.uniform_(0.5, 1.5)
        torch_layer.bias.normal_()
    flax_layer.scale[...] = jnp.asarray(torch_layer.weight.detach().numpy())
    flax_layer.bias[...] = jnp.asarray(torch_layer.bias.detach().numpy())
    record = {"input": x, "output": torch_layer(torch.from_numpy(x)).detach().numpy()}
    tol = parity.TOLERANCES["float64"].values  # compare passes its dtype's tolerance
    agree, findings = diagnosis._local_findings("norm", torch_layer, flax_layer, record, tol, False)
    assert not agree
    assert [finding.trap for finding in findings] == ["epsilon"]
    assert "epsilon=1e-06, torch's eps=1e-05" in findings[0].text and f"Flax {kind} epsilon=1e-05" in findings[0].text
    flax_layer.epsilon = 1e-5
    assert diagnosis._local_findings("norm", torch_layer, flax_layer, record, tol, False) == (True, [])
