"""Property tests of the weight port over random architectures (hypothesis): exact round trips, equal outputs.

Two families, drawn at random:

- stacks of 1-3 blocks of any of the notebooks' four kinds (PlainBlock, ResidualBlock, BasicBlock,
  BottleneckBlock) with random widths (1-8 channels), strides (1 or 2) and projection shortcuts, in an
  ``nn.Sequential`` / ``nnx.Sequential``: the widths and strides that the notebook classes fix;
- the notebooks' whole models from their constructors with random arguments: SimpleResNet and PlainDeepCNN
  (n_blocks), PlainNet (num_blocks per stage), ResNet, ResNetNoBN and ResNetDropout (Basic or Bottleneck block,
  1-2 blocks per stage, dropout p).

For each: every value random (weights scaled by 1/sqrt(fan_in) so activations stay O(1), BN statistics, a random
num_batches_tracked), then torch -> Flax -> torch and Flax -> torch -> Flax must give back every tensor bit for
bit, and the ported models must agree in float64 to a relative error of 1e-12 on random images (eval mode, and
train mode too where no dropout makes the two frameworks draw different masks). Small inputs: batch 2, 8-16
pixels square, sized so that the last feature map keeps at least 2x2 pixels: train-mode BatchNorm over the 2
values of a 1x1 map divides by a standard deviation that can be arbitrarily small, and a float64 rounding
difference then grows past 1e-12 (measured: 3.4e-12 on PlainNet [1, 2, 1, 2] at 8x8, train mode); at 16x16 the
same model agrees to 5e-15 (eval mode: 1e-15 at either size).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import flax_resnet as fr
import torch_ref as tr
from flax_resnet import parity

REL_TOL = parity.TOLERANCES["float64"].values  # 1e-12, the float64 parity bound; measured 5e-15 (above)
SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=False, database=None)


@dataclasses.dataclass(frozen=True)
class Arch:
    """A torch model and its Flax twin, built on demand, with the input they take."""

    name: str
    torch: Callable[[], torch.nn.Module] = dataclasses.field(repr=False)
    flax: Callable[[nnx.Rngs], nnx.Module] = dataclasses.field(repr=False)
    channels: int = 3
    size: int = 16
    dropout: bool = False


# ------------------------------------------------------------------------------------------ strategies
def _downsample(cin: int, cout: int, stride: int, rngs: nnx.Rngs | None):
    if rngs is None:
        return torch.nn.Sequential(torch.nn.Conv2d(cin, cout, 1, stride=stride, bias=False), torch.nn.BatchNorm2d(cout))
    return nnx.Sequential(fr.layers.Conv2d(cin, cout, 1, stride=stride, bias=False, rngs=rngs),
                          fr.layers.BatchNorm2d(cout, rngs=rngs))


def _block(kind: str, cin: int, width: int, stride: int, project: bool, rngs: nnx.Rngs | None):
    """One block of ``kind`` in torch (``rngs`` None) or Flax."""
    lib = tr if rngs is None else fr
    extra = {} if rngs is None else {"rngs": rngs}
    if kind in ("PlainBlock", "ResidualBlock"):
        return getattr(lib, kind)(cin, width, stride, **extra)
    block = getattr(lib, kind)
    downsample = _downsample(cin, width * block.expansion, stride, rngs) if project else None
    return block(cin, width, stride, downsample, **extra)


@st.composite
def block_stacks(draw) -> Arch:
    cin = channels = draw(st.integers(1, 6))
    specs = []
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["PlainBlock", "ResidualBlock", "BasicBlock", "BottleneckBlock"]))
        width, stride = draw(st.integers(1, 8)), draw(st.sampled_from([1, 2]))
        expansion = 4 if kind == "BottleneckBlock" else 1
        # the torch blocks need a projection when the shape changes; otherwise it is optional
        project = kind in ("BasicBlock", "BottleneckBlock") and (
            stride != 1 or channels != width * expansion or draw(st.booleans()))
        specs.append((kind, channels, width, stride, project))
        channels = width * expansion
    name = " -> ".join(f"{k}({c},{w},s{s}{',proj' if p else ''})" for k, c, w, s, p in specs)
    return Arch(name, lambda: torch.nn.Sequential(*(_block(*spec, None) for spec in specs)),
                lambda rngs: nnx.Sequential(*(_block(*spec, rngs) for spec in specs)),
                channels=cin, size=draw(st.sampled_from([12, 16])))


@st.composite
def notebook_models(draw) -> Arch:
    family = draw(st.sampled_from(["SimpleResNet", "PlainDeepCNN", "PlainNet", "ResNet", "ResNetNoBN",
                                   "ResNetDropout"]))
    if family in ("SimpleResNet", "PlainDeepCNN"):
        n = draw(st.integers(1, 2))
        return Arch(f"{family}(n_blocks={n})", lambda: getattr(tr, family)(n_blocks=n),
                    lambda rngs: getattr(fr, family)(n_blocks=n, rngs=rngs), size=draw(st.sampled_from([8, 16])))
    layers = draw(st.lists(st.integers(1, 2), min_size=4, max_size=4))
    if family == "PlainNet":
        return Arch(f"PlainNet(PlainBlock, {layers})", lambda: tr.PlainNet(tr.PlainBlock, layers),
                    lambda rngs: fr.PlainNet(fr.PlainBlock, layers, rngs=rngs))
    block = draw(st.sampled_from(["BasicBlock", "BottleneckBlock"]))
    kwargs = {"p": draw(st.sampled_from([0.1, 0.5]))} if family == "ResNetDropout" else {}
    return Arch(f"{family}({block}, {layers}, {kwargs})", lambda: getattr(tr, family)(getattr(tr, block), layers,
                                                                                      **kwargs),
                lambda rngs: getattr(fr, family)(getattr(fr, block), layers, **kwargs, rngs=rngs),
                dropout=family == "ResNetDropout")


# ------------------------------------------------------------------------------------------ helpers
def randomize_torch(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, value in model.state_dict().items():  # the state_dict's tensors share storage with the model
            if key.endswith("num_batches_tracked"):
                value.fill_(int(torch.randint(1, 10**6, (), generator=g)))
            elif key.endswith("running_var"):
                value.copy_(torch.rand(value.shape, generator=g, dtype=value.dtype) + 0.5)
            else:
                scale = 1 / np.sqrt(value[0].numel()) if value.dim() > 1 else 0.5
                value.copy_(scale * torch.randn(value.shape, generator=g, dtype=value.dtype))


def randomize_flax(model: nnx.Module, seed: int) -> None:
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = jax.tree_util.keystr(path)  # e.g. "['bn1']['var'].value"
        if jnp.issubdtype(leaf.dtype, jnp.integer):
            return jnp.asarray(rng.integers(1, 10**6, leaf.shape), leaf.dtype)
        if not jnp.issubdtype(leaf.dtype, jnp.floating):
            return leaf
        if "['var']" in name:
            return jnp.asarray(rng.uniform(0.5, 1.5, leaf.shape), leaf.dtype)
        fan_in = int(np.prod(leaf.shape[:-1])) if leaf.ndim > 1 else 4
        return jnp.asarray(rng.standard_normal(leaf.shape) / np.sqrt(fan_in), leaf.dtype)

    nnx.update(model, jax.tree_util.tree_map_with_path(fill, nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat))))


def flax_twin(arch: Arch) -> nnx.Module:
    """The Flax model in float64 with placeholder zeros, built abstractly (no initialiser is compiled)."""
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: arch.flax(nnx.Rngs(0))))

    def zeros(leaf):
        if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            return jax.random.key(0)
        dtype = jnp.float64 if jnp.issubdtype(leaf.dtype, jnp.floating) else leaf.dtype
        return jnp.asarray(np.zeros(leaf.shape, dtype))

    return nnx.merge(graphdef, jax.tree.map(zeros, abstract))


def torch_arrays(state_dict) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in state_dict.items()}


def flax_arrays(model: nnx.Module) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat)))]


def assert_bit_equal(got, want) -> None:
    if isinstance(want, dict):
        assert sorted(got) == sorted(want)
        got, want = [got[k] for k in sorted(got)], [want[k] for k in sorted(want)]
    assert len(got) == len(want) > 0
    for a, b in zip(got, want, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


def check(arch: Arch, seed: int) -> None:
    """Both round trips bit for bit, then equal outputs of the ported pair."""
    with jax.enable_x64(True):
        t = arch.torch().double()
        randomize_torch(t, seed)
        f = flax_twin(arch)
        fr.load_torch_state_dict(f, t.state_dict())
        assert_bit_equal(torch_arrays(fr.to_torch_state_dict(f)), torch_arrays(t.state_dict()))  # torch->Flax->torch

        g = flax_twin(arch)
        randomize_flax(g, seed + 1)
        back = fr.to_torch_state_dict(g)
        arch.torch().double().load_state_dict(back, strict=True)  # the torch twin takes it as it is
        h = flax_twin(arch)
        fr.load_torch_state_dict(h, back)
        assert_bit_equal(flax_arrays(h), flax_arrays(g))  # Flax -> torch -> Flax

        x = np.random.default_rng(seed).standard_normal((2, arch.channels, arch.size, arch.size))
        for train in ([False] if arch.dropout else [False, True]):
            t.train(train)
            f.train() if train else f.eval()
            with torch.no_grad():
                want = t(torch.from_numpy(x)).numpy()
            got = np.asarray(f(jnp.asarray(x.transpose(0, 2, 3, 1))))
            if want.ndim == 4:
                want = want.transpose(0, 2, 3, 1)
            assert got.shape == want.shape and got.dtype == np.float64
            assert rel_err(got, want) <= REL_TOL, (arch.name, "train" if train else "eval", rel_err(got, want))


@settings(max_examples=12, **SETTINGS)
@given(arch=block_stacks(), seed=st.integers(0, 2**16))
def test_random_block_stacks_port_exactly(arch: Arch, seed: int) -> None:
    check(arch, seed)


@settings(max_examples=8, **SETTINGS)
@given(arch=notebook_models(), seed=st.integers(0, 2**16))
def test_random_notebook_models_port_exactly(arch: Arch, seed: int) -> None:
    check(arch, seed)
