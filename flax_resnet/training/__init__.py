"""Training: ``train(model, config, dataset)``, the front door of one loop (``loop``) for both frameworks; an NNX
module trains in JAX/Flax (``flax_backend``, through a runner), a torch ``nn.Module`` in the PyTorch reference
(``torch_backend``). Both see the same batches for the same ``config.seed``."""

from __future__ import annotations

import dataclasses
from typing import Any

from flax import nnx

from flax_resnet.recipes import RunConfig
from flax_resnet.training.flax_backend import FlaxBackend
from flax_resnet.training.loop import (
    HISTORY_FILE,
    HISTORY_KEYS,
    PLOT_FILE,
    History,
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
          **options: Any) -> TrainResult:
    """Train ``model`` (changed in place) on a ``data.Dataset`` as ``config`` says; ``options`` are ``loop.run``'s
    (``out_dir``, ``resume``, ``overwrite``, ``max_to_keep``, ``progress``, ``log``, ``on_step``, ``title``).

    ``runner``: for Flax models, a ``runners.Runner`` or a factory (default: one device with ``jax.jit``).
    ``device``: for torch models, where they train.
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
                  dataset.test_labels, **options)
    trained = backend.finish()
    return TrainResult(trained, history, getattr(backend, "final_state", None))
