"""bf16 mixed precision (flax_resnet.precision): bf16 compute, float32 parameters, BatchNorm statistics and logits.

The trainer's hook is ``apply_precision(model, "bf16")`` on the built model, before ``training.train`` (or
``engine.init_train_state``); these tests go through the same calls.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flax_resnet import bench, builders, training
from flax_resnet.config import RunConfig
from flax_resnet.precision import apply_precision
from flax_resnet.training import engine


def tiny_model(seed: int = 0) -> nnx.Module:
    return builders.build_flax("SimpleResNet", {"n_blocks": 1}, seed=seed)


def compute_dtypes(model: nnx.Module) -> dict[str, str]:
    """Layer path -> computation dtype name ('default' when unset)."""
    return {"/".join(map(str, path)): "default" if module.dtype is None else jnp.dtype(module.dtype).name
            for path, module in nnx.iter_modules(model) if isinstance(module, nnx.Conv | nnx.BatchNorm | nnx.Linear)}


def float_dtypes(tree) -> set[str]:
    return {str(x.dtype) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)}


def one_step(model: nnx.Module, recipe, images: np.ndarray, labels: np.ndarray):
    tx = engine.make_optimizer(recipe, 10)
    graphdef, state = engine.init_train_state(model, tx)
    step = jax.jit(lambda s, x, y: engine.train_step(graphdef, tx, s, x, y))
    x = engine.normalize(jnp.asarray(images), recipe.mean, recipe.std)
    return graphdef, state, step, x, jnp.asarray(labels)


def test_apply_precision_changes_only_the_compute_dtypes():
    model = tiny_model()
    before = jax.tree.map(np.asarray, nnx.state(model))
    apply_precision(model, "bf16")
    assert set(compute_dtypes(model).values()) == {"bfloat16"}
    assert model.fc.preferred_element_type == jnp.float32
    after = nnx.state(model)
    assert float_dtypes(after) == {"float32"}
    jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.asarray, after))
    apply_precision(model, "fp32")  # reversible: back to the defaults
    assert set(compute_dtypes(model).values()) == {"default"}
    assert model.fc.preferred_element_type is None
    with pytest.raises(ValueError, match="unknown precision"):
        apply_precision(model, "fp16")  # type: ignore[arg-type]


def test_bf16_step_computes_in_bf16_and_keeps_float32_state(tiny_dataset, make_recipe):
    recipe = make_recipe("plain-vs-residual")
    model = apply_precision(tiny_model(), "bf16")
    graphdef, state, step, x, y = one_step(model, recipe, tiny_dataset.train_images[:16],
                                           tiny_dataset.train_labels[:16])
    # the convolutions run in bf16, the logits (and so the loss) are float32
    jaxpr = jax.make_jaxpr(step)(state, x, y)
    conv_dtypes = {str(e.invars[0].aval.dtype) for e in _eqns(jaxpr.jaxpr)
                   if e.primitive.name == "conv_general_dilated"}
    assert conv_dtypes == {"bfloat16"}
    merged = engine.merge_model(graphdef, state)
    merged.eval()
    assert merged(x).dtype == jnp.float32

    new, metrics = step(state, x, y)
    assert float_dtypes(new.params) == {"float32"}
    assert float_dtypes(new.model_state) == {"float32"}
    assert float_dtypes(new.opt_state) == {"float32"}
    assert np.isfinite(float(metrics.loss_of_batches))
    # running statistics carry float32 precision: not every value is a bf16 number (they would be, were they
    # updated in bf16)
    bn = engine.merge_model(graphdef, new).bn1
    for stat in (bn.mean[...], bn.var[...]):
        stat = np.asarray(stat)
        assert not np.array_equal(stat, np.asarray(jnp.asarray(stat).astype(jnp.bfloat16).astype(jnp.float32)))


def test_bf16_logits_are_close_to_fp32(tiny_dataset):
    x = engine.normalize(jnp.asarray(tiny_dataset.test_images[:16]), (0.5,) * 3, (0.25,) * 3)
    fp32, bf16 = tiny_model(seed=1), apply_precision(tiny_model(seed=1), "bf16")
    for m in (fp32, bf16):
        m.eval()
    ref, half = np.asarray(fp32(x)), np.asarray(bf16(x))
    # bf16 keeps 8 bits of mantissa: relative error of a few 1e-3 per op, ~1e-2 through the network
    np.testing.assert_allclose(half, ref, atol=0.05 * np.abs(ref).max(), rtol=0.05)


def test_bf16_training_learns(small_dataset, make_recipe):
    """The fp32 run of tests/test_training.py reaches 93-99%; bf16 must still learn far above chance (10%)."""
    recipe = make_recipe("plain-vs-residual", epochs=3, batch_size=32, eval_batch_size=128, milestones=(2,))
    model = apply_precision(tiny_model(seed=0), "bf16")
    result = training.train(RunConfig(recipe, precision="bf16"), model=model, dataset=small_dataset)
    history = result.history
    assert history["test_acc"][-1] > 60.0, history
    assert history["train_loss"][-1] < history["train_loss"][0], history
    assert float_dtypes(result.state.params) == {"float32"}
    assert float_dtypes(result.state.model_state) == {"float32"}


_eqns = bench.iter_eqns
