"""One way to load and save weights, for a Flax NNX model or a torch one.

A source is a torch ``state_dict`` mapping (torch tensors or NumPy arrays), a ``.safetensors`` file (read with NumPy:
no torch needed), a torch file (``.pt``, loaded with ``weights_only=True``: a pickle that would run code is refused),
or a checkpoint directory of either framework (a run's ``--out``, a store directory, a ``port`` output), read once
and digest-checked by the store. A file is read as its first bytes say, whatever its name; a state_dict inside a
``{'state_dict': ...}`` or ``{'model': ...}`` wrapper, or with DataParallel's ``module.`` key prefix, is unwrapped,
and bfloat16 or float16 values are cast to the model's dtype, each with a ``Note`` warning (the command line prints
it as a ``note:`` line). ``load`` fills a model you built; ``load_model`` builds the registered model the
source records or fits; ``save`` writes a file or a checkpoint directory, by the destination's name (``_form``).
Misfits are one error naming what differs (and the model options that fit, if a registered model does); the model
is then unchanged. ``train --init-from``, ``port``, ``verify``, ``landscape`` and ``compare`` go through here.
"""

from __future__ import annotations

import os
import pickle
import re
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import jax
import numpy as np
import safetensors.numpy
from flax import nnx

from flax_resnet import _codecs, builders, files, port, registry
from flax_resnet.dtypes import cast_floating
from flax_resnet.errors import FlaxResnetError, Note, require
from flax_resnet.port import PortError
from flax_resnet.store import CheckpointError, CheckpointStore, resolve

__all__ = ["Source", "destination_form", "load", "load_model", "read_meta", "save"]

Source = Mapping[str, Any] | str | os.PathLike[str]
SAFETENSORS_SUFFIX = ".safetensors"
TORCH_SUFFIXES = (".pt", ".pth", ".bin")  # torch.save's usual names (.bin: Hugging Face's pytorch_model.bin)
HALF_DTYPES = ("bfloat16", "float16")
_WRAPPERS = ("state_dict", "model")  # {'state_dict': ...} (Lightning and many scripts), {'model': ...} (a training
_PREFIX = "module."  # checkpoint, this project's torch trainer too); torch.nn.DataParallel's key prefix


def _note(message: str) -> None:
    """How weights were read where it was not as given (a wrapper unwrapped, a prefix removed, half precision cast):
    a ``Note`` warning, which the command line prints as a ``note:`` line."""
    warnings.warn(message, Note, stacklevel=4)


Form = Literal["safetensors", "torch", "checkpoint"]
_FILE_FORMS: dict[str, Form] = {SAFETENSORS_SUFFIX: "safetensors", **{s: "torch" for s in TORCH_SUFFIXES}}
_ZIP, _PICKLE = b"PK\x03\x04", b"\x80"  # torch.save's zip file; its legacy format, a pickle (protocol 2+)


def _form(path: Path, *, writing: bool = False) -> Form:
    """The one place that tells what a path holds, for reading and for writing. An existing directory is a
    checkpoint. An existing file is read as its first bytes say (a safetensors header, a torch zip or pickle:
    ``W.SAFETENSORS`` or a safetensors file named ``.pt`` is read as what it is), whatever its name; one they do
    not tell is read by its name, a torch file unless it is named ``.safetensors``. Anything else (and every file
    to write: an existing file's content does not choose what replaces it) goes by its suffix, any case
    (``destination_form``)."""
    if path.is_dir():
        return "checkpoint"
    if not writing and path.is_file():
        return _sniff(path) or _FILE_FORMS.get(path.suffix.lower(), "torch")
    return destination_form(path)


def destination_form(path: str | os.PathLike[str]) -> Form:
    """What ``save`` writes at ``path``: an existing directory, or a name without suffix, a checkpoint directory;
    ``.safetensors`` (any case) a safetensors file, ``.pt``/``.pth``/``.bin`` a torch file. Another suffix
    (``x.safetensor``) is refused: it would otherwise become a checkpoint directory of that name."""
    path = Path(path).expanduser()
    if path.is_dir():
        return "checkpoint"
    suffix = path.suffix.lower()
    if suffix in _FILE_FORMS:
        return _FILE_FORMS[suffix]
    if suffix and not suffix[1:].isdigit():  # 'run-1.5' is a directory name, 'w.safetensor' a mistyped file
        raise PortError(f"{path}: the suffix {path.suffix!r} names no weights format; end the name in .safetensors "
                        f"or {'/'.join(TORCH_SUFFIXES)} for a file, or drop the suffix for a checkpoint directory.")
    return "checkpoint"


def _sniff(path: Path) -> Form | None:
    """The form a file's first bytes show, or None: safetensors (an 8-byte little-endian header length, then the
    JSON header's '{'), torch (a zip file, or a pickle: torch.save's legacy format)."""
    try:
        with path.open("rb") as f:
            head = f.read(9)
    except OSError:
        return None  # the reader says why
    if len(head) == 9 and head[8:9] == b"{" and 2 <= int.from_bytes(head[:8], "little") <= path.stat().st_size:
        return "safetensors"
    if head.startswith((_ZIP, _PICKLE)):
        return "torch"
    return None


def _existing(source: str | os.PathLike[str]) -> Path:
    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    return path


def _is_flax(model: Any) -> bool:
    if isinstance(model, nnx.Module):
        return True
    if not callable(getattr(model, "load_state_dict", None)):
        raise TypeError(f"expected a Flax NNX or a torch model, got {type(model).__name__}")
    return False


# ------------------------------------------------------------------------------------------------ reading
def read_meta(source: Source, step: int | None = None) -> dict[str, Any]:
    """What a checkpoint directory records with checkpoint ``step`` (default: the latest): model, model_kwargs,
    dtype, framework, recipe, epoch; its arrays are not read. ``{}`` for a mapping or a file (they record nothing)."""
    if isinstance(source, Mapping):
        return {}
    path = _existing(source)
    return CheckpointStore(resolve(path)).read_meta(step) if _form(path) == "checkpoint" else {}


def _read_file(path: Path) -> Mapping[str, Any]:
    """A state_dict from a file (unwrapped, ``_unwrapped``): a safetensors file as NumPy arrays (no torch needed),
    otherwise a torch file."""
    if _form(path) == "safetensors":
        try:
            state_dict = safetensors.numpy.load_file(path)
        except Exception as e:  # noqa: BLE001 - safetensors reports a damaged file as assorted errors
            raise PortError(f"cannot read {path} as a safetensors file: {' '.join(str(e).split())[:300]}") from e
    else:
        state_dict = _read_torch_file(path)
    return _unwrapped(state_dict, str(path))


def _unwrapped(state_dict: Mapping[str, Any], what: str) -> Mapping[str, Any]:
    """The state_dict inside the wrappers torch tooling writes and reads without a word: a ``{'state_dict': ...}``
    or ``{'model': ...}`` dict (a training checkpoint), keys prefixed ``module.`` (``torch.nn.DataParallel``);
    each removal is a ``Note``."""
    inner, keys = state_dict, []
    while key := next((k for k in _WRAPPERS if isinstance(inner.get(k), Mapping)), None):
        inner = inner[key]
        keys.append(key)
    if keys:
        left = sorted(str(k) for k in state_dict if k != keys[0])
        _note(f"{what}: read the weights in {''.join(f'[{k!r}]' for k in keys)}"
              + (f", leaving {', '.join(left[:4])}" if left else ""))
    if inner and all(isinstance(k, str) and k.startswith(_PREFIX) for k in inner):
        inner = {k[len(_PREFIX):]: v for k, v in inner.items()}
        _note(f"{what}: removed the {_PREFIX!r} prefix of every key (torch.nn.DataParallel's)")
    return inner


def _read_torch_file(path: Path) -> dict[str, Any]:
    """A state_dict from a torch file: a plain state_dict, or the model of a training checkpoint dict."""
    require("torch", f"reading {path} (a torch file; .safetensors needs no torch)")
    import torch

    try:  # weights_only: tensors and plain containers only; unpickling anything else could run code
        with path.open("rb") as f:  # a file object: torch.load reads a *.safetensors path as safetensors
            obj = torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\. Please|\n\n|$)", str(e), re.S)
        what = " ".join(found.group(1).split()) if found else "objects other than tensors"
        # the background and the conversion: docs/troubleshooting.md, "PATH holds pickled Python objects"
        raise PortError(f"{path} holds pickled Python objects ({what}), which torch.load refused to load "
                        "(weights_only=True) as they could run code: if you trust the file, load it yourself and "
                        "torch.save its state_dict().") from e
    except Exception as e:
        why = " ".join(str(e).split())[:300]
        if not zipfile.is_zipfile(path):
            why = f"not a complete file written by torch.save ({type(e).__name__}: {why})"
        raise PortError(f"cannot read {path} as a torch file: {why}") from e
    if not isinstance(obj, dict):
        raise PortError(f"{path} holds a {type(obj).__name__}, not a state_dict (tensor names to tensors): save "
                        "the model's state_dict() instead.")
    return obj


# ------------------------------------------------------------------------------------------------ loading
def _model_flags(name: str, kwargs: Mapping[str, Any]) -> str:
    """``--model SimpleResNet --n-blocks 1``: the options that build ``name`` with ``kwargs``."""
    flags = [f"{registry.MODEL_ARGS[k].flag} {' '.join(map(str, v)) if isinstance(v, list | tuple) else v}"
             for k, v in kwargs.items() if k in registry.MODEL_ARGS]
    return " ".join(["--model", name, *flags])


def _shapes(state_dict: Mapping[str, Any]) -> dict[str, tuple[int, ...]] | None:
    try:
        return {k: tuple(v.shape) for k, v in state_dict.items()}
    except AttributeError:  # a value that is no array: no model fits
        return None


def _weights_hint(state_dict: Mapping[str, Any], model: Any) -> str:
    """Which registered model some weights that do not fit ``model`` belong to, as the options to pass (or
    nothing: none fits, several do, or ``model`` itself has their keys and shapes and the misfit is in a value)."""
    own = port.torch_shapes(model) if _is_flax(model) else _shapes(model.state_dict())
    if _shapes(state_dict) == own:
        return ""
    try:
        other = builders.infer_model(state_dict)
    except Exception:  # noqa: BLE001 - only a hint: none of the models fits, or several
        return ""
    return f"\nThese look like the weights of {other[0]}: pass {_model_flags(*other)}."


def _dtype_name(value: Any) -> str:
    return str(getattr(value, "dtype", "")).removeprefix("torch.")


def _model_dtype(model: Any, is_flax: bool) -> str:
    """The dtype of the model's first parameter ('' without parameters)."""
    arrays = jax.tree.leaves(nnx.state(model, nnx.Param)) if is_flax else list(model.parameters())
    return _dtype_name(arrays[0]) if arrays else ""


def _fill(model: Any, state_dict: Mapping[str, Any], what: str) -> None:
    """``model`` (Flax or torch) given a torch-layout ``state_dict``; a misfit is one ``PortError``. Half-precision
    values (bfloat16, float16) are cast to the model's dtype, with a ``Note``: float32 holds each exactly."""
    is_flax = _is_flax(model)
    dtype = _model_dtype(model, is_flax)
    halves = sorted({_dtype_name(v) for v in state_dict.values()} & set(HALF_DTYPES) - {dtype})
    try:
        if is_flax:
            port.load_torch_state_dict(model, state_dict)
        else:
            import torch

            def tensor(value: Any) -> Any:  # torch reads no NumPy bfloat16 (ml_dtypes'): widened first, exactly
                return torch.as_tensor(value.astype(np.float32) if _dtype_name(value) == "bfloat16" else value)

            try:
                model.load_state_dict({k: tensor(v) for k, v in state_dict.items()}, strict=True)
            except RuntimeError as e:  # torch's report of a misfit
                raise PortError(f"{what} does not fit {type(model).__name__}: {e}") from e
    except PortError as e:
        raise PortError(f"{e}{_weights_hint(state_dict, model)}") from e
    if halves:
        _note(f"{what} holds {' and '.join(halves)} weights: loaded cast to the model's {dtype}")


def _template(model: nnx.Module) -> dict[str, nnx.State]:
    """An NNX model's variables as a checkpoint holds them: parameters and everything else (BatchNorm statistics,
    dropout RNG state), split as ``engine.init_train_state`` splits them."""
    _, params, model_state = nnx.split(model, nnx.Param, ...)
    return {"params": params, "model_state": model_state}


def _fill_flax(model: nnx.Module, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any], path: Path) -> None:
    """An NNX model given a checkpoint's arrays of either framework (a training checkpoint's optimiser state is
    left out)."""
    if meta.get("framework") == "torch":
        _fill(model, _codecs.torch_model_arrays(arrays), str(path))
        return
    try:
        state = _codecs.flax_from_arrays(_template(model), arrays, strict=False)
    except CheckpointError as e:
        name, kwargs = meta.get("model"), meta.get("model_kwargs") or {}
        hint = f"\n{path} holds weights of {name}: pass {_model_flags(name, kwargs)}." if name else ""
        raise CheckpointError(f"{e}{hint}") from e
    nnx.update(model, state["params"], state["model_state"])


def _torch_layout(arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any], path: Path) -> Mapping[str, Any]:
    """A checkpoint's model as a torch-layout state_dict: a torch run's as saved, a Flax one ported through the
    Flax model it records (built without initialisers, in the checkpoint's dtype)."""
    if meta.get("framework") == "torch":
        return _codecs.torch_model_arrays(arrays)
    name = meta.get("model")
    if name not in registry.MODELS:
        raise CheckpointError(f"{path} records no registered model, so its Flax weights cannot be ported to "
                              "torch: load them into the Flax model that wrote them.")
    dtype = meta.get("dtype", "float32")
    with jax.enable_x64(dtype == "float64"):  # scoped: a float64 checkpoint's values stay float64 on the way
        twin = cast_floating(builders.build_flax_to_fill(name, meta.get("model_kwargs") or {}), dtype)
        _fill_flax(twin, arrays, meta, path)
        return port.to_numpy_state_dict(twin)


def load(source: Source, model: Any, *, step: int | None = None) -> dict[str, Any]:
    """Fill ``model`` (Flax NNX or torch) in place with the weights of ``source`` (see the module docstring;
    ``step``: a checkpoint's step, default the latest); returns what a checkpoint records (``read_meta``), ``{}``
    for a mapping or a file. Values take the model's dtypes, as torch's ``load_state_dict`` does, except that a
    Flax checkpoint must match a Flax model exactly. A misfit raises ``PortError`` or ``CheckpointError`` and
    changes nothing."""
    if isinstance(source, Mapping):
        _fill(model, _unwrapped(source, "the state_dict"), "the state_dict")
        return {}
    path = _existing(source)
    if _form(path) != "checkpoint":
        _fill(model, _read_file(path), str(path))
        return {}
    arrays, meta = CheckpointStore(resolve(path)).read(step)
    if _is_flax(model):
        _fill_flax(model, arrays, meta, path)
    else:
        _fill(model, _torch_layout(arrays, meta, path), str(path))
    return meta


def _infer(state_dict: Mapping[str, Any], what: str) -> tuple[str, dict[str, Any]]:
    """The registered model ``state_dict`` fits (``builders.infer_model``); none or several: one ``PortError``."""
    try:
        return builders.infer_model(state_dict)
    except ValueError as e:
        raise PortError(f"{what}: {e}") from e


def _build(framework: str, name: str, kwargs: Mapping[str, Any], seed: int, fills: str | None) -> Any:
    """The registered model for ``framework``. ``fills``: what will overwrite its weights ('flax' a Flax
    checkpoint, every variable; 'torch' torch weights, all but a dropout model's RNG state; None: nothing), so a
    Flax model is built without running its initialisers where its every variable is overwritten
    (``builders.build_flax_to_fill``: 11 s of the 15-25 s a SimpleResNet(1) ``port`` took on 2 CPU cores)."""
    if framework == "torch":
        return builders.build_torch(name, kwargs, seed=seed)
    if framework != "jax":
        raise ValueError(f"framework must be 'jax' or 'torch', not {framework!r}")
    if fills is not None:
        net = builders.build_flax_to_fill(name, kwargs)
        if fills == "flax" or not jax.tree.leaves(nnx.state(net, nnx.RngState)):
            return net
    return builders.build_flax(name, kwargs, seed=seed)


def load_model(source: Source | None, framework: str, *, model: tuple[str, Mapping[str, Any]] | None = None,
               seed: int = 0, step: int | None = None) -> tuple[Any, str, dict[str, Any]]:
    """``(model, name, kwargs)``: the registered model for ``framework`` ('jax': Flax NNX, 'torch') filled from
    ``source`` (None: initialised from ``seed``). The model is ``model`` (name, constructor arguments), else the one
    a checkpoint records or the one registered model a state_dict fits; a checkpoint of another model is refused
    before its arrays are read. A Flax model takes the dtype a checkpoint records (float64 needs
    ``jax_enable_x64``)."""
    if source is None:
        if model is None:
            raise ValueError("name the model (model=(name, kwargs)) when there are no weights to infer it from")
        return _build(framework, *model, seed, fills=None), model[0], dict(model[1])
    meta: dict[str, Any] = {}
    state_dict: Mapping[str, Any] | None = None
    what = "the state_dict" if isinstance(source, Mapping) else str(source)
    if isinstance(source, Mapping):
        state_dict = _unwrapped(source, what)
    elif _form(path := _existing(source)) == "checkpoint":
        meta = read_meta(path, step)
    else:
        state_dict = _read_file(path)
    if state_dict is not None:
        name, kwargs = model or _infer(state_dict, what)
    else:
        recorded = meta.get("model"), meta.get("model_kwargs") or {}
        name, kwargs = model or recorded
        if name not in registry.MODELS:
            raise FlaxResnetError(f"{source} does not record a registered model; name it with --model")
        as_recorded = {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()}  # JSON has no tuples
        if recorded[0] is not None and recorded != (name, as_recorded):
            raise FlaxResnetError(f"{source} holds weights of {registry.constructor_call(*recorded)}, not of "
                                  f"{registry.constructor_call(name, kwargs)}; pass {_model_flags(*recorded)}")
    net = _build(framework, name, kwargs, seed, "torch" if state_dict is not None or meta.get("framework") == "torch"
                 else "flax")
    if framework == "jax" and "dtype" in meta:
        cast_floating(net, meta["dtype"])
    if state_dict is not None:
        _fill(net, state_dict, what)
    else:
        load(path, net, step=step)
    return net, name, dict(kwargs)


# ------------------------------------------------------------------------------------------------ saving
def save(model: Any, destination: str | os.PathLike[str], meta: Mapping[str, Any] | None = None) -> Path:
    """Write ``model``'s weights (Flax NNX or torch) to ``destination``, atomically (a failed write leaves nothing):
    a ``.safetensors`` file (NumPy only; torch reads it with ``safetensors.torch.load_file``), a torch file
    (``.pt``, ``torch.save``; what the torch model loads with ``strict=True``), or else a new checkpoint directory
    (checkpoint 0 of a store, recording ``meta``: model, model_kwargs, dtype, so ``load_model`` can rebuild it;
    files hold the state_dict alone). Returns ``destination`` as a path."""
    path = Path(destination).expanduser()
    form, is_flax = _form(path, writing=True), _is_flax(model)
    if form == "checkpoint":
        if is_flax:
            arrays, framework = _codecs.flax_to_arrays(_template(model)), "jax"
        else:
            arrays, framework = _codecs.torch_to_arrays(model)[0], "torch"
        CheckpointStore(path, max_to_keep=None).save(0, arrays, {"framework": framework, **(meta or {})})
        return path
    if form == "torch":
        require("torch", f"writing {path.name} (a torch file; .safetensors needs no torch)")
    path.parent.mkdir(parents=True, exist_ok=True)
    with files.atomic_path(path) as tmp:  # the umask's mode for both (safetensors' own temporary has 0600)
        if form == "safetensors":
            arrays = (port.to_numpy_state_dict(model) if is_flax else
                      {k: np.array(v.detach().cpu().numpy(), order="C") for k, v in model.state_dict().items()})
            safetensors.numpy.save_file(dict(arrays), tmp)
        else:
            import torch

            torch.save(port.to_torch_state_dict(model) if is_flax else model.state_dict(), tmp)
    return path
