"""Training parity: the Flax trainer and the notebooks' torch loops, step for step, across an epoch boundary.

Both sides start from the same weights (torch's initialisation, ported), see the same batches (the epoch plans
of ``flax_resnet.plan``: same order, crops and flips, gathered on each side in its own framework), use the same
optimiser (SGD, coupled weight decay, momentum) and the same per-epoch schedule. Both run through the one
training loop, ``flax_resnet.training.train``: the Flax side with the single-device runner, the torch side with
the notebooks' ``train_one_epoch``/``train_epoch``/``evaluate``.

- float64, 40 images in batches of 4, 2 epochs = 20 steps: every per-step loss, every parameter, every BatchNorm
  running statistic and ``num_batches_tracked``, and the per-epoch history agree to a relative 1e-9.
- float32, 12 images, 3 steps: the same to 1e-4 (rounding differences grow through training in float32).

Two models:

- SimpleResNet(1) (notebook 000; projection shortcuts in stages 2 and 3) with notebook 000's recipe and a
  milestone after epoch 1, so the learning rate drops inside the 20 steps;
- notebook 004's ``ResNet(BottleneckBlock, [1, 1, 1, 1])`` with its cosine schedule and crop + flip, on 8x8
  images (the network is fully convolutional; 16x cheaper than 32x32, which float64 on a CPU needs) and with
  the learning rate scaled down to 1e-4. Why: at lr 0.1 (or 0.01, or 0.001) and batch 4 this wide network's
  trajectory is chaotic (measured: the loss jumps to 20-90 at lr 0.1), so rounding differences of 1e-16 grow
  about tenfold per step to 1e-7 by step 20 whatever the implementation; with lr ~ 0 the losses agree to
  1e-15 for all 20 steps, and at 1e-4 to 2e-12 (weights 2e-11), which leaves the 1e-9 bound a wide margin
  while a wrong update rule (decay, momentum, schedule) would still show at 1e-8 or more.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import flax_resnet.models as fm
import torch_ref.models as tm
from flax_resnet import parity, training
from flax_resnet.config import OutputConfig, RunConfig
from flax_resnet.data import synthetic_dataset
from flax_resnet.data.plan import steps_per_epoch
from flax_resnet.port import load_torch_state_dict, to_torch_state_dict
from flax_resnet.recipes import RECIPES, Recipe

# float64, test-only: looser than parity.TOLERANCES["float64"].values (1e-12), which bounds one step. Over 20
# training steps rounding differences grow: the bottleneck ResNet's losses agree to 2e-12 and its weights to 2e-11
# at lr 1e-4 (measured; the docstring above), while a wrong update rule shows at 1e-8 or more.
F64_TOL = 1e-9
# float32: compare_training's own bound for the loss, parameters and running statistics (1e-4; SimpleResNet(1)
# measured 1.5e-6 with seeds 0-2, the docstring above)
F32_TOL = parity.TOLERANCES["float32"].values
SEED = 3  # of the batch stream
# The float32 comparison uses another stream. Why: with seed 3's batches, one pre-activation of stage1.0.bn1 lies
# within float32 rounding of zero at step 2 of SimpleResNet(1), so the two frameworks' ReLUs disagree on its sign
# there: a relative 2.3e-3 in that BatchNorm bias after three steps (measured), the float32 spike the differences
# table names. Seeds 0, 1 and 2 agree to 1.5e-6 (measured). float64, where no such tie occurs, keeps seed 3.
F32_SEED = 0


def fit(model, config, dataset, *, out_dir=None, resume=False, overwrite=False, max_to_keep=3, **kw):
    """``training.train`` with ``model`` and ``dataset`` given and the outputs in ``config.output``."""
    output = OutputConfig(out_dir, resume=resume, overwrite=overwrite, max_to_keep=max_to_keep)
    return training.train(config.replace(output=output), model=model, dataset=dataset, **kw)


@pytest.fixture(scope="module", autouse=True)
def x64():
    """float64 in JAX for this module, restored afterwards (the float32 case switches it off inside)."""
    with jax.enable_x64(True):
        yield


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    torch_model: Callable[[], torch.nn.Module]
    flax_model: Callable[[nnx.Rngs], nnx.Module]
    recipe: Recipe
    image_size: int = 32


CASES = [
    Case("SimpleResNet1-multistep",
         lambda: tm.SimpleResNet(n_blocks=1),
         lambda rngs: fm.SimpleResNet(n_blocks=1, rngs=rngs),
         dataclasses.replace(RECIPES["plain-vs-residual"], epochs=2, batch_size=4, eval_batch_size=8,
                             milestones=(1,))),
    Case("BottleneckResNet1111-cosine-augment",
         lambda: tm.ResNet(tm.BottleneckBlock, [1, 1, 1, 1]),
         lambda rngs: fm.ResNet(fm.BottleneckBlock, [1, 1, 1, 1], rngs=rngs),
         dataclasses.replace(RECIPES["resnet18-cifar"], epochs=2, batch_size=4, eval_batch_size=8, lr=1e-4),
         image_size=8),
]


def relative_error(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b| / max |b| over a tensor (0 for two zero tensors)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = np.max(np.abs(b)) if b.size else 0.0
    diff = np.max(np.abs(a - b)) if b.size else 0.0
    return float(diff / scale) if scale > 0 else float(diff)


def flax_twin(case: Case, dtype) -> nnx.Module:
    """The Flax model with zeros for weights, to be overwritten by the port: its own initialisation would be
    thrown away, and it costs seconds (eager random draws compile once per weight shape)."""
    model = nnx.eval_shape(lambda: case.flax_model(nnx.Rngs(0)))

    def zeros(leaf):
        floating = jnp.issubdtype(leaf.dtype, jnp.floating)
        return jax.device_put(np.zeros(leaf.shape, dtype if floating else leaf.dtype))

    nnx.update(model, jax.tree.map(zeros, nnx.state(model)))
    return model


def train_both(case: Case, dtype, num_train: int, num_test: int, epochs: int, seed: int = SEED):
    """Train the pair from the same weights on the same batches (stream ``seed``); returns both sides' outcomes."""
    recipe = dataclasses.replace(case.recipe, epochs=epochs)
    dataset = synthetic_dataset(num_train=num_train, num_test=num_test, seed=1, image_size=case.image_size)

    torch.manual_seed(0)
    torch_model = case.torch_model()
    if dtype == jnp.float64:
        torch_model = torch_model.double()
    flax_model = flax_twin(case, dtype)
    load_torch_state_dict(flax_model, torch_model.state_dict())  # copies: torch updates its tensors in place

    spe = steps_per_epoch(num_train, recipe.batch_size)
    flax_losses: list[float] = []
    torch_losses: list[float] = []
    dtype_name = jnp.dtype(dtype).name
    result = fit(flax_model, RunConfig(recipe, seed=seed, dtype=dtype_name), dataset,
                            on_step=lambda step, loss: flax_losses.append(loss()))
    torch_history = fit(torch_model, RunConfig(recipe, framework="torch", seed=seed, dtype=dtype_name),
                                   dataset, on_step=lambda step, loss: torch_losses.append(loss())).history
    return dict(flax_losses=flax_losses, torch_losses=torch_losses, flax_history=result.history,
                torch_history=torch_history, flax_weights=to_torch_state_dict(flax_model),  # trained in place
                torch_weights=torch_model.state_dict(), steps=spe * epochs)


def check(out: dict, tol: float, exact_accuracy: bool) -> None:
    assert len(out["flax_losses"]) == len(out["torch_losses"]) == out["steps"]
    losses = [relative_error(a, b) for a, b in zip(out["flax_losses"], out["torch_losses"], strict=True)]
    assert max(losses) <= tol, f"per-step loss relative errors {losses}"

    flax_w, torch_w = out["flax_weights"], out["torch_weights"]
    assert sorted(flax_w) == sorted(torch_w)  # (a model made by nnx.eval_shape lists its layers sorted)
    errors = {}
    for key, expected in torch_w.items():
        got = flax_w[key].numpy()
        if key.endswith("num_batches_tracked"):
            assert int(got) == int(expected) == out["steps"], key
            continue
        assert got.dtype == expected.numpy().dtype, key
        errors[key] = relative_error(got, expected.numpy())
    worst = max(errors, key=errors.get)
    assert errors[worst] <= tol, f"{worst}: relative error {errors[worst]:.3g}"
    assert any(k.endswith("running_var") for k in errors) and any(k.endswith("running_mean") for k in errors)

    fh, th = out["flax_history"], out["torch_history"]
    for key in ("train_loss", "test_loss"):
        assert max(relative_error(a, b) for a, b in zip(fh[key], th[key], strict=True)) <= tol, key
    np.testing.assert_allclose(fh["lr"], th["lr"], rtol=1e-6)  # the Flax lr is read back in float32
    if exact_accuracy:
        assert fh["train_acc"] == th["train_acc"] and fh["test_acc"] == th["test_acc"]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_float64_twenty_steps_across_an_epoch_boundary(case):
    out = train_both(case, jnp.float64, num_train=40, num_test=12, epochs=2)
    assert out["steps"] == 20
    check(out, F64_TOL, exact_accuracy=True)
    if case.recipe.schedule == "multistep":  # the milestone fell inside the run
        assert out["torch_history"]["lr"] == pytest.approx([0.1, 0.01])
    else:  # CosineAnnealingLR(T_max=2)
        assert out["torch_history"]["lr"] == pytest.approx([case.recipe.lr, case.recipe.lr / 2])


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_float32_three_steps(case):
    with jax.enable_x64(False):
        out = train_both(case, jnp.float32, num_train=12, num_test=8, epochs=1, seed=F32_SEED)
    assert out["steps"] == 3
    check(out, F32_TOL, exact_accuracy=False)
