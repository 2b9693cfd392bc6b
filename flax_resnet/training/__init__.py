"""Training: ``train(model, config, dataset)``, the front door of one loop (``loop``) for both frameworks; an NNX
module trains in JAX/Flax (``flax_backend``, through a runner), a torch ``nn.Module`` in the PyTorch reference
(``torch_backend``). Both see the same batches for the same ``config.seed``."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flax import nnx

from flax_resnet.recipes import RunConfig
from flax_resnet.training.flax_backend import FlaxBackend
from flax_resnet.training.loop import (
    HISTORY_FILE,
    HISTORY_KEYS,
    PLOT_FILE,
    History,
    ProgressFactory,
    StepHook,
    TrainError,
    read_history,
    run,
)

__all__ = ["HISTORY_FILE", "HISTORY_KEYS", "PLOT_FILE", "TrainError", "TrainResult", "read_history", "train"]


@dataclasses.dataclass
class TrainResult:
    """What a run ends with: the model passed in (holding the trained weights), the history, and for Flax the
    whole final ``engine.TrainState`` (with the optimiser's state)."""

    model: Any
    history: History
    state: Any = None


def train(model: Any, config: RunConfig, dataset: Any, *, runner: Any = None, device: Any = "cpu",
          out_dir: str | Path | None = None, resume: bool = False, overwrite: bool = False,
          max_to_keep: int | None = 3, progress: ProgressFactory | None = None,
          log: Callable[[str], None] | None = None, on_step: StepHook | None = None,
          title: str | None = None) -> TrainResult:
    """Train ``model`` (changed in place) on a ``data.Dataset`` as ``config`` says.

    ``runner``: for Flax models, a ``runners.Runner`` or a factory (default: one device with ``jax.jit``).
    ``device``: for torch models, where they train. The other options are ``loop.run``'s: ``out_dir`` (checkpoints,
    ``history.json``, ``curves.png``; nothing written without it), ``resume`` / ``overwrite``, ``max_to_keep``
    checkpoints, ``progress`` (a tqdm-like factory, or None), ``log`` (epoch lines), ``on_step(step, loss)``
    (``loss()`` reads that step's loss), ``title`` (of ``curves.png``).
    """
    config = dataclasses.replace(config, dataset=getattr(dataset, "name", config.dataset),
                                 num_train=len(dataset.train_labels), num_test=len(dataset.test_labels))
    kind, framework = ("an NNX", "jax") if isinstance(model, nnx.Module) else ("a torch", "torch")
    if config.framework != framework:
        raise ValueError(f"{kind} model trains with framework {framework!r}, but the config says {config.framework!r}")
    if framework == "jax":
        backend: Any = FlaxBackend(model, config, runner=runner)
    else:
        from flax_resnet.training.torch_backend import TorchBackend  # torch is an optional dependency

        backend = TorchBackend(model, config, device=device)
    history = run(backend, config, dataset.train_images, dataset.train_labels, dataset.test_images,
                  dataset.test_labels, out_dir=out_dir, resume=resume, overwrite=overwrite, max_to_keep=max_to_keep,
                  progress=progress, log=log, on_step=on_step, title=title)
    trained = backend.finish()
    return TrainResult(trained, history, getattr(backend, "final_state", None))
