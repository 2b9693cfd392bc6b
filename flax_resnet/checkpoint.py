"""A model's weights in the checkpoint store (``flax_resnet.store``): what ``port`` writes (step 0:
``{"params": ..., "model_state": ...}`` of an NNX model), and what ``--init-from``, ``port`` and ``landscape`` read
from any checkpoint of either framework (a Flax training checkpoint holds the same two entries plus the optimiser's,
a torch one the ``state_dict`` under ``model/``). A path is a run's output directory or a store directory.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from flax import nnx

from flax_resnet import codecs, port
from flax_resnet.store import CheckpointError, CheckpointStore, resolve

__all__ = ["CheckpointError", "load_model", "model_template", "read_meta", "save_model", "torch_state_dict"]


def model_template(model: nnx.Module) -> dict[str, nnx.State]:
    """The model's variables as a checkpoint holds them: parameters, and everything else (BatchNorm statistics,
    dropout RNG state), split as ``engine.init_train_state`` splits them."""
    _, params, model_state = nnx.split(model, nnx.Param, ...)
    return {"params": params, "model_state": model_state}


def save_model(path: str | Path, model: nnx.Module, meta: Mapping[str, Any]) -> Path:
    """Write ``model``'s weights as checkpoint 0 of a store at ``path`` (a new or empty directory)."""
    arrays = codecs.flax_to_arrays(model_template(model))
    return CheckpointStore(path, max_to_keep=None).save(0, arrays, {"framework": "jax", **meta})


def read_meta(path: str | Path, step: int | None = None) -> dict[str, Any]:
    """The metadata of checkpoint ``step`` (default: the latest) at ``path``."""
    return CheckpointStore(resolve(path)).read_meta(step)


def load_model(path: str | Path, model: nnx.Module, step: int | None = None) -> dict[str, Any]:
    """Overwrite ``model``'s variables with checkpoint ``step`` (default: the latest) at ``path``, of either
    framework; returns the checkpoint's metadata. ``CheckpointError`` (or ``port.PortError`` for torch weights)
    names what does not fit, and ``model`` is then unchanged."""
    arrays, meta = CheckpointStore(resolve(path)).read(step)
    _fill(model, arrays, meta)
    return meta


def _fill(model: nnx.Module, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> None:
    if meta.get("framework") == "torch":
        port.load_torch_state_dict(model, codecs.torch_model_arrays(arrays))
    else:
        state = codecs.flax_from_arrays(model_template(model), arrays, strict=False)
        nnx.update(model, state["params"], state["model_state"])


def torch_state_dict(path: str | Path, flax_model: Callable[[], nnx.Module], step: int | None = None
                     ) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(state_dict, meta)`` of checkpoint ``step`` at ``path`` in torch's layout (torch tensors); a Flax
    checkpoint is read into ``flax_model()`` (a model of the right architecture, built only for a Flax checkpoint)
    and ported."""
    import torch

    arrays, meta = CheckpointStore(resolve(path)).read(step)
    if meta.get("framework") == "torch":
        return {k: torch.from_numpy(np.array(v)) for k, v in codecs.torch_model_arrays(arrays).items()}, meta
    model = flax_model()
    _fill(model, arrays, meta)  # the arrays already read and verified: not a second read of the file
    return port.to_torch_state_dict(model), meta
