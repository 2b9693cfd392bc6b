"""The registered models (``flax_resnet.registry``) built by name: in Flax, initialised or zero-filled for weights
that overwrite them all, in torch, and which registered model a torch ``state_dict`` belongs to."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from flax import nnx

from flax_resnet import models
from flax_resnet.errors import require
from flax_resnet.port import torch_shapes
from flax_resnet.registry import MODEL_ARGS, MODELS, constructor_call, get_spec, model_kwargs

__all__ = ["build_flax", "build_flax_to_fill", "build_torch", "infer_model"]


def _build(module: Any, name: str, kwargs: Mapping[str, Any], **extra: Any) -> Any:
    spec = get_spec(name)
    fixed = {arg: getattr(module, class_name) for arg, class_name in spec.fixed.items()}
    return getattr(module, name)(**fixed, **model_kwargs(name, kwargs), **extra)


def build_flax(name: str, kwargs: Mapping[str, Any] | None = None, *, seed: int = 0) -> Any:
    """The Flax NNX model ``name``, initialised from ``seed``."""
    return _build(models, name, kwargs or {}, rngs=nnx.Rngs(seed))


def build_flax_to_fill(name: str, kwargs: Mapping[str, Any] | None = None) -> Any:
    """The Flax model ``name`` with zeros for every variable (PRNG keys: ``key(0)``), for code that overwrites them
    all (a port, a checkpoint read): the constructor is traced abstractly (``nnx.eval_shape``), as building it for
    real compiles every initialiser once per weight shape (11 s of the 15-25 s a one-block SimpleResNet's ``port``
    took on the CPU). ``nnx.merge`` sorts each module's attributes, so the constructor's order (torch's, which
    ``port`` follows for a state_dict's key order) is recorded while tracing and put back."""
    orders: dict[tuple[Any, ...], list[str]] = {}

    def build() -> Any:
        model = build_flax(name, kwargs, seed=0)
        orders.update((tuple(path), list(vars(module))) for path, module in nnx.iter_modules(model))
        return model

    graphdef, state = nnx.split(nnx.eval_shape(build))

    def fill(leaf: Any) -> Any:
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            key = jax.random.key(0)
            return key if leaf.shape == () else jax.random.split(key, leaf.shape)
        return jax.numpy.asarray(np.zeros(leaf.shape, leaf.dtype))

    model = nnx.merge(graphdef, jax.tree.map(fill, state))
    for path, module in nnx.iter_modules(model):
        attributes = vars(module)
        ordered = {k: attributes[k] for k in orders.get(tuple(path), ()) if k in attributes} | attributes
        attributes.clear()
        attributes.update(ordered)
    return model


def build_torch(name: str, kwargs: Mapping[str, Any] | None = None, *, seed: int | None = None) -> Any:
    """The torch model ``name``, with torch's own initialisation drawn after ``torch.manual_seed(seed)``."""
    require("torch", f"the PyTorch model {name}")
    import torch

    from torch_ref import models as torch_models

    if seed is not None:
        torch.manual_seed(seed)
    return _build(torch_models, name, kwargs or {})


def infer_model(state_dict: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """Which registered model a torch ``state_dict`` (name -> array) belongs to, with the constructor arguments read
    from its keys.

    Compares keys and shapes with each candidate built abstractly (``nnx.eval_shape``). A variant with another
    model's weights (ResNet18Dropout) is not a separate answer. ``ValueError`` when none or several fit; when none
    does, it names the nearest (most keys in common) and how the weights differ from it (a key too many or too few,
    a ``num_batches_tracked`` missing), as the misfit is most often a small edit of a registered model's weights.
    """
    matches: list[tuple[str, dict[str, Any]]] = []
    nearest: tuple[int, str, str] | None = None  # (keys in common, model, how the weights differ)
    for name, spec in MODELS.items():
        try:
            kwargs = model_kwargs(name, {a: MODEL_ARGS[a].from_keys(state_dict) for a in spec.args
                                         if MODEL_ARGS[a].from_keys is not None})
        except ValueError:  # keys of another model: no blocks where this one has them
            continue
        abstract = nnx.eval_shape(lambda name=name, kwargs=kwargs: build_flax(name, kwargs))
        shapes = torch_shapes(abstract)
        if set(shapes) == set(state_dict) and all(tuple(getattr(state_dict[key], "shape", ())) == shape
                                                  for key, shape in shapes.items()):
            matches.append((name, kwargs))
        common = len(set(shapes) & set(state_dict))
        if nearest is None or common > nearest[0]:
            nearest = (common, constructor_call(name, kwargs), _difference(state_dict, shapes))
    names = {name for name, _ in matches}
    matches = [(n, k) for n, k in matches if MODELS[n].same_weights_as not in names]
    if len(matches) != 1:
        found = "none of them" if not matches else "several: " + ", ".join(n for n, _ in matches)
        near = (f" The nearest is {nearest[1]}, from which they differ: {nearest[2]}."
                if not matches and nearest is not None and nearest[0] else "")
        raise ValueError(f"cannot tell which model these weights belong to ({found} of {', '.join(MODELS)} fit); "
                         f"name it with --model.{near}")
    return matches[0]


def _difference(state_dict: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]], listed: int = 3) -> str:
    """How ``state_dict`` differs from a model's keys and ``shapes``, briefly: a few names of each kind."""
    def some(keys: list[Any]) -> str:
        return ", ".join(map(str, keys[:listed])) + (f" and {len(keys) - listed} more" if len(keys) > listed else "")

    missing = [k for k in shapes if k not in state_dict]
    extra = [k for k in state_dict if k not in shapes]
    resized = [k for k in shapes if k in state_dict and tuple(getattr(state_dict[k], "shape", ())) != shapes[k]]
    parts = ([f"{len(missing)} key(s) missing ({some(missing)})"] if missing else []) + (
        [f"{len(extra)} key(s) more ({some(extra)})"] if extra else []) + (
        [f"{len(resized)} of another shape ({some(resized)})"] if resized else [])
    return "; ".join(parts)
