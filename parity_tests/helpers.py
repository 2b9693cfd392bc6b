"""Shared pieces of the parity tests: the model table, layout conversions, error measures, model pairs.

Every model of the two notebooks appears once in ``CASES`` as a torch constructor and its Flax twin, with an
input shape that suits it (blocks take feature maps, not RGB images). Tests iterate over the table, so a model
added to it is tested everywhere.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import torch.nn.functional as F
from flax import nnx

import flax_resnet as fr
import torch_ref as tr
from flax_resnet.parity import TOLERANCES, perturb_batchnorm

# float64: parity.TOLERANCES' own bounds (values 1e-12, gradients 1e-10), for the same measure (``rel_err``).
F64_TOL = TOLERANCES["float64"].values
GRAD_TOL = TOLERANCES["float64"].gradients
# float32, test-only: 10x tighter than TOLERANCES["float32"].values (1e-4, which must hold for any model and input a
# user brings, where a ReLU's sign can flip). On these cases' fixed inputs the worst is 2.1e-6 (ResNet18, batch 4,
# 32x32, train mode; measured on a CPU), ResNet-50 apart (its own 5e-5 below), so 1e-5 keeps a margin of about 5
# and shows a float32-only drift ten times earlier. Unit roundoff 2**-24 ~ 6e-8; a conv output sums up to
# C*k*k ~ 4600 products whose rounding errors add up like a random walk (~4e-6), then a few dozen layers.
F32_TOL = 1e-5

# ---------------------------------------------------------------------------------------------- devices
GPU = jax.default_backend() == "gpu" and torch.cuda.is_available()
TORCH_DEVICE = torch.device("cuda" if GPU else "cpu")


# ------------------------------------------------------------------------------------------- the models
def _torch_downsample(cin: int, cout: int, stride: int) -> torch.nn.Sequential:
    return torch.nn.Sequential(torch.nn.Conv2d(cin, cout, kernel_size=1, stride=stride, bias=False),
                               torch.nn.BatchNorm2d(cout))


def _flax_downsample(cin: int, cout: int, stride: int, rngs: nnx.Rngs) -> nnx.Sequential:
    return nnx.Sequential(fr.layers.Conv2d(cin, cout, 1, stride=stride, bias=False, rngs=rngs),
                          fr.layers.BatchNorm2d(cout, rngs=rngs))


@dataclass(frozen=True)
class Case:
    """A torch model and its Flax twin, with the NCHW input shape (torch's) the tests feed them."""

    id: str
    torch: Callable[[], torch.nn.Module]
    flax: Callable[[nnx.Rngs], nnx.Module]
    input_shape: tuple[int, int, int, int] = (4, 3, 32, 32)
    marks: tuple = field(default=())
    dropout: bool = False  # torch's and JAX's dropout masks differ: compare in eval mode only
    f32_tol: float = F32_TOL

    @property
    def param(self):
        """This case as a ``pytest.param`` with its id and marks."""
        return pytest.param(self, id=self.id, marks=self.marks)


BLOCK_INPUT = (4, 16, 8, 8)  # feature maps for the blocks: even size, so stride 2 exercises the padding rule

CASES: list[Case] = [
    Case("PlainBlock", lambda: tr.PlainBlock(16, 32, stride=2),
         lambda rngs: fr.PlainBlock(16, 32, stride=2, rngs=rngs), BLOCK_INPUT),
    Case("PlainDeepCNN", lambda: tr.PlainDeepCNN(n_blocks=2), lambda rngs: fr.PlainDeepCNN(n_blocks=2, rngs=rngs)),
    Case("ResidualBlock-identity", lambda: tr.ResidualBlock(16, 16),
         lambda rngs: fr.ResidualBlock(16, 16, rngs=rngs), BLOCK_INPUT),
    Case("ResidualBlock-projection", lambda: tr.ResidualBlock(16, 32, stride=1),
         lambda rngs: fr.ResidualBlock(16, 32, stride=1, rngs=rngs), BLOCK_INPUT),
    Case("ResidualBlock-projection-stride2", lambda: tr.ResidualBlock(16, 32, stride=2),
         lambda rngs: fr.ResidualBlock(16, 32, stride=2, rngs=rngs), BLOCK_INPUT),
    Case("SimpleResNet", lambda: tr.SimpleResNet(n_blocks=2), lambda rngs: fr.SimpleResNet(n_blocks=2, rngs=rngs)),
    Case("PlainNet", lambda: tr.PlainNet(tr.PlainBlock, [1, 1, 1, 1]),
         lambda rngs: fr.PlainNet(fr.PlainBlock, [1, 1, 1, 1], rngs=rngs)),
    Case("BasicBlock", lambda: tr.BasicBlock(16, 16), lambda rngs: fr.BasicBlock(16, 16, rngs=rngs), BLOCK_INPUT),
    Case("BasicBlock-downsample", lambda: tr.BasicBlock(16, 32, 2, _torch_downsample(16, 32, 2)),
         lambda rngs: fr.BasicBlock(16, 32, 2, _flax_downsample(16, 32, 2, rngs), rngs=rngs), BLOCK_INPUT),
    Case("BottleneckBlock-downsample", lambda: tr.BottleneckBlock(16, 8, 2, _torch_downsample(16, 32, 2)),
         lambda rngs: fr.BottleneckBlock(16, 8, 2, _flax_downsample(16, 32, 2, rngs), rngs=rngs), BLOCK_INPUT),
    Case("ResNet18", tr.ResNet18, lambda rngs: fr.ResNet18(rngs=rngs)),
    Case("ResNet34", tr.ResNet34, lambda rngs: fr.ResNet34(rngs=rngs), marks=(pytest.mark.slow,)),
    # 53 conv+BN layers in train mode: float32 rounding alone puts torch's own float32 output 0.8-1.1e-5 from
    # its float64 one (measured, batch 2), Flax's 1.2-1.5e-5, and the two float32 results 1.5-1.8e-5 apart
    # (2.0-2.4e-5 at batch 4). The float64 comparison (1e-12; measured 7e-14) is the parity proof; this bound
    # leaves float32 a margin of about 3.
    Case("ResNet50", tr.ResNet50, lambda rngs: fr.ResNet50(rngs=rngs), (2, 3, 32, 32), marks=(pytest.mark.slow,),
         f32_tol=5e-5),
    Case("SimpleNet", tr.SimpleNet, lambda rngs: fr.SimpleNet(rngs=rngs)),
    Case("ResNet18NoBN", tr.ResNet18NoBN, lambda rngs: fr.ResNet18NoBN(rngs=rngs)),
    Case("ResNet18Dropout", tr.ResNet18Dropout, lambda rngs: fr.ResNet18Dropout(rngs=rngs), dropout=True),
]
CASE_PARAMS = [case.param for case in CASES]
CASES_BY_ID = {case.id: case for case in CASES}


# ---------------------------------------------------------------------------------------- conversions
def to_nhwc(x: np.ndarray) -> np.ndarray:
    """NCHW (torch) -> NHWC (Flax); arrays of other ranks are returned unchanged."""
    return np.transpose(x, (0, 2, 3, 1)) if x.ndim == 4 else x


def to_nchw(x: np.ndarray) -> np.ndarray:
    """NHWC (Flax) -> NCHW (torch); arrays of other ranks are returned unchanged."""
    return np.transpose(x, (0, 3, 1, 2)) if x.ndim == 4 else x


def numpy(value) -> np.ndarray:
    """A torch tensor or JAX array as a numpy array on the host."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)


# ---------------------------------------------------------------------------------------- error measures
def rel_err(a, b) -> float:
    """Relative error of ``a`` against the reference ``b``: max|a - b| / max|b| (over all elements).

    Normalising by the largest reference value, not element by element, keeps entries near zero (where
    any rounding is a large relative change) from dominating; the measure ``parity.compare`` reports. Tolerances:
    ``F64_TOL`` and ``GRAD_TOL`` (parity.TOLERANCES' float64 ones), ``F32_TOL`` (tighter than its float32 one; the
    reason above it). If ``b`` is all zeros this is max|a|.
    """
    a, b = numpy(a).astype(np.float64), numpy(b).astype(np.float64)
    assert a.shape == b.shape, f"shapes differ: {a.shape} vs {b.shape}"
    scale = np.max(np.abs(b)) if b.size else 0.0
    diff = np.max(np.abs(a - b)) if a.size else 0.0
    return float(diff / scale) if scale > 0 else float(diff)


def assert_close(a, b, tol: float, what: str = "") -> None:
    """Assert ``rel_err(a, b) <= tol`` with a message that says by how much it failed."""
    err = rel_err(a, b)
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol:g}"


# ------------------------------------------------------------------------------------------ model pairs
def torch_model(case: Case, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The case's torch model, initialised under ``torch.manual_seed(seed)``, on the test device."""
    torch.manual_seed(seed)
    return case.torch().to(device=TORCH_DEVICE, dtype=dtype)


def flax_twin(case: Case, dtype=jnp.float64) -> nnx.Module:
    """The case's Flax model with placeholder values (zeros), built without running its initialisers.

    For tests that port torch's weights in anyway: ``nnx.eval_shape`` only traces the constructor (once per
    case and process), which saves compiling every initialiser (seconds per model on a CPU); each call merges
    that structure with fresh zeros, floating-point variables in ``dtype``. Flax's own initialisation is
    tested in ``test_init_distribution``. Note: like every model that went through ``nnx.split``/``merge``,
    its attributes are in alphabetical order, so ``to_torch_state_dict`` lists the (same) keys in another order.
    """
    graphdef, abstract = _abstract_model(case.id)

    def placeholder(leaf: jax.ShapeDtypeStruct) -> jax.Array:
        if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            return jax.random.key(0)
        leaf_dtype = dtype if jnp.issubdtype(leaf.dtype, jnp.floating) else leaf.dtype
        return jnp.asarray(np.zeros(leaf.shape, leaf_dtype))  # from numpy: no compilation per shape

    return nnx.merge(graphdef, jax.tree.map(placeholder, abstract))


@functools.cache
def _abstract_model(case_id: str):
    return nnx.split(nnx.eval_shape(lambda: CASES_BY_ID[case_id].flax(nnx.Rngs(0))))


def ported_pair(case: Case, seed: int = 0, dtype: str = "float64", perturb: bool = True):
    """``(torch_model, flax_model)``: the torch model's random init (BatchNorm perturbed) ported into Flax."""
    torch_dtype, jax_dtype = {"float32": (torch.float32, jnp.float32), "float64": (torch.float64, jnp.float64)}[dtype]
    t = torch_model(case, seed, torch_dtype)
    if perturb:
        perturb_batchnorm(t, seed)
    f = flax_twin(case, jax_dtype)
    fr.load_torch_state_dict(f, t.state_dict())
    return t, f


def random_input(case: Case, seed: int = 0, dtype=np.float64) -> np.ndarray:
    """A unit-normal NCHW batch of the case's input shape (torch's layout)."""
    return np.random.default_rng(seed).standard_normal(case.input_shape).astype(dtype)


def torch_forward(model: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    """torch output for an NCHW numpy batch (no gradients), as numpy."""
    with torch.no_grad():
        return numpy(model(torch.from_numpy(x).to(TORCH_DEVICE)))


def flax_forward(model: nnx.Module, x: np.ndarray) -> np.ndarray:
    """Flax output for an NCHW numpy batch (transposed to NHWC and back), as numpy in torch's layout."""
    return to_nchw(numpy(model(jnp.asarray(to_nhwc(x)))))


def state_arrays(state_dict) -> dict[str, np.ndarray]:
    """A torch ``state_dict`` (torch tensors) as numpy arrays, same keys and order."""
    return {key: numpy(value) for key, value in state_dict.items()}


def flax_torch_state(model: nnx.Module) -> dict[str, np.ndarray]:
    """The Flax model's variables under torch's names and layouts, as numpy arrays (via the port)."""
    return state_arrays(fr.to_torch_state_dict(model))


def flax_param_count(model: nnx.Module) -> int:
    """Number of trainable values: the sizes of all ``nnx.Param`` variables."""
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)))


def torch_param_count(model: torch.nn.Module) -> int:
    """The notebooks' count: ``sum(p.numel() for p in model.parameters())``."""
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------------------------- losses
def labels_for(logits_shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Fixed random class labels for a batch of logits of this shape."""
    batch, num_classes = logits_shape
    return np.random.default_rng(seed + 7).integers(0, num_classes, batch)


def _logits_torch(out: torch.Tensor) -> torch.Tensor:
    return out.mean(dim=(2, 3)) if out.ndim == 4 else out  # blocks: global average pool of the feature map


def _logits_flax(out: jax.Array) -> jax.Array:
    return out.mean(axis=(1, 2)) if out.ndim == 4 else out


def torch_loss_and_grads(model: torch.nn.Module, x: np.ndarray, seed: int = 0):
    """Cross-entropy of the model's logits against ``labels_for`` labels; ``(loss, {name: grad})``.

    A block's logits are its average-pooled feature map. Gradients of every parameter, by torch name.
    """
    model.zero_grad(set_to_none=True)
    logits = _logits_torch(model(torch.from_numpy(x).to(TORCH_DEVICE)))
    labels = torch.from_numpy(labels_for(tuple(logits.shape), seed)).to(TORCH_DEVICE)
    loss = F.cross_entropy(logits, labels)
    loss.backward()
    return loss.item(), {name: numpy(p.grad) for name, p in model.named_parameters()}


def _flax_loss(model: nnx.Module, x: jax.Array, seed: int) -> jax.Array:
    logits = _logits_flax(model(x))
    labels = jnp.asarray(labels_for(tuple(logits.shape), seed))  # shapes are static under tracing
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


_flax_value_and_grad = nnx.jit(nnx.value_and_grad(_flax_loss), static_argnums=2)


def flax_loss_and_grads(model: nnx.Module, x: np.ndarray, seed: int = 0):
    """The same loss in Flax with ``nnx.value_and_grad`` (under ``nnx.jit``: one compilation per model is
    cheaper on a CPU than compiling each operation of an eager backward pass); gradients mapped to torch names
    by the port.

    Generic: the gradient State has the model's parameter structure, so it is loaded into a copy of the
    model in place of the parameters, and the port names and lays out each tensor as torch does. Returns
    ``(loss, {name: grad})`` for the trainable tensors (weights and biases, not BN running statistics).
    """
    loss, grads = _flax_value_and_grad(model, jnp.asarray(to_nhwc(x)), seed)
    holder = nnx.clone(model)
    nnx.update(holder, grads)
    named = flax_torch_state(holder)
    return float(loss), {k: v for k, v in named.items() if k.rsplit(".", 1)[-1] in ("weight", "bias")}


# --------------------------------------------------------------------------------------------- training
def train_forwards(torch_model_: torch.nn.Module, flax_model_: nnx.Module, case: Case, steps: int,
                   seed: int = 100, dtype=np.float64) -> list[tuple[np.ndarray, np.ndarray]]:
    """``steps`` train-mode forwards through both models on the same random batches.

    BatchNorm updates its running statistics on every one. Returns each step's ``(torch_out, flax_out)``.
    """
    torch_model_.train()
    flax_model_.train()
    outputs = []
    for step in range(steps):
        x = random_input(case, seed + step, dtype) * (1.0 + step) + 0.3 * step  # moving statistics
        outputs.append((torch_forward(torch_model_, x), flax_forward(flax_model_, x)))
    return outputs
