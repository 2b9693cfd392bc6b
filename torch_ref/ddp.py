"""The notebooks' training step under ``DistributedDataParallel``: N processes on this machine, joined over gloo on
127.0.0.1, each fed its contiguous share of the same global batches (``torch_ref.data.PlannedBatches``).

This is the PyTorch side of ``train.py verify --devices N``: what a DDP user runs, written out plainly::

    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:PORT", rank=rank, world_size=N)
    ddp = DistributedDataParallel(model)            # broadcasts rank 0's weights once
    for x, y in batches:                            # rank r takes rows [r * B/N, (r + 1) * B/N) of the global batch
        loss = criterion(ddp(x[share], y[share]))   # rank 0's BatchNorm buffers are broadcast before each forward
        loss.backward()                             # gradients averaged over the ranks
        optimizer.step()

BatchNorm either stays plain (each rank normalises with its own share's statistics; the buffers kept are rank 0's,
as DDP broadcasts them from rank 0) or is replaced by ``SyncBatchNorm`` below (statistics over the global batch):
torch's own ``nn.SyncBatchNorm`` refuses CPU tensors ("SyncBatchNorm expected input tensor to be on GPU").

``spawn`` starts the processes with ``torch.multiprocessing`` and stops them by itself: every run is a bounded
number of steps, and a run that has not finished after ``timeout_s`` seconds is terminated.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import os
import socket
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from torch_ref.data import PlannedBatches
from torch_ref.train import make_optimizer, make_scheduler

__all__ = ["DDPResult", "SyncBatchNorm", "free_port", "spawn", "train_ddp", "use_sync_batchnorm"]


# ------------------------------------------------------------------------------------------ synchronised BatchNorm
def all_reduce(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of ``tensor`` over all ranks, differentiable (its backward sums the gradients over the ranks):
    ``torch.distributed.nn.functional.all_reduce``, whose FutureWarning (torch 2.13 points to a private module
    instead) is silenced here."""
    from torch.distributed.nn import functional

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return functional.all_reduce(tensor)


class SyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm with the statistics of the global batch, as ``nn.SyncBatchNorm`` computes them, for CPU tensors.

    In training: mean and biased variance over every rank's samples (``all_reduce`` of per-channel sums, from
    ``torch.distributed.nn.functional``, which is differentiable: its backward sums the gradients over the ranks,
    so the gradient is the one of BatchNorm over the whole batch); the running variance stores the unbiased
    variance, var * n / (n - 1) with n the global count. The variance is two-pass, E[(x - E[x])^2]. In eval mode
    it is plain BatchNorm on the running statistics. Features in dimension 1, any rank (as BatchNorm1d/2d/3d).
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2-D input (N, C, ...), got {input.dim()}-D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or not dist.is_initialized():
            return super().forward(x)
        dims = [d for d in range(x.dim()) if d != 1]
        shape = [1, -1] + [1] * (x.dim() - 2)
        n = all_reduce(torch.tensor(float(x.numel() // x.shape[1]), dtype=x.dtype))
        mean = all_reduce(x.sum(dims)) / n
        centered = x - mean.view(shape)
        var = all_reduce((centered * centered).sum(dims)) / n
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                # momentum None: torch's cumulative average, 1 / (batches seen)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(m * mean)
                self.running_var.mul_(1 - m).add_(m * var * n / (n - 1))
        out = centered / torch.sqrt(var.view(shape) + self.eps)
        return out * self.weight.view(shape) + self.bias.view(shape) if self.affine else out


def use_sync_batchnorm(model: nn.Module) -> nn.Module:
    """``model`` with every BatchNorm replaced (in place) by a ``SyncBatchNorm`` holding the same weights and
    buffers, as ``nn.SyncBatchNorm.convert_sync_batchnorm`` does; the state_dict keys stay the same."""
    for name, child in model.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(child, SyncBatchNorm):
            sync = SyncBatchNorm(child.num_features, child.eps, child.momentum, child.affine,
                                 child.track_running_stats)
            sync.load_state_dict(child.state_dict())
            setattr(model, name, sync.to(child.weight.dtype if child.affine else torch.get_default_dtype()))
        else:
            use_sync_batchnorm(child)
    return model


# ------------------------------------------------------------------------------------------------ processes
def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on (bound to port 0, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _loopback() -> str | None:
    """The loopback interface's name ('lo' on Linux, 'lo0' on macOS), for gloo to use it only."""
    try:
        return next((name for _, name in socket.if_nameindex() if name.startswith("lo")), None)
    except OSError:
        return None


def _rank_main(rank: int, world_size: int, port: int, timeout_s: float, fn: Callable[..., Any], args: tuple,
               out: str) -> None:
    """One process: join the group on 127.0.0.1, run ``fn(rank, world_size, *args)``, save what it returned."""
    torch.set_num_threads(1)  # N processes share the machine's cores; one thread each is what CI has
    interface = _loopback()
    if interface and "GLOO_SOCKET_IFNAME" not in os.environ:
        os.environ["GLOO_SOCKET_IFNAME"] = interface
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=timeout_s))
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, Path(out) / f"rank{rank}.pt")
        # every rank done before any leaves: rank 0 serves the group's store, and a rank still talking to it
        # when it goes aborts ("terminate called without an active exception", 1 run in 4 without this)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def spawn(fn: Callable[..., Any], world_size: int, args: tuple = (), *, timeout_s: float = 300) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` fresh processes joined in one gloo process group on
    127.0.0.1; returns what each rank's ``fn`` returned (tensors, numbers, lists and dicts of them), by rank.

    ``fn`` must be importable by name (a module-level function). A rank that raises fails the run with its
    traceback; a run not finished after ``timeout_s`` seconds is terminated (``TimeoutError``)."""
    with tempfile.TemporaryDirectory(prefix="ddp-") as out:
        context = mp.spawn(_rank_main, args=(world_size, free_port(), timeout_s, fn, args, out), nprocs=world_size,
                           join=False)
        deadline = time.monotonic() + timeout_s
        try:
            while not context.join(timeout=max(0.1, min(5.0, deadline - time.monotonic()))):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the {world_size} DDP processes did not finish within {timeout_s:g} s; "
                                       "they were stopped")
        finally:
            for p in context.processes:
                if p.is_alive():
                    p.terminate()
                p.join()
        return [torch.load(Path(out) / f"rank{rank}.pt", weights_only=True) for rank in range(world_size)]


# ------------------------------------------------------------------------------------------------ training
@dataclasses.dataclass
class DDPResult:
    """What rank 0 holds after the run: the loss of each step averaged over the ranks (the loss of the global
    batch), and its state_dict (parameters and BatchNorm buffers) as NumPy arrays."""

    losses: list[float]
    state_dict: dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class _Job:
    model: nn.Module
    images: np.ndarray
    labels: np.ndarray
    plans: Sequence[tuple[np.ndarray, np.ndarray | None, np.ndarray | None]]
    steps: int
    batch_size: int
    optimizer: dict[str, float]
    scheduler: dict[str, Any]
    mean: Sequence[float]
    std: Sequence[float]
    sync_bn: bool
    dtype: torch.dtype


def _train_rank(rank: int, world_size: int, job: _Job) -> dict[str, Any]:
    """The notebooks' step (``torch_ref.train.train_epoch``'s body) under DDP, on this rank's share."""
    model = copy.deepcopy(job.model)
    if job.sync_bn:
        use_sync_batchnorm(model)
    model = model.to(job.dtype)
    ddp = DistributedDataParallel(model)  # broadcast_buffers=True: rank 0's BatchNorm buffers before each forward
    criterion = nn.CrossEntropyLoss()
    optimizer = make_optimizer(ddp.parameters(), **job.optimizer)
    scheduler = make_scheduler(optimizer, **job.scheduler)
    batches = PlannedBatches(job.images, job.labels, job.batch_size, job.mean, job.std, dtype=job.dtype)
    losses = []
    model.train()
    for step in range(job.steps):
        epoch, index = divmod(step, len(batches))
        if index == 0:
            batches.set_plan(*job.plans[epoch])
        inputs, labels = batches.batch(index)
        share = len(labels) // world_size
        inputs, labels = inputs[rank * share:(rank + 1) * share], labels[rank * share:(rank + 1) * share]

        optimizer.zero_grad()
        loss = criterion(ddp(inputs), labels)
        loss.backward()
        optimizer.step()
        if scheduler is not None and index == len(batches) - 1:  # the notebooks step it after each epoch
            scheduler.step()

        total = loss.detach().clone()
        dist.all_reduce(total)
        losses.append(total.item() / world_size)
    return {"losses": losses, "state_dict": {k: v.detach().clone() for k, v in model.state_dict().items()}}


def train_ddp(model: nn.Module, images: np.ndarray, labels: np.ndarray,
              plans: Sequence[tuple[np.ndarray, np.ndarray | None, np.ndarray | None]], *, world_size: int,
              steps: int, batch_size: int, lr: float, momentum: float, weight_decay: float, schedule: str = "constant",
              epochs: int = 1, milestones: Sequence[int] = (), gamma: float = 0.1,
              mean: Sequence[float] = (0.0, 0.0, 0.0), std: Sequence[float] = (1.0, 1.0, 1.0),
              sync_bn: bool = False, dtype: torch.dtype = torch.float64, timeout_s: float = 300) -> DDPResult:
    """``steps`` SGD steps of ``model`` (a copy, in ``dtype``) with DDP on ``world_size`` processes.

    ``images`` (uint8 NHWC) and ``labels`` are the training split; ``plans[e]`` is epoch e's ``(permutation,
    offsets, flips)`` as ``PlannedBatches.set_plan`` takes it (offsets None: no augmentation). Each global batch of
    ``batch_size`` is split into ``world_size`` contiguous shares, rank r taking the r-th; every batch, the short
    last one of an epoch included, must divide by ``world_size``. SGD(lr, momentum, weight_decay) with the
    notebooks' per-epoch ``schedule`` (``torch_ref.train.make_scheduler``). ``sync_bn``: ``SyncBatchNorm`` for every
    BatchNorm, else plain per-rank BatchNorm."""
    num = len(labels)
    sizes = {min(batch_size, num - start) for start in range(0, num, batch_size)}
    if any(size % world_size for size in sizes):
        raise ValueError(f"batches of {sorted(sizes)} samples do not split evenly across {world_size} processes: "
                         f"use a batch size and a training set that divide by {world_size}.")
    per_epoch = -(-num // batch_size)
    if len(plans) * per_epoch < steps:
        raise ValueError(f"{steps} steps need {-(-steps // per_epoch)} epoch plans, got {len(plans)}")
    # a copy: pickling a module for the processes moves its tensors to shared memory, the caller's included
    job = _Job(copy.deepcopy(model), np.asarray(images), np.asarray(labels), list(plans), steps, batch_size,
               {"lr": lr, "momentum": momentum, "weight_decay": weight_decay},
               {"schedule": schedule, "epochs": epochs, "milestones": tuple(milestones), "gamma": gamma},
               tuple(mean), tuple(std), sync_bn, dtype)
    first = spawn(_train_rank, world_size, (job,), timeout_s=timeout_s)[0]
    return DDPResult(list(first["losses"]), {k: v.numpy() for k, v in first["state_dict"].items()})
