"""Activation variance per layer: notebook 004's ``verify_he_init``, for Flax NNX models.

``torch_ref.he_init.verify_he_init`` records the output of every ``Conv2d``/``Linear`` with forward hooks.
NNX has no hooks, so ``activation_variances`` puts a recording wrapper in each such layer's slot for one forward
pass and puts the layer back afterwards (also when it raises). Layer names are torch's module names (the port's
walker), so the two functions' results line up entry by entry.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from flax_resnet.port import named_layers

__all__ = ["activation_variances"]


class _Recorder(nnx.Module):
    """Calls ``layer`` and hands its output to ``record``: a stand-in for torch's forward hook."""

    def __init__(self, layer: nnx.Module, record: Callable[[jax.Array], None]):
        self.layer = layer
        self.record = record

    def __call__(self, *args, **kwargs):
        out = self.layer(*args, **kwargs)
        self.record(jax.lax.stop_gradient(out))
        return out


def _set_child(parent, key: str | int, value) -> None:
    if isinstance(key, int):
        parent[key] = value
    else:
        setattr(parent, key, value)


def activation_variances(model: nnx.Module, x: jax.Array) -> tuple[list[float], list[str]]:
    """Run ``model(x)`` once and return ``(variances, layer_names)``, like ``torch_ref.he_init.verify_he_init``.

    ``x`` is the input batch (NHWC). One entry per conv/linear layer in the order the layers ran: the unbiased
    variance over all elements of its output (as ``torch.Tensor.var()``), and its torch module name
    ('layer1.0.conv1', 'fc'). The forward pass is an ordinary one in the model's current mode (in train mode
    BatchNorm updates its running statistics, as in torch); apart from that the model is left as it was.
    """
    if isinstance(model, nnx.Conv | nnx.Linear):  # itself one layer, named '' as torch's named_modules names it
        return [float(jnp.var(model(x), ddof=1))], [""]
    outputs: dict[str, jax.Array] = {}
    paths = {id(module): path for path, module in nnx.iter_modules(model)}
    swapped: list[tuple[object, str | int, nnx.Module]] = []
    try:
        for name, layer in named_layers(model):
            if isinstance(layer, nnx.Conv | nnx.Linear):
                *parents, key = paths[id(layer)]
                parent = functools.reduce(lambda p, k: p[k] if isinstance(k, int) else getattr(p, k), parents, model)
                _set_child(parent, key, _Recorder(layer, functools.partial(outputs.__setitem__, name)))
                swapped.append((parent, key, layer))
        model(x)
    finally:
        for parent, key, layer in reversed(swapped):
            _set_child(parent, key, layer)
    return [float(jnp.var(out, ddof=1)) for out in outputs.values()], list(outputs)
