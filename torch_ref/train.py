"""The notebooks' training loops in PyTorch, fed from any iterable of batches.

- notebook 000: ``train_model`` (one function; its epoch averages the loss over samples: ``train_one_epoch``),
- notebook 004: ``train_epoch`` (mean of batch losses), ``evaluate``, ``train_resnet``.

The loops are the notebooks' (torch's SGD with coupled weight decay, the scheduler stepped once per epoch);
what changed is where batches come from. A ``DataLoader`` would draw its own order and augmentation, so the
loaders here, ``EpochBatches`` and ``EvalBatches``, replay the Flax engine's batch stream instead
(``engine.epoch_plan`` + the batch gather of ``engine.make_batch``, jitted as the Flax runner does): the same
order, the same crops and flips, the same float values, in NCHW (``engine.batch_as_numpy_nchw``). That is
what makes step-for-step parity with ``flax_resnet.trainer`` testable.

``fit`` is the loop both notebooks share, driven by a ``Recipe`` (loss definition, schedule); ``run`` adds
what the command line needs (history, curves, checkpoints, resume) around it, as ``flax_resnet.trainer``
does for Flax. Nothing here prints: per-epoch lines go to ``log``, progress to the ``progress`` bar.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import os
import re
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn as nn
import torch.optim as optim

from flax_resnet import engine
from flax_resnet.recipes import RECIPES, Recipe
from flax_resnet.runners import DeviceData, gather_batch, gather_eval_batch

__all__ = ["EpochBatches", "EvalBatches", "TorchCheckpoints", "evaluate", "fit", "make_optimizer",
           "make_scheduler", "run", "train_epoch", "train_model", "train_one_epoch", "train_resnet"]

History = dict[str, list[float]]
StepHook = Callable[[float], None]  # called with each training step's loss, as the loop reads it anyway


# ---------------------------------------------------------------------------------------------- batches
def _torch_dtype(dtype: Any) -> torch.dtype:
    return torch.float64 if jnp.dtype(dtype) == jnp.float64 else torch.float32


@functools.partial(jax.jit, static_argnames=("size", "recipe", "dtype"))
def _train_batch(images: jax.Array, labels: jax.Array, plan: engine.EpochPlan, start: jax.Array, *, size: int,
                 recipe: Recipe, dtype: Any) -> tuple[jax.Array, jax.Array]:
    """``engine.make_batch`` with a traced start (one compilation per batch size, not one per batch), via the
    gather that the Flax runner fuses into its step."""
    return gather_batch(DeviceData(images, labels), plan, start, size, recipe, dtype)


@functools.partial(jax.jit, static_argnames=("size", "recipe", "dtype"))
def _eval_batch(images: jax.Array, labels: jax.Array, start: jax.Array, *, size: int, recipe: Recipe, dtype: Any
                ) -> tuple[jax.Array, jax.Array, jax.Array]:
    return gather_eval_batch(DeviceData(images, labels), start, size, recipe, dtype)


class EpochBatches:
    """Training batches like ``DataLoader(shuffle=True)``, but from the engine's epoch plans.

    Iterating yields one epoch of (NCHW float images, int64 labels); ``set_epoch`` picks which epoch (as
    with ``DistributedSampler``), and each iteration moves on to the next one, as a DataLoader reshuffles.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, recipe: Recipe, seed: int, *, epoch: int = 0,
                 dtype: Any = jnp.float32, device: torch.device | str = "cpu"):
        self.images, self.labels = jnp.asarray(images), jnp.asarray(labels, jnp.int32)
        self.recipe, self.seed, self.epoch, self.device = recipe, seed, epoch, device
        self.dtype = jnp.dtype(dtype)
        self.num_examples = int(self.labels.shape[0])

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return engine.steps_per_epoch(self.num_examples, self.recipe.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        plan = engine.epoch_plan(self.seed, self.epoch, self.num_examples)
        self.epoch += 1
        for step in range(len(self)):
            start, stop = engine.batch_bounds(step, self.num_examples, self.recipe.batch_size)
            x, y = _train_batch(self.images, self.labels, plan, jnp.int32(start), size=stop - start,
                                recipe=self.recipe, dtype=self.dtype)
            x, y = engine.batch_as_numpy_nchw(x, y)
            yield torch.from_numpy(x).to(self.device), torch.from_numpy(y).to(self.device)


class EvalBatches:
    """Test batches in order, normalised as the Flax evaluation normalises them (no augmentation)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, recipe: Recipe, *, dtype: Any = jnp.float32,
                 device: torch.device | str = "cpu"):
        self.images, self.labels = jnp.asarray(images), jnp.asarray(labels, jnp.int32)
        self.recipe, self.dtype, self.device = recipe, jnp.dtype(dtype), device
        self.num_examples = int(self.labels.shape[0])

    def __len__(self) -> int:
        return engine.steps_per_epoch(self.num_examples, self.recipe.eval_batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        size = self.recipe.eval_batch_size
        for start in range(0, self.num_examples, size):
            n = min(size, self.num_examples - start)
            x, y, _ = _eval_batch(self.images, self.labels, jnp.int32(start), size=size, recipe=self.recipe,
                                  dtype=self.dtype)
            x, y = engine.batch_as_numpy_nchw(x[:n], y[:n])
            yield torch.from_numpy(x).to(self.device), torch.from_numpy(y).to(self.device)


# ------------------------------------------------------------------------------------ optimiser, schedule
def make_optimizer(model: nn.Module, recipe: Recipe) -> optim.Optimizer:
    """The notebooks' ``optim.SGD(model.parameters(), lr, momentum, weight_decay)``."""
    return optim.SGD(model.parameters(), lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay)


def make_scheduler(optimizer: optim.Optimizer, recipe: Recipe) -> optim.lr_scheduler.LRScheduler | None:
    """Notebook 000's ``MultiStepLR`` or notebook 004's ``CosineAnnealingLR(T_max=epochs)``; none if constant."""
    if recipe.schedule == "multistep":
        return optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(recipe.milestones), gamma=recipe.gamma)
    if recipe.schedule == "cosine":
        return optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=recipe.epochs)
    return None


# ------------------------------------------------------------------------------------------ the loops
def train_one_epoch(model: nn.Module, train_loader: Iterable, criterion: nn.Module, optimizer: optim.Optimizer,
                    device: torch.device | str, on_step: StepHook | None = None) -> tuple[float, float]:
    """The training phase of notebook 000's ``train_model``: loss averaged over samples."""
    model.train()
    running_loss = 0.0
    correct = 0
    total = 0

    for inputs, targets in train_loader:
        inputs, targets = inputs.to(device), targets.to(device)

        optimizer.zero_grad()
        outputs = model(inputs)
        loss = criterion(outputs, targets)
        loss.backward()
        optimizer.step()

        loss_value = loss.item()
        if on_step is not None:
            on_step(loss_value)
        running_loss += loss_value * inputs.size(0)
        _, predicted = outputs.max(1)
        total += targets.size(0)
        correct += predicted.eq(targets).sum().item()

    return running_loss / total, 100.0 * correct / total


def train_epoch(model: nn.Module, trainloader: Iterable, criterion: nn.Module, optimizer: optim.Optimizer,
                device: torch.device | str, on_step: StepHook | None = None) -> tuple[float, float]:
    """Notebook 004's ``train_epoch``: loss averaged over batches (``len(trainloader)``)."""
    model.train()
    running_loss = 0.0
    correct = 0
    total = 0

    for inputs, labels in trainloader:
        inputs, labels = inputs.to(device), labels.to(device)

        optimizer.zero_grad()
        outputs = model(inputs)
        loss = criterion(outputs, labels)
        loss.backward()
        optimizer.step()

        loss_value = loss.item()
        if on_step is not None:
            on_step(loss_value)
        running_loss += loss_value
        _, predicted = outputs.max(1)
        total += labels.size(0)
        correct += predicted.eq(labels).sum().item()

    return running_loss / len(trainloader), 100.0 * correct / total


def evaluate(model: nn.Module, testloader: Iterable, criterion: nn.Module, device: torch.device | str
             ) -> tuple[float, float]:
    """Notebook 004's ``evaluate``: mean over test batches of the batch-mean loss, and accuracy."""
    model.eval()
    running_loss = 0.0
    correct = 0
    total = 0

    with torch.no_grad():
        for inputs, labels in testloader:
            inputs, labels = inputs.to(device), labels.to(device)
            outputs = model(inputs)
            loss = criterion(outputs, labels)

            running_loss += loss.item()
            _, predicted = outputs.max(1)
            total += labels.size(0)
            correct += predicted.eq(labels).sum().item()

    if total == 0:
        return math.nan, math.nan
    return running_loss / len(testloader), 100.0 * correct / total


def fit(model: nn.Module, recipe: Recipe, train_loader: Iterable, test_loader: Iterable, *,
        device: torch.device | str = "cpu", optimizer: optim.Optimizer | None = None,
        scheduler: optim.lr_scheduler.LRScheduler | None = None, start_epoch: int = 0,
        history: History | None = None, log: Callable[[str], None] | None = None,
        on_step: StepHook | None = None, on_epoch_end: Callable[..., None] | None = None) -> History:
    """The loop of both notebooks, as the recipe says: its loss definition, its SGD, its per-epoch schedule.

    Per epoch: train (``train_one_epoch`` or ``train_epoch``), ``evaluate``, ``scheduler.step()``. Returns the
    history with the Flax trainer's keys; ``on_epoch_end(epoch, history, optimizer, scheduler)`` runs after
    each epoch (checkpoints); ``optimizer``/``scheduler``/``start_epoch``/``history`` resume a run.
    """
    from flax_resnet.trainer import HISTORY_KEYS, epoch_summary

    criterion = nn.CrossEntropyLoss()
    if optimizer is None:
        optimizer = make_optimizer(model, recipe)
        scheduler = make_scheduler(optimizer, recipe)
    history = history if history is not None else {key: [] for key in HISTORY_KEYS}
    one_epoch = train_one_epoch if recipe.train_loss_mean == "samples" else train_epoch
    for epoch in range(start_epoch, recipe.epochs):
        if hasattr(train_loader, "set_epoch"):
            train_loader.set_epoch(epoch)
        lr = optimizer.param_groups[0]["lr"]
        t0 = time.perf_counter()
        train_loss, train_acc = one_epoch(model, train_loader, criterion, optimizer, device, on_step)
        train_time = time.perf_counter() - t0
        test_loss, test_acc = evaluate(model, test_loader, criterion, device)
        if scheduler is not None:
            scheduler.step()
        row = {"train_loss": train_loss, "train_acc": train_acc, "test_loss": test_loss, "test_acc": test_acc,
               "epoch_time": time.perf_counter() - t0,
               "images_per_sec": getattr(train_loader, "num_examples", math.nan) / train_time, "lr": lr}
        for key in HISTORY_KEYS:
            history[key].append(row[key])
        if on_epoch_end is not None:
            on_epoch_end(epoch, history, optimizer, scheduler)
        if log is not None:
            log(epoch_summary(epoch, recipe.epochs, row))
    return history


def train_model(model: nn.Module, train_loader: Iterable, test_loader: Iterable, epochs: int = 15,
                lr: float = 0.1, **kwargs: Any) -> History:
    """Notebook 000's ``train_model``: SGD(lr, 0.9, wd 1e-4), MultiStepLR([8, 12], 0.1), loss over samples."""
    recipe = dataclasses.replace(RECIPES["plain-vs-residual"], epochs=epochs, lr=lr)
    return fit(model, recipe, train_loader, test_loader, **kwargs)


def train_resnet(model: nn.Module, trainloader: Iterable, testloader: Iterable, epochs: int = 20,
                 lr: float = 0.1, **kwargs: Any) -> tuple[nn.Module, float, History]:
    """Notebook 004's ``train_resnet``: SGD(lr, 0.9, wd 5e-4), CosineAnnealingLR(T_max=epochs), loss over
    batches. Returns ``(model, final test accuracy, history)`` as the notebook does."""
    recipe = dataclasses.replace(RECIPES["resnet18-cifar"], epochs=epochs, lr=lr)
    history = fit(model, recipe, trainloader, testloader, **kwargs)
    return model, history["test_acc"][-1], history


# -------------------------------------------------------------------------------------- checkpoints, run
def _payload_digest(payload: Any) -> str:
    """SHA-256 of a checkpoint payload's tensors and values, in order: torch.load notices a truncated file but
    not a flipped bit in a tensor's bytes (its zip reader checks no CRC), so the payload records this."""
    h = hashlib.sha256()

    def visit(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            t = value.detach().cpu().contiguous()
            h.update(f"T{t.dtype}{tuple(t.shape)}|".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(value, dict):
            for key, item in value.items():
                h.update(f"K{key!r}|".encode())
                visit(item)
        elif isinstance(value, list | tuple):
            h.update(f"L{len(value)}|".encode())
            for item in value:
                visit(item)
        else:
            h.update(f"V{value!r}|".encode())

    visit({k: v for k, v in payload.items() if k != "digest"})
    return h.hexdigest()


class TorchCheckpoints:
    """torch's own checkpoints for ``--framework torch``: ``epoch_NNNN.pt`` (model, optimiser, scheduler,
    history, metadata, a digest of all of it), written atomically (temporary file + rename), the last
    ``max_to_keep`` kept. ``load_latest_good`` resumes from the newest one that loads and matches its digest,
    moving unreadable newer ones aside to ``<directory>.unreadable/``, as ``flax_resnet.checkpoint`` does."""

    PATTERN = re.compile(r"^epoch_(\d+)\.pt$")

    def __init__(self, directory: str | Path, max_to_keep: int | None = 3):
        self.directory, self.max_to_keep = Path(directory), max_to_keep

    @property
    def epochs(self) -> list[int]:
        if not self.directory.is_dir():
            return []
        return sorted(int(m.group(1)) for p in self.directory.iterdir() if (m := self.PATTERN.match(p.name)))

    def path(self, epoch: int) -> Path:
        return self.directory / f"epoch_{epoch:04d}.pt"

    def save(self, epoch: int, payload: dict[str, Any]) -> Path:
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.path(epoch)
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            torch.save({**payload, "digest": _payload_digest(payload)}, tmp)
            os.replace(tmp, path)
        except (OSError, RuntimeError) as e:  # torch reports a failed write (a full disk) as a RuntimeError
            tmp.unlink(missing_ok=True)
            from flax_resnet.checkpoint import CheckpointError

            raise CheckpointError(f"could not write checkpoint {path} ({type(e).__name__}: {e}); the checkpoints "
                                  f"already there (epochs {self.epochs or 'none'}) are unchanged; fix the cause "
                                  "(free disk space), then continue with --resume") from e
        if self.max_to_keep:
            for old in self.epochs[:-self.max_to_keep]:
                self.path(old).unlink(missing_ok=True)
        return path

    def load(self, epoch: int | None = None) -> dict[str, Any]:
        epochs = self.epochs
        if not epochs:
            raise FileNotFoundError(f"no torch checkpoint in {self.directory}")
        return torch.load(self.path(epochs[-1] if epoch is None else epoch), weights_only=True)

    def _check(self, epoch: int) -> dict[str, Any]:
        try:
            payload = self.load(epoch)
        except Exception as e:  # noqa: BLE001 - torch.load raises assorted types for a damaged file
            raise ValueError(f"{type(e).__name__}: {' '.join(str(e).split())[:300]}") from e
        if not isinstance(payload, dict) or not {"model", "optimizer", "epoch", "history", "meta"} <= set(payload):
            raise ValueError("not a checkpoint of this trainer")
        if "digest" in payload and _payload_digest(payload) != payload["digest"]:
            raise ValueError("its contents do not match the digest recorded when it was written")
        return payload

    def read(self, epoch: int | None = None) -> dict[str, Any]:
        """Checkpoint ``epoch`` (default: the latest), verified as ``load_latest_good`` does but moving nothing
        (for readers such as ``landscape``); ``CheckpointError`` if there is none or it cannot be read."""
        from flax_resnet.checkpoint import CheckpointError

        epochs = self.epochs
        if not epochs:
            raise CheckpointError(f"no torch checkpoint in {self.directory}")
        epoch = epochs[-1] if epoch is None else epoch
        try:
            return self._check(epoch)
        except ValueError as e:
            raise CheckpointError(f"{self.path(epoch)} is unreadable ({e})") from e

    def load_latest_good(self, report: Callable[[str], None] | None = None) -> dict[str, Any]:
        """The newest checkpoint that loads whole; unreadable newer ones are moved aside and reported."""
        from flax_resnet.checkpoint import no_readable_checkpoint, unreadable_target

        problems = []
        for epoch in reversed(self.epochs):
            try:
                return self._check(epoch)
            except ValueError as e:
                target = unreadable_target(self.directory, self.path(epoch).name)
                target.parent.mkdir(parents=True, exist_ok=True)
                self.path(epoch).rename(target)
                problems.append(f"epoch {epoch}: {e}")
                older = self.epochs
                then = f"trying epoch {older[-1]}" if older else "no older checkpoint is left"
                if report is not None:
                    report(f"checkpoint of epoch {epoch} in {self.directory} is unreadable ({e}); moved it to "
                           f"{target}; {then}")
        raise no_readable_checkpoint(self.directory, problems)


def run(model: nn.Module, recipe: Recipe, dataset: Any, *, seed: int = 0, dtype: Any = jnp.float32,
        device: torch.device | str = "cpu", out_dir: str | Path | None = None, resume: bool = False,
        overwrite: bool = False, meta: dict[str, Any] | None = None, max_to_keep: int = 3,
        progress: Callable[..., Any] | None = None, log: Callable[[str], None] | None = None,
        on_step: StepHook | None = None, title: str | None = None) -> History:
    """``fit`` on a ``data.Dataset`` through the engine's batch stream, with the Flax trainer's outputs.

    The counterpart of ``flax_resnet.trainer.train``: same batches for the same ``seed``, history.json and
    curves.png, a checkpoint per epoch in ``out_dir/checkpoints`` (torch format), ``resume``.
    """
    from flax_resnet.checkpoint import CHECKPOINT_SUBDIR
    from flax_resnet.trainer import (
        TrainError,
        check_resumable,
        check_test_loss,
        kept_checkpoints,
        training_diverged,
        write_epoch_outputs,
    )

    if jnp.dtype(dtype) == jnp.float64:
        if not jax.config.read("jax_enable_x64"):
            raise ValueError("float64 batches need jax.config.update('jax_enable_x64', True) first")
        model = model.double()
    model = model.to(device)
    optimizer = make_optimizer(model, recipe)
    scheduler = make_scheduler(optimizer, recipe)
    train_loader = EpochBatches(dataset.train_images, dataset.train_labels, recipe, seed, dtype=dtype, device=device)
    test_loader = EvalBatches(dataset.test_images, dataset.test_labels, recipe, dtype=dtype, device=device)
    run_meta = {"recipe": dataclasses.asdict(recipe), "seed": seed, "dtype": jnp.dtype(dtype).name,
                "num_train": train_loader.num_examples, "num_test": test_loader.num_examples, **(meta or {})}
    start_epoch, history, ckpts = 0, None, None
    if out_dir is not None:
        out_dir = Path(out_dir)
        ckpts = TorchCheckpoints(out_dir / CHECKPOINT_SUBDIR, max_to_keep)
        if ckpts.epochs and not resume:
            if not overwrite:
                raise TrainError(f"{out_dir} already holds checkpoints of a run (epochs {ckpts.epochs}); pass "
                                 "--resume to continue it, --overwrite to start over, or choose another --out")
            for epoch in ckpts.epochs:
                ckpts.path(epoch).unlink()
        out_dir.mkdir(parents=True, exist_ok=True)
        if resume and ckpts.epochs:
            saved = ckpts.load_latest_good(report=log or (lambda m: warnings.warn(m, RuntimeWarning, stacklevel=2)))
            check_resumable(saved["meta"], run_meta, ckpts.directory)
            model.load_state_dict(saved["model"])
            optimizer.load_state_dict(saved["optimizer"])
            if scheduler is not None:
                scheduler.load_state_dict(saved["scheduler"])
            start_epoch, history = int(saved["epoch"]), saved["history"]
            if log:
                log(f"resuming from {ckpts.directory} after epoch {start_epoch}")

    bar = None
    position = {"epoch": start_epoch, "step": 0}  # where the loop is, to name a divergence

    def kept() -> str:
        if ckpts is None:
            return kept_checkpoints(None, None)
        return kept_checkpoints(ckpts.directory, ckpts.epochs[-1] if ckpts.epochs else None)

    def step_hook(loss: float) -> None:
        position["step"] += 1
        if not math.isfinite(loss):  # the loop reads every loss anyway (loss.item()): checking it is free
            where = f"epoch {position['epoch'] + 1}, step {position['step']} of {len(train_loader)}"
            raise training_diverged(where, loss, kept())
        if on_step is not None:
            on_step(loss)
        if bar is not None:
            bar.update(1)

    def epoch_end(epoch: int, history: History, optimizer: optim.Optimizer, scheduler: Any) -> None:
        nonlocal bar
        if test_loader.num_examples:
            check_test_loss(epoch, history["test_loss"][-1], kept())
        if ckpts is not None:
            ckpts.save(epoch + 1, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                   "scheduler": scheduler.state_dict() if scheduler is not None else {},
                                   "epoch": epoch + 1, "history": history, "meta": run_meta})
            write_epoch_outputs(out_dir, history, recipe, title, epoch + 1)
        if bar is not None:
            bar.set_postfix_str(f"loss {history['train_loss'][-1]:.4f}, test acc {history['test_acc'][-1]:.2f}%")
            bar.close()
            bar = None

    class _Bars:  # opens the next epoch's bar when the loop starts iterating over it
        def __init__(self, inner: EpochBatches):
            self.inner, self.num_examples = inner, inner.num_examples

        def set_epoch(self, epoch: int) -> None:
            self.inner.set_epoch(epoch)

        def __len__(self) -> int:
            return len(self.inner)

        def __iter__(self):
            nonlocal bar
            position.update(epoch=self.inner.epoch, step=0)
            if progress is not None:
                bar = progress(total=len(self.inner), desc=f"epoch {self.inner.epoch + 1}/{recipe.epochs}")
            return iter(self.inner)

    return fit(model, recipe, _Bars(train_loader), test_loader, device=device, optimizer=optimizer,
               scheduler=scheduler, start_epoch=start_epoch, history=history, log=log, on_step=step_hook,
               on_epoch_end=epoch_end)
