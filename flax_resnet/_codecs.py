"""Private to the checkpoint store's users (``weights``, the training backends): a framework's training state <->
the named NumPy arrays of a ``flax_resnet.store.CheckpointStore``, bit for bit.

- Flax/JAX (``flax_to_arrays`` / ``flax_from_arrays``): each leaf of a pytree (an ``engine.TrainState``, an
  ``nnx.State``) under its ``jax.tree_util.keystr`` path, e.g. ``.params['conv1']['kernel'].value``; a PRNG key as
  its raw data, restored into a template's leaves (their sharding, a PRNG key's implementation).
- PyTorch (``torch_to_arrays`` / ``torch_from_arrays``, which import torch): ``model.state_dict()`` under
  ``model/<key>``, the optimiser's per-parameter tensors under ``optimizer/<parameter index>/<name>``, and its
  non-tensor rest (the parameter groups: lr, momentum, ...) as a JSON-able dict for the checkpoint's metadata.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from flax_resnet.dtypes import is_prng_key
from flax_resnet.store import CheckpointError

__all__ = ["MODEL_PREFIX", "OPTIMIZER_PREFIX", "flax_from_arrays", "flax_to_arrays", "torch_from_arrays",
           "torch_model_arrays", "torch_to_arrays"]

MODEL_PREFIX = "model/"
OPTIMIZER_PREFIX = "optimizer/"


def _check_fit(what: str, want: Mapping[str, tuple[np.dtype, tuple[int, ...]]], arrays: Mapping[str, np.ndarray],
               strict: bool = True) -> None:
    """One error for every way ``arrays`` do not fit ``want`` (name -> dtype and shape; ``strict``: no other
    names): counts first, then at most ten lines (enough to see the pattern, never a page) shared among the kinds,
    so that a long list of one kind does not hide the others."""
    mismatched = [f"{name}: saved {got.dtype.name}{list(got.shape)}, {what} has {dtype.name}{list(shape)}"
                  for name, (dtype, shape) in want.items()
                  if (got := arrays.get(name)) is not None and (got.dtype, got.shape) != (dtype, shape)]
    kinds = [(kind, items) for kind, items in (("missing", [name for name in want if name not in arrays]),
                                               ("unexpected", sorted(set(arrays) - set(want)) if strict else []),
                                               ("mismatched", mismatched)) if items]
    if not kinds:
        return
    counts = ", ".join(f"{len(items)} {kind}" for kind, items in kinds)
    shown = [f"{kind:<10} {item}" for kind, items in kinds for item in items[:10 // len(kinds)]]
    if hidden := sum(len(items) for _, items in kinds) - len(shown):
        shown.append(f"... and {hidden} more")
    raise CheckpointError(f"the checkpoint does not fit {what} ({counts}); build the model, model arguments, "
                          "optimiser and dtype its meta.json records:\n  " + "\n  ".join(shown))


# ------------------------------------------------------------------------------------------------ Flax
def flax_to_arrays(tree: Any) -> dict[str, np.ndarray]:
    """Every leaf of ``tree`` as a NumPy array keyed by its ``jax.tree_util.keystr`` path: copies on the host, safe
    to keep while training goes on; of a replicated array of a multi-process run (the runners' states are), this
    process's copy."""
    arrays = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if is_prng_key(leaf):
            leaf = jax.random.key_data(leaf)
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            if not leaf.sharding.is_fully_replicated:  # its first shard would be saved as if it were the whole
                raise CheckpointError(f"{jax.tree_util.keystr(path)} is split across processes; checkpoints hold "
                                      "replicated states only (each process holding the whole array)")
            leaf = leaf.addressable_data(0)
        arrays[jax.tree_util.keystr(path)] = np.array(leaf)  # a copy: jax may share host memory with NumPy on CPU
    return arrays


def _place(array: np.ndarray, sharding: jax.sharding.Sharding) -> jax.Array:
    """``array`` on the devices of ``sharding`` (all of it on each: the states here are replicated), from a private
    copy: on CPU ``jax.device_put`` may share the NumPy buffer even with ``may_alias=False`` (measured)."""
    if sharding.is_fully_addressable:
        return jax.device_put(np.array(array), sharding)
    return jax.make_array_from_callback(array.shape, sharding, lambda index: np.array(array[index]))


def _restored(leaf: jax.Array, array: np.ndarray) -> jax.Array:
    """``array`` as a leaf like the template's ``leaf``: on its sharding, a PRNG key with its implementation."""
    if is_prng_key(leaf):
        return jax.random.wrap_key_data(_place(array, jax.random.key_data(leaf).sharding),
                                        impl=jax.random.key_impl(leaf))
    return _place(array, leaf.sharding)


def flax_from_arrays(template: Any, arrays: Mapping[str, np.ndarray], *, strict: bool = True) -> Any:
    """A tree shaped like ``template`` with the values of ``arrays`` (as ``flax_to_arrays`` made them), or one
    ``CheckpointError`` listing what is missing, unexpected or mismatched. ``strict=False`` ignores arrays the
    template has no leaf for (weights read from a training checkpoint that also holds optimiser state)."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(template)
    leaves = {jax.tree_util.keystr(path): leaf for path, leaf in flat}
    shapes = {name: jax.eval_shape(jax.random.key_data, leaf) if is_prng_key(leaf) else leaf  # a key: its raw data's
              for name, leaf in leaves.items()}
    _check_fit("this state", {name: (np.dtype(w.dtype), tuple(w.shape)) for name, w in shapes.items()}, arrays, strict)
    return jax.tree_util.tree_unflatten(treedef, [_restored(leaf, arrays[name]) for name, leaf in leaves.items()])


# ----------------------------------------------------------------------------------------------- torch
def torch_model_arrays(arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The model's part of ``torch_to_arrays``' arrays, keyed as in its ``state_dict``."""
    return {k.removeprefix(MODEL_PREFIX): v for k, v in arrays.items() if k.startswith(MODEL_PREFIX)}


def torch_to_arrays(model: Any, optimizer: Any = None) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """``(arrays, extra)`` as the module docstring lays them out (``extra``: {} without an optimiser): copies, safe
    to keep while training goes on (in float32 or float64, ``torch_backend.TORCH_DTYPES``: dtypes NumPy has)."""
    import torch

    arrays = {MODEL_PREFIX + key: value.detach().cpu().numpy().copy() for key, value in model.state_dict().items()}
    extra: dict[str, Any] = {}
    if optimizer is not None:
        state_dict = optimizer.state_dict()
        other: dict[str, dict[str, Any]] = {}
        for index, values in state_dict["state"].items():
            for name, value in values.items():
                if isinstance(value, torch.Tensor):
                    arrays[f"{OPTIMIZER_PREFIX}{index}/{name}"] = value.detach().cpu().numpy().copy()
                else:
                    other.setdefault(str(index), {})[name] = value
        extra = {"param_groups": state_dict["param_groups"], "state": other}
    return arrays, extra


def torch_from_arrays(model: Any, optimizer: Any, arrays: Mapping[str, np.ndarray], extra: Mapping[str, Any]) -> None:
    """Load what ``torch_to_arrays`` made into ``model`` and ``optimizer`` (None: weights only), in place, after
    checking the model's keys, shapes and dtypes (one ``CheckpointError`` listing every misfit); ``load_state_dict``
    copies the values into the existing parameters, so an optimiser built on them stays valid."""
    import torch

    saved = torch_model_arrays(arrays)
    _check_fit(f"this {type(model).__name__}", {key: (torch.empty(0, dtype=t.dtype).numpy().dtype, tuple(t.shape))
                                                for key, t in model.state_dict().items()}, saved)
    # writable copies of their own (the store's arrays may be shared)
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in saved.items()})
    if optimizer is None:
        return
    if "param_groups" not in extra:
        raise CheckpointError("the checkpoint holds weights only, no optimiser state to resume from: start the run "
                              "without --resume, or from these weights with --init-from.")
    state: dict[int, dict[str, Any]] = {}
    for key, array in arrays.items():
        if key.startswith(OPTIMIZER_PREFIX):
            index, _, name = key.removeprefix(OPTIMIZER_PREFIX).partition("/")
            state.setdefault(int(index), {})[name] = torch.from_numpy(np.array(array))
    for index, values in extra["state"].items():
        state.setdefault(int(index), {}).update(values)
    try:
        optimizer.load_state_dict({"state": state, "param_groups": extra["param_groups"]})
    except (ValueError, KeyError, TypeError) as e:  # torch: "loaded state dict contains a parameter group that ..."
        raise CheckpointError(f"the checkpoint's optimiser state does not fit this {type(optimizer).__name__} "
                              f"({type(e).__name__}: {' '.join(str(e).split())[:300]}): resume with the optimiser "
                              "and model that wrote it.") from e
