"""The PyTorch side of the training loop: the notebooks' own loops (``torch_ref.train``: 000's ``train_one_epoch``
or 004's ``train_epoch`` as the recipe's loss definition says, ``evaluate``, ``scheduler.step()``) on the batches of
``torch_ref.data.PlannedBatches``, bit-identical to the Flax ones. Imported only for ``framework='torch'``."""

from __future__ import annotations

import collections
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from flax_resnet import _codecs
from flax_resnet.config import RunConfig
from flax_resnet.data.plan import EpochPlan
from flax_resnet.training.loop import EpochResult, StepHook
from torch_ref import train as notebook
from torch_ref.data import PlannedBatches

__all__ = ["TorchBackend"]

TORCH_DTYPES = {"float32": torch.float32, "float64": torch.float64}


class _Diverged(Exception):
    """Raised from the step hook, with the step, to leave the notebook's epoch loop at the first non-finite loss."""


class TorchBackend:
    """Trains a torch ``nn.Module`` (moved to ``device`` and the config's dtype; trained in place)."""

    is_main_process = True

    def __init__(self, model: nn.Module, config: RunConfig, device: torch.device | str = "cpu"):
        if config.precision != "fp32":
            raise ValueError(f"precision {config.precision!r} is for the Flax trainer; the torch reference trains "
                             "in --dtype")
        recipe = config.recipe
        self.dtype = TORCH_DTYPES[config.dtype]
        self.model = model.to(device=device, dtype=self.dtype)
        self.config, self.device = config, device
        self.criterion = nn.CrossEntropyLoss()
        self.optimizer = notebook.make_optimizer(self.model, recipe.lr, recipe.momentum, recipe.weight_decay)
        self.scheduler = notebook.make_scheduler(self.optimizer, recipe.schedule, recipe.epochs, recipe.milestones,
                                                 recipe.gamma)
        self.one_epoch = notebook.train_one_epoch if recipe.train_loss_mean == "samples" else notebook.train_epoch

    def prepare(self, train_images: np.ndarray, train_labels: np.ndarray, test_images: np.ndarray,
                test_labels: np.ndarray) -> None:
        recipe = self.config.recipe
        self.train_loader = PlannedBatches(train_images, train_labels, recipe.batch_size, recipe.mean, recipe.std,
                                           dtype=self.dtype, device=self.device)
        self.test_loader = PlannedBatches(test_images, test_labels, recipe.eval_batch_size, recipe.mean, recipe.std,
                                          dtype=self.dtype, device=self.device)

    def train_epoch(self, epoch: int, plan: EpochPlan, on_step: StepHook) -> EpochResult:
        augmentation = (plan.offsets, plan.flips) if self.config.recipe.augment else ()
        self.train_loader.set_plan(plan.permutation, *augmentation)
        step = [0]

        def hook(loss: float) -> None:
            if not math.isfinite(loss):  # the loop reads every loss anyway (loss.item()): checking it is free
                raise _Diverged(step[0])
            on_step(step[0], lambda: loss)
            step[0] += 1

        try:
            loss, accuracy = self.one_epoch(self.model, self.train_loader, self.criterion, self.optimizer,
                                            self.device, on_step=hook)
        except _Diverged as e:
            return EpochResult(loss=math.nan, accuracy=math.nan, count=0, first_nonfinite=e.args[0])
        if self.scheduler is not None:
            self.scheduler.step()
        return EpochResult(loss=loss, accuracy=accuracy, count=self.train_loader.num_examples)

    def evaluate(self) -> tuple[float, float]:
        return notebook.evaluate(self.model, self.test_loader, self.criterion, self.device)

    def state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        arrays, extra = _codecs.torch_to_arrays(self.model, self.optimizer)
        if self.scheduler is not None:
            scheduler = dict(self.scheduler.state_dict())
            if "milestones" in scheduler:  # MultiStepLR keeps a Counter, which JSON would turn into string keys
                scheduler["milestones"] = sorted(scheduler["milestones"].items())
            extra = {**extra, "scheduler": scheduler}
        return arrays, extra

    def load_state(self, arrays: Mapping[str, np.ndarray], extra: Mapping[str, Any]) -> None:
        _codecs.torch_from_arrays(self.model, self.optimizer, arrays, extra)
        if self.scheduler is not None:
            scheduler = dict(extra["scheduler"])
            if "milestones" in scheduler:
                scheduler["milestones"] = collections.Counter({int(k): v for k, v in scheduler["milestones"]})
            self.scheduler.load_state_dict(scheduler)

    def barrier(self, name: str) -> None:
        pass

    def finish(self) -> nn.Module:
        return self.model
