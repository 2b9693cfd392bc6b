"""One way to load weights into a model of either framework: a torch state_dict file (.safetensors or .pt), or a
checkpoint directory of either framework (a run's ``--out`` or a ``port`` output). ``train --init-from``, ``port``
and ``verify`` load through ``load_model``."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from flax_resnet import checkpoint, port, registry
from flax_resnet.errors import FlaxResnetError

__all__ = ["load_model"]


def _model_flags(name: str, kwargs: Mapping[str, Any]) -> str:
    """``--model SimpleResNet --n-blocks 1``: the options that build ``name`` with ``kwargs``."""
    flags = [f"{registry.MODEL_ARGS[k].flag} {' '.join(map(str, v)) if isinstance(v, list | tuple) else v}"
             for k, v in kwargs.items() if k in registry.MODEL_ARGS]
    return " ".join(["--model", name, *flags])


def _weights_hint(state_dict: Any, name: str, kwargs: Mapping[str, Any]) -> str:
    """Which registered model some misfitting weights belong to, as the options to pass (or nothing)."""
    try:
        other = registry.infer_model(state_dict)
    except Exception:  # noqa: BLE001 - only a hint: none of the models fits, or several
        return ""
    if other == (name, kwargs):
        return ""
    return f"\nThese look like the weights of {other[0]}: pass {_model_flags(*other)}."


def load_model(path: Path | None, given: tuple[str, dict] | None, build: Callable[[str, dict], Any],
                  framework: str, step: int | None = None) -> tuple[Any, str, dict]:
    """``(model, name, kwargs)``: ``build(name, kwargs)`` (a Flax model for ``framework`` 'jax', a torch one for
    'torch') with the weights at ``path``, a state_dict file (.safetensors or .pt) or a checkpoint of either
    framework (``None``: the model as built). The model is ``given``, else the one the checkpoint records or the one
    registered model the state_dict fits; a checkpoint of another model than ``given`` is refused before its arrays
    are read, and weights that do not fit name the model they do fit, if one does."""
    if path is None:
        return build(*given), *given
    if path.is_dir():
        meta = checkpoint.read_meta(path, step)
        recorded = meta.get("model"), meta.get("model_kwargs") or {}
        name, kwargs = given or recorded
        if name not in registry.MODELS:
            raise FlaxResnetError(f"{path} does not record a registered model; name it with --model")
        as_recorded = {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()}  # JSON has no tuples
        if recorded[0] is not None and recorded != (name, as_recorded):
            raise FlaxResnetError(f"{path} holds weights of {registry.constructor_call(*recorded)}, not of "
                                  f"{registry.constructor_call(name, kwargs)}; pass {_model_flags(*recorded)}")
        state_dict = None
    else:
        state_dict = port.read_state_dict(path)
        name, kwargs = given or registry.infer_model(state_dict)
    model = build(name, kwargs)
    is_torch = framework == "torch"
    if state_dict is None:
        if not is_torch:
            checkpoint.load_model(path, model, step)
            return model, name, kwargs
        state_dict, _ = checkpoint.torch_state_dict(path, lambda: registry.build_flax_to_fill(name, kwargs), step)
    try:
        if not is_torch:
            port.load_torch_state_dict(model, state_dict)
        else:
            import torch

            try:
                model.load_state_dict({k: torch.as_tensor(v) for k, v in state_dict.items()}, strict=True)
            except RuntimeError as e:  # torch's report of a misfit
                raise port.PortError(f"{path} does not fit {name}: {e}") from e
    except port.PortError as e:
        raise port.PortError(f"{e}{_weights_hint(state_dict, name, kwargs)}") from e
    return model, name, kwargs
