"""The training engine's pure core: optimiser, augmentation and normalisation, train and eval steps.

Everything here is a pure function of arrays, so one step serves one device (``jax.jit``), ``jax.pmap`` and
``jax.jit`` + ``jax.shard_map``: collectives are named by ``axis_name`` and skipped when it is ``None``. The runners
gather each batch from the epoch plan (``flax_resnet.data.plan``) on the device, inside the compiled step.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from flax_resnet.data import plan
from flax_resnet.recipes import Recipe


# --------------------------------------------------------------------------------------------- optimiser
def epoch_learning_rate(recipe: Recipe, epoch: int | jax.Array) -> jax.Array:
    """The learning rate torch's per-epoch scheduler gives in ``epoch`` (0-based); works on jnp and ints."""
    if recipe.schedule == "multistep":
        return recipe.lr * jnp.power(recipe.gamma, sum(epoch >= m for m in recipe.milestones))  # milestones passed
    if recipe.schedule == "cosine":  # CosineAnnealingLR(T_max=epochs, eta_min=0)
        return recipe.lr * 0.5 * (1 + jnp.cos(jnp.pi * epoch / recipe.epochs))
    return recipe.lr * jnp.ones_like(jnp.asarray(epoch, jnp.float32))


def make_optimizer(recipe: Recipe, steps_per_epoch: int) -> optax.GradientTransformation:
    """torch's ``SGD(lr, momentum, weight_decay)``: coupled decay g + wd * p on every parameter, then momentum,
    with torch's per-epoch schedule as a per-step one: lr(step) = epoch_lr(step // steps_per_epoch).

    optax's trace starts at zero, so its first step is g, as torch's momentum buffer is on its first step.
    """
    return optax.chain(
        optax.add_decayed_weights(recipe.weight_decay),
        optax.sgd(lambda step: epoch_learning_rate(recipe, step // steps_per_epoch), momentum=recipe.momentum or None),
    )


# ---------------------------------------------------------------------------------------------- state
class TrainState(NamedTuple):
    """Everything that changes during training, as a pytree (checkpointed as a whole)."""

    params: nnx.State  # nnx.Param variables
    model_state: nnx.State  # everything else of the model: BatchNorm statistics, dropout RNG state
    opt_state: Any
    step: jax.Array  # optimizer steps taken


def init_train_state(model: nnx.Module, tx: optax.GradientTransformation) -> tuple[nnx.GraphDef, TrainState]:
    """Split an NNX model into its static graph and a pure ``TrainState``."""
    graphdef, params, model_state = nnx.split(model, nnx.Param, ...)
    return graphdef, TrainState(params, model_state, tx.init(params), jnp.zeros((), jnp.int32))


def merge_model(graphdef: nnx.GraphDef, state: TrainState) -> nnx.Module:
    """The NNX model that ``state`` holds (for evaluation, export and porting)."""
    return nnx.merge(graphdef, state.params, state.model_state)


# -------------------------------------------------------------------------------------- batch stream
def normalize(images_u8: jax.Array, mean, std, dtype=jnp.float32) -> jax.Array:
    """uint8 NHWC -> (x / 255 - mean) / std: torchvision's ToTensor + Normalize, bit for bit as torch computes it.

    Why a table: XLA rewrites ``x / 255`` as ``x * (1 / 255)``, one ulp off torch's (IEEE) division for 80% of the
    values (measured, float32); in float32 that grows through training to a relative 2e-3 in a BatchNorm bias
    within three steps, which would hide real differences in the parity tests. A uint8 has 256 values, so the
    256 x C results are computed once on the host with NumPy's IEEE arithmetic (as torch does), and the device
    only looks them up. bfloat16 looks up the float32 values, rounded.
    """
    host = np.dtype(np.float32) if jnp.dtype(dtype) == jnp.bfloat16 else np.dtype(dtype)
    levels = np.arange(256, dtype=host)[:, None]
    table = (levels / host.type(255.0) - np.asarray(mean, host)) / np.asarray(std, host)  # (256, C)
    return jnp.asarray(table, dtype)[images_u8.astype(jnp.int32), jnp.arange(table.shape[1])]


def augment(images_u8: jax.Array, offsets: jax.Array, flips: jax.Array) -> jax.Array:
    """RandomCrop(32, padding=4) with zero padding, then RandomHorizontalFlip, on device, on uint8 NHWC."""
    n, h, w, c = images_u8.shape
    p = plan.CROP_PADDING
    padded = jnp.pad(images_u8, ((0, 0), (p, p), (p, p), (0, 0)))

    def crop(img, off):
        return jax.lax.dynamic_slice(img, (off[0], off[1], jnp.zeros_like(off[0])), (h, w, c))

    cropped = jax.vmap(crop)(padded, offsets)
    return jnp.where(flips[:, None, None, None], cropped[:, :, ::-1, :], cropped)


# ---------------------------------------------------------------------------------------------- steps
NO_STEP = np.iinfo(np.int32).max  # ``Metrics.first_nonfinite`` when every loss was finite


class Metrics(NamedTuple):
    """Sums over an epoch, kept on device; the notebooks' averages are taken on the host at epoch end.

    ``first_nonfinite`` is not a sum but a minimum: the first optimizer step (``TrainState.step`` before it, so
    0-based and global) whose loss was nan or inf, ``NO_STEP`` if none. It lets the trainer name the step where a
    run diverged from the one read per epoch, without a host sync per step.
    """

    loss_x_count: jax.Array  # sum of batch-mean loss * batch size  (notebook 000: mean over samples)
    loss_of_batches: jax.Array  # sum of batch-mean losses           (notebook 004: mean over batches)
    correct: jax.Array
    count: jax.Array
    batches: jax.Array
    first_nonfinite: jax.Array

    def __add__(self, other: Metrics) -> Metrics:  # type: ignore[override]
        sums = (a + b for a, b in zip(self[:-1], other[:-1], strict=True))
        return Metrics(*sums, jnp.minimum(self.first_nonfinite, other.first_nonfinite))


def _psum(x, axis_name):
    return x if axis_name is None else jax.lax.psum(x, axis_name)


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean cross-entropy over the batch, torch's ``nn.CrossEntropyLoss()``."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, state: TrainState,
               images: jax.Array, labels: jax.Array, axis_name: str | None = None
               ) -> tuple[TrainState, Metrics]:
    """One SGD step on one device's share of the batch; pure. With ``axis_name``, the loss is the mean over the
    global batch: each device's mean loss is averaged (``pmean``) and so are the gradients, which equals one
    device's gradient of the global mean when every device holds the same number of samples. BatchNorm
    synchronises through its own ``axis_name``."""
    model = nnx.merge(graphdef, state.params, state.model_state)
    model.train()

    def loss_fn(model):
        logits = model(images)
        return cross_entropy(logits, labels), logits

    # nnx.value_and_grad differentiates the Params and carries the BatchNorm updates out of the trace.
    (loss, logits), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    model_state = nnx.state(model, nnx.Not(nnx.Param))
    if axis_name is not None:
        grads = jax.lax.pmean(grads, axis_name)
        loss = jax.lax.pmean(loss, axis_name)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    count = _psum(jnp.asarray(labels.shape[0], jnp.int32), axis_name)
    correct = _psum(jnp.sum(jnp.argmax(logits, -1) == labels).astype(jnp.int32), axis_name)
    # the loss is already averaged over devices, so every device records the same step
    first_nonfinite = jnp.where(jnp.isfinite(loss), NO_STEP, state.step).astype(jnp.int32)
    metrics = Metrics(loss * count, loss, correct, count, jnp.ones((), jnp.int32), first_nonfinite)
    return TrainState(params, model_state, opt_state, state.step + 1), metrics


def eval_step(graphdef: nnx.GraphDef, state: TrainState, images: jax.Array, labels: jax.Array,
              mask: jax.Array, axis_name: str | None = None) -> Metrics:
    """Eval-mode loss and accuracy of a (padded) batch; ``mask`` marks the real samples."""
    model = nnx.merge(graphdef, state.params, state.model_state)
    model.eval()
    logits = model(images)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    count = _psum(jnp.sum(mask).astype(jnp.int32), axis_name)
    loss_sum = _psum(jnp.sum(losses * mask.astype(losses.dtype)), axis_name)
    correct = _psum(jnp.sum((jnp.argmax(logits, -1) == labels) & mask).astype(jnp.int32), axis_name)
    return Metrics(loss_sum, loss_sum / jnp.maximum(count, 1), correct, count, jnp.ones((), jnp.int32),
                   jnp.full((), NO_STEP, jnp.int32))
