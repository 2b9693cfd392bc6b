"""The training engine's pure core: optimiser, batch stream, augmentation, train and eval steps.

Everything here is a pure function of arrays, so one step serves one device (``jax.jit``), ``jax.pmap`` and
``jax.jit`` + ``jax.shard_map``: collectives are named by ``axis_name`` and skipped when it is ``None``.
The loop around it (progress, history, checkpoints) lives in ``flax_resnet.trainer``.

The batch stream (``EpochPlan``) is data too: the permutation, crop offsets and flips of an epoch are drawn
from ``(seed, epoch)`` alone, so a resumed run sees the batches an uninterrupted run would have seen, and the
torch reference can be fed exactly the same batches.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from flax_resnet.recipes import Recipe, epoch_learning_rate

CROP_PADDING = 4


# --------------------------------------------------------------------------------------------- optimiser
def make_schedule(recipe: Recipe, steps_per_epoch: int) -> optax.Schedule:
    """Per-step schedule equal to torch's per-epoch scheduler: lr(step) = epoch_lr(step // steps_per_epoch)."""

    def schedule(step):
        return epoch_learning_rate(recipe, step // steps_per_epoch)

    return schedule


def make_optimizer(recipe: Recipe, steps_per_epoch: int) -> optax.GradientTransformation:
    """torch's ``SGD(lr, momentum, weight_decay)``: coupled decay g + wd * p on every parameter, then momentum.

    optax's trace starts at zero, so its first step is g, as torch's momentum buffer is on its first step.
    """
    return optax.chain(
        optax.add_decayed_weights(recipe.weight_decay),
        optax.sgd(make_schedule(recipe, steps_per_epoch), momentum=recipe.momentum or None),
    )


# ---------------------------------------------------------------------------------------------- state
class TrainState(NamedTuple):
    """Everything that changes during training, as a pytree (checkpointed as a whole)."""

    params: nnx.State  # nnx.Param variables
    model_state: nnx.State  # everything else of the model: BatchNorm statistics, dropout RNG state
    opt_state: Any
    step: jax.Array  # optimizer steps taken


def init_train_state(model: nnx.Module, tx: optax.GradientTransformation) -> tuple[nnx.GraphDef, TrainState]:
    """Split an NNX model into its static graph and a pure ``TrainState``.

    The NNX graph is traversed here and once per trace inside the steps, never per step at run time.
    """
    graphdef, params, model_state = nnx.split(model, nnx.Param, ...)
    return graphdef, TrainState(params, model_state, tx.init(params), jnp.zeros((), jnp.int32))


def merge_model(graphdef: nnx.GraphDef, state: TrainState) -> nnx.Module:
    """The NNX model that ``state`` holds (for evaluation, export and porting)."""
    return nnx.merge(graphdef, state.params, state.model_state)


# -------------------------------------------------------------------------------------- batch stream
class EpochPlan(NamedTuple):
    """The order and augmentation of one epoch: equal for every framework, device count and resume."""

    permutation: jax.Array  # (N,) int32 sample order
    offsets: jax.Array  # (N, 2) int32 crop offsets in [0, 2 * padding] for (row, column), per position
    flips: jax.Array  # (N,) bool horizontal flip, per position


def epoch_plan(seed: int, epoch: int, num_examples: int) -> EpochPlan:
    """Draw an epoch's plan from (seed, epoch) alone (augmentation fields are ignored when it is off)."""
    key = jax.random.fold_in(jax.random.key(seed), epoch)
    k_perm, k_crop, k_flip = jax.random.split(key, 3)
    return EpochPlan(
        permutation=jax.random.permutation(k_perm, num_examples).astype(jnp.int32),
        offsets=jax.random.randint(k_crop, (num_examples, 2), 0, 2 * CROP_PADDING + 1, dtype=jnp.int32),
        flips=jax.random.bernoulli(k_flip, 0.5, (num_examples,)),
    )


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    """Batches per epoch with torch's DataLoader default ``drop_last=False`` (the last one may be short)."""
    return -(-num_examples // batch_size)


def batch_bounds(step: int, num_examples: int, batch_size: int) -> tuple[int, int]:
    start = step * batch_size
    return start, min(start + batch_size, num_examples)


def normalize(images_u8: jax.Array, mean, std, dtype=jnp.float32) -> jax.Array:
    """uint8 NHWC -> (x / 255 - mean) / std, torchvision's ToTensor + Normalize."""
    x = images_u8.astype(dtype) / 255.0
    return (x - jnp.asarray(mean, dtype)) / jnp.asarray(std, dtype)


def augment(images_u8: jax.Array, offsets: jax.Array, flips: jax.Array) -> jax.Array:
    """RandomCrop(32, padding=4) with zero padding, then RandomHorizontalFlip, on device, on uint8 NHWC."""
    n, h, w, c = images_u8.shape
    p = CROP_PADDING
    padded = jnp.pad(images_u8, ((0, 0), (p, p), (p, p), (0, 0)))

    def crop(img, off):
        return jax.lax.dynamic_slice(img, (off[0], off[1], jnp.zeros_like(off[0])), (h, w, c))

    cropped = jax.vmap(crop)(padded, offsets)
    return jnp.where(flips[:, None, None, None], cropped[:, :, ::-1, :], cropped)


def make_batch(images_u8: jax.Array, labels: jax.Array, plan: EpochPlan, start: int, stop: int,
               recipe: Recipe, dtype=jnp.float32) -> tuple[jax.Array, jax.Array]:
    """The normalised (augmented) NHWC batch at positions [start, stop) of the epoch plan."""
    idx = plan.permutation[start:stop]
    x = images_u8[idx]
    if recipe.augment:
        x = augment(x, plan.offsets[start:stop], plan.flips[start:stop])
    return normalize(x, recipe.mean, recipe.std, dtype), labels[idx]


def batch_as_numpy_nchw(images: jax.Array, labels: jax.Array) -> tuple[np.ndarray, np.ndarray]:
    """A batch of ``make_batch`` in torch's layout, for feeding the torch reference the same batches."""
    return np.ascontiguousarray(np.asarray(images).transpose(0, 3, 1, 2)), np.asarray(labels).astype(np.int64)


# ---------------------------------------------------------------------------------------------- steps
# ``Metrics.first_nonfinite`` when every loss was finite: larger than any step count.
NO_STEP = np.iinfo(np.int32).max


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
    first_nonfinite: jax.Array  # min over steps, see above

    @staticmethod
    def zeros() -> Metrics:
        f = jnp.zeros((), jnp.float32)
        i = jnp.zeros((), jnp.int32)
        return Metrics(f, f, i, i, i, jnp.full((), NO_STEP, jnp.int32))

    def __add__(self, other: Metrics) -> Metrics:  # type: ignore[override]
        sums = (a + b for a, b in zip(self[:-1], other[:-1], strict=True))
        return Metrics(*sums, jnp.minimum(self.first_nonfinite, other.first_nonfinite))


def _psum(x, axis_name):
    return x if axis_name is None else jax.lax.psum(x, axis_name)


def cross_entropy(logits: jax.Array, labels: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Mean cross-entropy over the (unmasked) batch, torch's ``nn.CrossEntropyLoss()``."""
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    if mask is None:
        return losses.mean()
    return jnp.sum(losses * mask) / jnp.maximum(jnp.sum(mask), 1)


def train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, state: TrainState,
               images: jax.Array, labels: jax.Array, axis_name: str | None = None
               ) -> tuple[TrainState, Metrics]:
    """One SGD step on one device's share of the batch; pure.

    With ``axis_name``, the loss is the mean over the global batch: each device's mean loss is averaged
    (``pmean``) and so are the gradients, which equals one device's gradient of the global mean when every
    device holds the same number of samples. BatchNorm synchronises through its own ``axis_name``.
    """

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
    mask_f = mask.astype(losses.dtype)
    count = _psum(jnp.sum(mask).astype(jnp.int32), axis_name)
    loss_sum = _psum(jnp.sum(losses * mask_f), axis_name)
    correct = _psum(jnp.sum((jnp.argmax(logits, -1) == labels) & mask).astype(jnp.int32), axis_name)
    batch_mean = loss_sum / jnp.maximum(count, 1)
    return Metrics(loss_sum, batch_mean, correct, count, jnp.ones((), jnp.int32), jnp.full((), NO_STEP, jnp.int32))
