"""Weight porting between PyTorch ``state_dict``s and the Flax NNX models, both ways.

Generic, not a table per model: it walks the Flax module tree, names each layer as torch would (attribute
names joined by '.', ``nnx.Sequential`` children by index) and converts by layer kind:

| torch / Flax                           | torch key                  | Flax variable | conversion                  |
| -------------------------------------- | -------------------------- | ------------- | --------------------------- |
| Conv1d/2d/3d / nnx.Conv                | weight (O, I/g, *k), bias  | kernel, bias  | (*k, I/g, O) <-> (O, I/g, *k) |
| ConvTranspose1d/2d / nnx.ConvTranspose | weight (I, O/g, *k), bias  | kernel, bias  | see below                   |
| Linear / nnx.Linear                    | weight (out, in), bias     | kernel, bias  | transpose                   |
| BatchNorm1d/2d/3d / nnx.BatchNorm      | weight, bias               | scale, bias   | none                        |
|                                        | running_mean, running_var  | mean, var     | none                        |
|                                        | num_batches_tracked        | same name     | int64 <-> int32             |
| LayerNorm / nnx.LayerNorm              | weight, bias               | scale, bias   | none                        |
| GroupNorm / nnx.GroupNorm              | weight, bias               | scale, bias   | none                        |
| Embedding / nnx.Embed                  | weight (num, dim)          | embedding     | none                        |

Grouped, depthwise and dilated convolutions (``feature_group_count``, ``kernel_dilation``) keep that layout, g
being the groups. A transposed convolution's kernel depends on ``transpose_kernel``: with it (as
``layers.ConvTranspose2d`` builds it) the Flax kernel is torch's weight in the forward convolution's layout,
(*k, O/g, I), the conv conversion; without it (stock ``nnx.ConvTranspose``'s default) it is (*k, I, O) and
flipped in space, as ``lax.conv_transpose`` correlates where torch convolves. Affine-free norms
(``use_scale``/``use_bias`` False, torch's ``elementwise_affine=False`` / ``bias=False``) have no such keys.
Modules without variables (activations, pooling, Dropout, containers) have nothing to port; a module of another
kind that holds variables is refused by name.

Loading checks everything before it changes anything: one ``PortError`` lists every missing key, unexpected
key and shape mismatch (like torch's strict loading) and the model is left untouched.

Files (``.safetensors``, ``.pt``) and checkpoint directories are read and written by ``flax_resnet.weights``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from os import PathLike
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from flax_resnet.errors import FlaxResnetError, require

__all__ = ["PortError", "load_torch_state_dict", "named_layers", "named_modules", "to_numpy_state_dict",
           "to_torch_state_dict", "torch_keys", "torch_shapes"]


class PortError(FlaxResnetError, ValueError):
    """A state_dict that does not fit the model; the message lists every problem at once."""


@dataclass(frozen=True)
class _Tensor:
    """One torch tensor and the Flax variable that holds it."""

    key: str
    variable: nnx.Variable
    to_torch: Callable[[np.ndarray], np.ndarray]
    from_torch: Callable[[np.ndarray], np.ndarray]

    @property
    def torch_shape(self) -> tuple[int, ...]:
        return tuple(self.to_torch(np.empty(self.variable.shape, dtype=np.uint8)).shape)


def _same(a: np.ndarray) -> np.ndarray:
    return a


def _kernel_to_torch(a: np.ndarray) -> np.ndarray:
    """Flax (*k, I, O) -> torch (O, I, *k), for any number of spatial axes."""
    return np.transpose(a, (a.ndim - 1, a.ndim - 2, *range(a.ndim - 2)))


def _kernel_from_torch(a: np.ndarray) -> np.ndarray:
    """torch (O, I, *k) -> Flax (*k, I, O)."""
    return np.transpose(a, (*range(2, a.ndim), 1, 0))


def _flipped_kernel_to_torch(a: np.ndarray) -> np.ndarray:
    """Stock ``nnx.ConvTranspose`` (*k, I, O), spatially flipped -> torch's ConvTranspose (I, O, *k)."""
    spatial = tuple(range(2, a.ndim))
    return np.flip(np.transpose(a, (a.ndim - 2, a.ndim - 1, *range(a.ndim - 2))), spatial)


def _flipped_kernel_from_torch(a: np.ndarray) -> np.ndarray:
    """torch's ConvTranspose (I, O, *k) -> stock ``nnx.ConvTranspose`` (*k, I, O), spatially flipped."""
    return np.transpose(np.flip(a, tuple(range(2, a.ndim))), (*range(2, a.ndim), 0, 1))


def _transpose(a: np.ndarray) -> np.ndarray:
    return np.transpose(a)


def _children(module: nnx.Module) -> Iterator[tuple[str, nnx.Module]]:
    if isinstance(module, nnx.Sequential):
        for index, child in enumerate(module.layers):
            if isinstance(child, nnx.Module):
                yield str(index), child
    else:
        for name, child in vars(module).items():
            if isinstance(child, nnx.Module) and not name.startswith("_"):
                yield name, child


# The Flax layer kinds the port knows; every other module holding variables directly is refused by name.
_LAYERS = (nnx.Conv, nnx.ConvTranspose, nnx.Linear, nnx.BatchNorm, nnx.LayerNorm, nnx.GroupNorm, nnx.Embed)
_KNOWN = ("conv (nnx.Conv, nnx.ConvTranspose), linear, BatchNorm, LayerNorm, GroupNorm and embedding (nnx.Embed) "
          "layers are known")


def _layer_tensors(prefix: str, layer: nnx.Module) -> list[_Tensor]:
    if isinstance(layer, nnx.ConvTranspose) and not layer.transpose_kernel:
        pairs = [("weight", layer.kernel, _flipped_kernel_to_torch, _flipped_kernel_from_torch),
                 ("bias", layer.bias, _same, _same)]
    elif isinstance(layer, nnx.Conv | nnx.ConvTranspose):
        pairs = [("weight", layer.kernel, _kernel_to_torch, _kernel_from_torch), ("bias", layer.bias, _same, _same)]
    elif isinstance(layer, nnx.Linear):
        pairs = [("weight", layer.kernel, _transpose, _transpose), ("bias", layer.bias, _same, _same)]
    elif isinstance(layer, nnx.BatchNorm):
        pairs = [("weight", layer.scale, _same, _same), ("bias", layer.bias, _same, _same),
                 ("running_mean", layer.mean, _same, _same), ("running_var", layer.var, _same, _same),
                 ("num_batches_tracked", getattr(layer, "num_batches_tracked", None), _same, _same)]
    elif isinstance(layer, nnx.LayerNorm | nnx.GroupNorm):
        pairs = [("weight", layer.scale, _same, _same), ("bias", layer.bias, _same, _same)]
    elif isinstance(layer, nnx.Embed):
        pairs = [("weight", layer.embedding, _same, _same)]
    else:
        raise TypeError(f"cannot port layer {prefix!r} of kind {type(layer).__name__}: only {_KNOWN}")
    return [_Tensor(prefix + name, var, to_t, from_t) for name, var, to_t, from_t in pairs if var is not None]


def _iter_layers(module: nnx.Module, name: str) -> Iterator[tuple[str, nnx.Module]]:
    if isinstance(module, _LAYERS):
        yield name, module
        return
    own = [k for k, v in vars(module).items() if isinstance(v, nnx.Variable) and not k.startswith("_")]
    if own:
        raise TypeError(f"cannot port {type(module).__name__} at {name or 'the root'!r}: it holds variables "
                        f"{own} directly; only {_KNOWN}")
    for child_name, child in _children(module):
        yield from _iter_layers(child, f"{name}.{child_name}" if name else child_name)


def named_layers(model: nnx.Module) -> list[tuple[str, nnx.Module]]:
    """Every layer of ``model`` that holds weights (conv, linear, BatchNorm, LayerNorm, GroupNorm, embedding) with
    its torch module name, in torch's order.

    The names are those of ``torch_model.named_modules()`` for the torch twin ('layer1.0.conv1',
    'layer2.0.downsample.0'; '' if ``model`` is itself such a layer), in registration order, which is also
    the order of the ``state_dict``.
    """
    return list(_iter_layers(model, ""))


def named_modules(model: nnx.Module) -> list[tuple[str, nnx.Module]]:
    """Every module in ``model`` (``model`` itself first, as '') with the name torch gives its twin.

    Like ``torch.nn.Module.named_modules()``: depth first, parents before children, each module once. The
    names follow the same rule as the port's keys (attribute names joined by '.', ``nnx.Sequential`` children
    by index), so containers and layers without weights (an empty shortcut, an ``Identity``) are named too:
    what ``flax_resnet.parity`` needs to pair each torch module with its NNX twin.
    """
    found: list[tuple[str, nnx.Module]] = []
    seen: set[int] = set()

    def visit(module: nnx.Module, name: str) -> None:
        if id(module) in seen:  # shared: torch lists it once, under its first name
            return
        seen.add(id(module))
        found.append((name, module))
        for child_name, child in _children(module):
            visit(child, f"{name}.{child_name}" if name else child_name)

    visit(model, "")
    return found


def _walk(module: nnx.Module) -> Iterator[_Tensor]:
    """Every torch tensor of ``module``, in torch's ``state_dict`` order (registration order)."""
    for name, layer in _iter_layers(module, ""):
        yield from _layer_tensors(f"{name}." if name else "", layer)


def torch_keys(model: nnx.Module) -> list[str]:
    """The ``state_dict`` keys that the torch twin of ``model`` has, in torch's order."""
    return [t.key for t in _walk(model)]


def torch_shapes(model: nnx.Module) -> dict[str, tuple[int, ...]]:
    """torch key -> the shape torch gives that tensor, for the torch twin of ``model``, in torch's order.

    What ``builders.infer_model`` compares a ``state_dict``'s shapes with: keys alone would accept weights
    whose layers are named like a registered model's but sized otherwise (another width or number of
    classes), which ``load_torch_state_dict`` would then reject. Only shapes are read, so an abstract model
    from ``nnx.eval_shape`` will do.
    """
    return {t.key: t.torch_shape for t in _walk(model)}


def _to_numpy(key: str, value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor; torch is imported only by whoever made it
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            value = value.float()
        return value.numpy()
    if isinstance(value, np.ndarray | np.generic | jnp.ndarray):
        return np.asarray(value)
    raise PortError(f"value for {key!r} is a {type(value).__name__}, not a tensor or array")


_LISTED = 8  # keys named per kind of problem; a whole model of another architecture would list hundreds


def _some(keys: list[Any]) -> str:
    shown = ", ".join(map(str, keys[:_LISTED]))
    return shown + (f", ... and {len(keys) - _LISTED} more" if len(keys) > _LISTED else "")


def load_torch_state_dict(model: nnx.Module, state_dict: Mapping[str, Any]) -> None:
    """Copy a torch ``state_dict`` (torch tensors or numpy arrays) into ``model`` in place (a file or a checkpoint:
    ``flax_resnet.weights.load``).

    Values are cast to the model's dtypes, as ``torch.nn.Module.load_state_dict`` does. Raises ``PortError``
    listing every missing key, unexpected key and shape mismatch; then nothing has been changed.
    """
    if not isinstance(state_dict, Mapping):
        is_path = isinstance(state_dict, str | PathLike)
        hint = "; read a file with flax_resnet.weights.load(path, model)" if is_path else ""
        raise PortError(f"expected a state_dict (a mapping of names to tensors), got {type(state_dict).__name__}{hint}")
    expected = {t.key: t for t in _walk(model)}
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    problems, updates = [], []
    for key, spec in expected.items():
        if key not in state_dict:
            continue
        try:
            array = _to_numpy(key, state_dict[key])
        except PortError as e:
            problems.append(str(e))
            continue
        if tuple(array.shape) != spec.torch_shape:
            problems.append(f"size mismatch for {key}: the state_dict has shape {tuple(array.shape)}, "
                            f"the model needs {spec.torch_shape}")
            continue
        target = np.dtype(spec.variable.dtype)
        if target.kind == "i" and array.size and not (np.iinfo(target).min <= array.min() and
                                                      array.max() <= np.iinfo(target).max):
            # torch counts batches in int64; JAX without x64 in int32, where 2**31 would wrap negative
            problems.append(f"{key} = {array.max()} does not fit the Flax model's {target.name} counter (at most "
                            f"{np.iinfo(target).max}; torch counts in int64): it would wrap around")
            continue
        # A copy: on CPU, JAX may alias a numpy buffer, and torch's buffers are updated in place later.
        updates.append((spec.variable, np.array(spec.from_torch(array), copy=True)))
    if missing or unexpected or problems:
        lines = [f"the state_dict does not fit {type(model).__name__}:"]
        if missing:
            lines.append(f"  missing key(s) ({len(missing)}): {_some(missing)}")
        if unexpected:
            lines.append(f"  unexpected key(s) ({len(unexpected)}): {_some(unexpected)}")
            if all(str(k).startswith("module.") for k in unexpected):
                lines.append("  (every unexpected key starts with 'module.': strip that DataParallel prefix)")
            elif isinstance(state_dict.get("model"), Mapping):
                lines.append("  (it holds a 'model' entry: a training checkpoint; pass its ['model'] state_dict)")
            elif len(expected) - len(missing) < len(expected) / 2:
                lines.append(f"  (only {len(expected) - len(missing)} of the {len(expected)} keys match: these look "
                             "like the weights of another model)")
        lines += [f"  {p}" for p in problems[:_LISTED]]
        if len(problems) > _LISTED:
            lines.append(f"  ... and {len(problems) - _LISTED} more size mismatches")
        lines.append("The model was not changed.")
        raise PortError("\n".join(lines))
    converted = [(var, jnp.asarray(value, dtype=var.dtype)) for var, value in updates]
    for var, value in converted:
        var[...] = value


def to_numpy_state_dict(model: nnx.Module) -> OrderedDict[str, np.ndarray]:
    """The model's weights in torch's layout and names, as NumPy arrays (no torch needed)."""
    state_dict = OrderedDict()
    for spec in _walk(model):
        array = np.array(spec.to_torch(np.asarray(spec.variable[...])), order="C")
        if spec.key.endswith("num_batches_tracked"):
            array = array.astype(np.int64)
        state_dict[spec.key] = array
    return state_dict


def to_torch_state_dict(model: nnx.Module) -> OrderedDict:
    """The model's weights as a torch ``state_dict`` that the torch twin loads with ``strict=True``."""
    require("torch", "to_torch_state_dict (flax_resnet.port.to_numpy_state_dict needs no torch)")
    import torch

    def tensor(array: np.ndarray) -> Any:  # torch.from_numpy, not ascontiguousarray: that makes 0-d arrays 1-d
        if array.dtype.name == "bfloat16":  # NumPy's bfloat16 (ml_dtypes) is no dtype torch reads: the same bits
            return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(array)

    return OrderedDict((k, tensor(v)) for k, v in to_numpy_state_dict(model).items())
