"""The parity harness (``flax_resnet.parity``): it passes every correct port and names the layer of each wrong one.

Every notebook model (from the registry, small) passes; so does a user-style model whose twin is built from stock
``nnx.Conv``/``nnx.Linear``. Four deliberate faults, each a mistake a hand-written port makes, must fail and be
located at the layer that has them: Flax's 'SAME' padding at a stride-2 conv, stock ``nnx.BatchNorm`` (biased
running variance), a linear kernel left in torch's (out, in) layout, and a layer whose weights were never
ported. Both models must come out of ``compare`` exactly as they went in. All in float64 on small inputs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import flax_resnet as fr
from flax_resnet import builders, parity, registry
from flax_resnet.parity import perturb_batchnorm

# Small constructor arguments: the harness is what is tested here, not the depth of the models.
SMALL_ARGS = {"n_blocks": 1, "num_blocks": (1, 1, 1, 1)}
BIG = {"ResNet34", "ResNet50"}


def _small_kwargs(name: str) -> dict:
    return {arg: SMALL_ARGS[arg] for arg in registry.get_spec(name).args if arg in SMALL_ARGS}


def _input_shape(name: str) -> tuple[int, int, int, int]:
    # 16x16 leaves 2x2 maps (8 values per channel for BatchNorm at batch 2) in the last stage; SimpleNet's fc
    # is sized for 32x32.
    return (2, 3, 32, 32) if name == "SimpleNet" else (2, 3, 16, 16)


def _flax_twin(name: str, kwargs: dict) -> nnx.Module:
    """The registry's Flax model with zeros for weights, built without running its initialisers (compiling them
    costs seconds per model on a CPU, and ``port_weights=True`` replaces every weight anyway)."""
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: builders.build_flax(name, kwargs)))

    def placeholder(leaf: jax.ShapeDtypeStruct) -> jax.Array:
        if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            return jax.random.key(0)
        return jnp.asarray(np.zeros(leaf.shape, leaf.dtype))

    return nnx.merge(graphdef, jax.tree.map(placeholder, abstract))


def _notebook_pair(name: str) -> tuple[torch.nn.Module, nnx.Module]:
    kwargs = _small_kwargs(name)
    torch_model = builders.build_torch(name, kwargs, seed=0)
    perturb_batchnorm(torch_model)  # eval mode then uses statistics that are not the initial 0 and 1
    return torch_model, _flax_twin(name, kwargs)


@pytest.mark.parametrize("name", [pytest.param(name, marks=(pytest.mark.slow,) if name in BIG else ())
                                  for name in registry.model_names()])
def test_every_notebook_model_passes(name):
    """Eval and train mode, BatchNorm statistics, every gradient: within the float64 tolerance, no divergence."""
    torch_model, flax_model = _notebook_pair(name)
    report = parity.compare(torch_model, flax_model, input_shape=_input_shape(name), port_weights=True)
    assert report.ok, str(report)
    assert report.first_divergence is None
    sections = {(row.mode, row.section) for row in report.rows}
    assert {("eval", "outputs"), ("train", "outputs"), ("train", "gradients"), ("", "weights")} <= sections
    if any(isinstance(module, torch.nn.BatchNorm2d) for module in torch_model.modules()):
        assert ("train", "running statistics") in sections
    if name == "ResNet18Dropout":
        assert any("dropout held off" in note for note in report.notes)


# ------------------------------------------------------------------------------------- a user's own model
class TorchNet(torch.nn.Module):
    """What a user might write: conv-BN-ReLU, a stride-2 conv-BN-ReLU, global average pool, linear."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(8)
        self.conv2 = torch.nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False)
        self.bn2 = torch.nn.BatchNorm2d(16)
        self.fc = torch.nn.Linear(16, classes)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean(dim=(2, 3)))


def torch_batchnorm(features: int, rngs: nnx.Rngs) -> nnx.Module:
    return fr.layers.BatchNorm2d(features, rngs=rngs)


def stock_batchnorm(features: int, rngs: nnx.Rngs) -> nnx.Module:
    """Stock ``nnx.BatchNorm`` with torch's momentum and epsilon: right but for its biased running variance."""
    return nnx.BatchNorm(features, momentum=0.9, epsilon=1e-5, rngs=rngs)


class FlaxNet(nnx.Module):
    """The NNX twin from stock layers: same attribute names, torch's explicit padding, NHWC."""

    def __init__(self, classes: int = 10, *, rngs: nnx.Rngs, conv2_padding=((1, 1), (1, 1)),
                 batchnorm=torch_batchnorm):
        self.conv1 = nnx.Conv(3, 8, (3, 3), padding=((1, 1), (1, 1)), use_bias=False, rngs=rngs)
        self.bn1 = batchnorm(8, rngs)
        self.conv2 = nnx.Conv(8, 16, (3, 3), strides=(2, 2), padding=conv2_padding, use_bias=False, rngs=rngs)
        self.bn2 = batchnorm(16, rngs)
        self.fc = nnx.Linear(16, classes, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.bn1(self.conv1(x)))
        x = nnx.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean(axis=(1, 2)))


USER_INPUT = (2, 3, 8, 8)  # even size: stride 2 is where 'SAME' and torch's padding=1 part


def _user_pair(classes: int = 10, **flax_options) -> tuple[TorchNet, FlaxNet]:
    torch.manual_seed(0)
    torch_model = TorchNet(classes)
    perturb_batchnorm(torch_model)
    return torch_model, FlaxNet(classes, rngs=nnx.Rngs(0), **flax_options)


def _ported_user_pair(classes: int = 10, **flax_options) -> tuple[TorchNet, FlaxNet]:
    torch_model, flax_model = _user_pair(classes, **flax_options)
    fr.load_torch_state_dict(flax_model, torch_model.state_dict())
    return torch_model, flax_model


def test_user_model_from_stock_layers_passes():
    """Ported by the user (``port_weights`` off, the default): parity in both modes, 5 layers named as torch."""
    torch_model, flax_model = _ported_user_pair()
    report = parity.compare(torch_model, flax_model, input_shape=USER_INPUT)
    assert report.ok, str(report)
    assert report.first_divergence is None
    eval_layers = [row.name for row in report.rows if row.mode == "eval" and row.section == "outputs"]
    assert eval_layers == ["conv1", "bn1", "conv2", "bn2", "fc", "(logits)"]


def test_user_model_in_float32_passes():
    torch_model, flax_model = _ported_user_pair()
    report = parity.compare(torch_model, flax_model, input_shape=USER_INPUT, dtype="float32")
    assert report.ok, str(report)


# ---------------------------------------------------------------------------------------- the four faults
def _assert_located(report: parity.ParityReport, layer: str) -> None:
    assert not report.ok
    assert report.first_divergence == layer, str(report)
    assert f"first divergence: {layer} " in str(report)


def test_same_padding_at_a_stride2_conv_is_located():
    """(a) Flax's 'SAME' pads (0, 1) at stride 2 on even sizes where torch's padding=1 pads (1, 1): a nested
    conv of SimpleResNet rebuilt with it. Its output is the first to differ, in both modes; the layers
    before it agree."""
    torch_model, flax_model = _notebook_pair("SimpleResNet")
    flax_model.stage2.layers[0].conv1 = nnx.Conv(16, 32, (3, 3), strides=(2, 2), padding="SAME", use_bias=False,
                                                 rngs=nnx.Rngs(1))
    report = parity.compare(torch_model, flax_model, input_shape=(2, 3, 16, 16), port_weights=True)
    _assert_located(report, "stage2.0.conv1")
    for mode in ("eval", "train"):
        outputs = [row for row in report.rows if row.mode == mode and row.section == "outputs"]
        first_bad = next(row for row in outputs if not row.ok)
        assert first_bad.name == "stage2.0.conv1" and first_bad.rel_err > 1e-3
        assert all(row.ok for row in outputs[:outputs.index(first_bad)])


def test_stock_batchnorm_is_located_in_the_running_statistics():
    """(b) Stock nnx.BatchNorm (torch's momentum and eps) normalises as torch does, so every output agrees, but it
    stores the biased batch variance: only running_var differs, at the BatchNorm that has it."""
    torch_model, flax_model = _user_pair()
    flax_model.bn2 = stock_batchnorm(16, nnx.Rngs(0))
    report = parity.compare(torch_model, flax_model, input_shape=USER_INPUT, port_weights=True)
    _assert_located(report, "bn2")
    assert {(row.section, row.name) for row in report.failures} == {("running statistics", "bn2.running_var")}
    assert any("num_batches_tracked not loaded" in note for note in report.notes)


def test_transposed_linear_weight_is_located():
    """(c) A square linear layer whose kernel was copied in torch's (out, in) layout, without the transpose."""
    torch_model, flax_model = _ported_user_pair(classes=16)
    flax_model.fc.kernel[...] = jnp.asarray(torch_model.fc.weight.detach().numpy())
    report = parity.compare(torch_model, flax_model, input_shape=USER_INPUT)
    _assert_located(report, "fc")
    assert [row.name for row in report.failures if row.section == "weights"] == ["fc.weight"]


def test_layer_left_with_flax_init_is_located():
    """(d) A port that skipped one layer: conv2 keeps Flax's default (lecun normal) kernel. The report names
    that layer, lists its weight as different and says how to port."""
    torch_model, flax_model = _user_pair()
    state_dict = torch_model.state_dict()
    state_dict["conv2.weight"] = fr.to_torch_state_dict(flax_model)["conv2.weight"]  # Flax's own init
    fr.load_torch_state_dict(flax_model, state_dict)
    report = parity.compare(torch_model, flax_model, input_shape=USER_INPUT)
    _assert_located(report, "conv2")
    assert [row.name for row in report.failures if row.section == "weights"] == ["conv2.weight"]
    assert any("port_weights=True" in note for note in report.notes)


# ------------------------------------------------------------------------------------ models left as given
def _torch_snapshot(model: torch.nn.Module) -> tuple:
    state = {key: value.detach().clone() for key, value in model.state_dict().items()}
    return state, [m.training for m in model.modules()], [p.grad for p in model.parameters()]


def _flax_snapshot(model: nnx.Module) -> tuple:
    leaves = [np.array(leaf) for leaf in jax.tree.leaves(nnx.state(model))]
    modes = [(path, type(m), getattr(m, "use_running_average", None), getattr(m, "deterministic", None))
             for path, m in nnx.iter_modules(model)]
    return leaves, modes


@pytest.mark.parametrize("port_weights", [False, True])
def test_models_are_left_exactly_as_they_were(port_weights):
    """float32 models in mixed modes (torch in eval mode but for one BatchNorm, Flax in train mode), compared in
    float64 in both modes with gradients: weights, statistics, counters, dtypes, modes, classes and torch's
    .grad are bitwise what they were. With ``port_weights`` the Flax model keeps its own (Flax-initialised)
    weights: only the copy gets torch's."""
    torch_model, flax_model = _user_pair() if port_weights else _ported_user_pair()
    torch_model.eval()
    torch_model.bn2.train()
    flax_model.train()
    torch_before, flax_before = _torch_snapshot(torch_model), _flax_snapshot(flax_model)
    report = parity.compare(torch_model, flax_model, input_shape=USER_INPUT, port_weights=port_weights)
    assert report.ok, str(report)
    torch_after, flax_after = _torch_snapshot(torch_model), _flax_snapshot(flax_model)
    assert torch_after[0].keys() == torch_before[0].keys()
    for key, value in torch_before[0].items():
        assert torch_after[0][key].dtype == value.dtype and torch.equal(torch_after[0][key], value), key
    assert torch_after[1:] == torch_before[1:]
    assert all(grad is None for grad in torch_after[2])
    assert len(flax_after[0]) == len(flax_before[0])
    for after, before in zip(flax_after[0], flax_before[0], strict=True):
        assert after.dtype == before.dtype and np.array_equal(after, before)
    assert flax_after[1] == flax_before[1]
    assert flax_model.conv1.kernel.dtype == jnp.float32


# ------------------------------------------------------------------------------------------------ misuse
def test_misuse_is_refused_with_the_fix():
    torch_model, flax_model = _ported_user_pair()
    with pytest.raises(TypeError, match="torch model comes first"):
        parity.compare(flax_model, torch_model)
    with pytest.raises(ValueError, match="float64"):
        parity.compare(torch_model, flax_model, dtype="float16")
    with pytest.raises(ValueError, match="'eval' and 'train'"):
        parity.compare(torch_model, flax_model, modes=("test",))
    with pytest.raises(ValueError, match="not both"):
        parity.compare(torch_model, flax_model, np.zeros(USER_INPUT), input_shape=USER_INPUT)
    with pytest.raises(ValueError, match=r"labels must be 2 integer class indices"):
        parity.compare(torch_model, flax_model, input_shape=USER_INPUT, labels=[0, 1, 2])
