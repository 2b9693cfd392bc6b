"""Watching a model's modules during one call, shared by ``parity.forward`` (every module's outputs) and
``parity.diagnosis`` (the input and output of the layers it re-checks).

On the NNX side each watched module's class is swapped, for the duration of the call, for a subclass whose
``__call__`` also hands ``(args, output)`` to a callback. Why a subclass swapped in as the instance's class, not a
wrapper module put in the parent's attribute: the module stays the same object, so a parent that checks
``isinstance``, reads the child's weights or walks a ``Sequential``'s layers still sees what it expects; and no
parent attribute has to be found and restored. On the torch side forward hooks do this, torch's own mechanism.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from flax import nnx

Callback = Callable[[tuple, Any], None]  # (the call's positional arguments, its output)

_CALLBACKS: contextvars.ContextVar[dict[int, Callback] | None] = contextvars.ContextVar(
    "flax_resnet_parity_callbacks", default=None)
_WATCHING_CLASSES: dict[type, type] = {}


def _watching_class(cls: type) -> type:
    """``cls`` with a ``__call__`` that also calls the module's callback, if it has one (one subclass per class,
    cached)."""
    if cls not in _WATCHING_CLASSES:
        def __call__(self, *args, **kwargs):
            out = super(watching, self).__call__(*args, **kwargs)
            callbacks = _CALLBACKS.get()
            if callbacks is not None and id(self) in callbacks:
                callbacks[id(self)](args, out)
            return out

        watching = type(cls.__name__, (cls,), {"__call__": __call__, "__module__": cls.__module__,
                                               "__qualname__": cls.__qualname__})
        _WATCHING_CLASSES[cls] = watching
    return _WATCHING_CLASSES[cls]


@contextlib.contextmanager
def watching_flax(watched: Sequence[tuple[nnx.Module, Callback]]) -> Iterator[None]:
    """Within the block, each module's calls also call its callback; the classes are restored afterwards."""
    swapped = [(module, type(module)) for module, _ in watched]
    token = _CALLBACKS.set({id(module): callback for module, callback in watched})
    try:
        for module, cls in swapped:
            # object.__setattr__: NNX's own __setattr__ would register '__class__' as an attribute of the module
            object.__setattr__(module, "__class__", _watching_class(cls))
        yield
    finally:
        for module, cls in swapped:
            object.__setattr__(module, "__class__", cls)
        _CALLBACKS.reset(token)


def device_of(model: Any) -> Any:
    """The device of a torch module's first parameter (the CPU for a module without parameters)."""
    import torch

    for tensor in model.parameters():
        return tensor.device
    return torch.device("cpu")
