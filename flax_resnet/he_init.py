"""Activation variance per layer: notebook 004's ``verify_he_init``, for Flax NNX models.

``torch_ref.he_init.verify_he_init`` records the output of every ``Conv2d``/``Linear`` with forward hooks.
NNX has no hooks, so ``activation_variances`` puts a small recording wrapper in each conv/linear layer's slot
for the length of one forward pass and puts the layer back afterwards (also when the forward pass raises):
the model's graph is then exactly what it was. Layer names are torch's module names (from the port's
walker), so the two functions' results line up entry by entry.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from flax_resnet.port import named_layers

__all__ = ["activation_variances"]

_GraphKey = str | int


class _Recorder(nnx.Module):
    """Calls ``layer`` and hands its output to ``record``: a stand-in for torch's forward hook."""

    def __init__(self, layer: nnx.Module, record: Callable[[jax.Array], None]):
        self.layer = layer
        self.record = record

    def __call__(self, *args, **kwargs):
        out = self.layer(*args, **kwargs)
        self.record(out)
        return out


def _child(parent, key: _GraphKey):
    return parent[key] if isinstance(key, int) else getattr(parent, key)


def _set_child(parent, key: _GraphKey, value) -> None:
    if isinstance(key, int):
        parent[key] = value
    else:
        setattr(parent, key, value)


def activation_variances(model: nnx.Module, x: jax.Array) -> tuple[list[float], list[str]]:
    """Run ``model(x)`` once and return the output variance of every conv and linear layer.

    The Flax twin of the notebook's ``verify_he_init``: ``x`` is the input batch (NHWC for images; the
    notebook uses a unit-variance batch, e.g. ``jax.random.normal(key, (64, 32, 32, 3))``). Returns
    ``(variances, layer_names)`` like the torch function: one entry per conv/linear layer in the order the
    layers ran, the variance taken over all elements of the layer's output with the unbiased estimator (as
    ``torch.Tensor.var()``), and each name the torch module name ('layer1.0.conv1', 'fc').

    The forward pass is an ordinary one in the model's current mode: in train mode, as in torch, BatchNorm
    updates its running statistics. Apart from that the model is left exactly as it was.
    """
    outputs: dict[str, jax.Array] = {}

    def recorder(name: str) -> Callable[[jax.Array], None]:
        def record(out: jax.Array) -> None:
            outputs[name] = jax.lax.stop_gradient(out)

        return record

    layers = [(name, layer) for name, layer in named_layers(model) if isinstance(layer, nnx.Conv | nnx.Linear)]
    if layers and layers[0][0] == "":  # the model is itself a single conv/linear layer
        outputs[""] = model(x)
    else:
        paths = {id(module): path for path, module in nnx.iter_modules(model)}
        swapped: list[tuple[object, _GraphKey, nnx.Module]] = []
        try:
            for name, layer in layers:
                path = paths[id(layer)]
                parent = model
                for key in path[:-1]:
                    parent = _child(parent, key)
                _set_child(parent, path[-1], _Recorder(layer, recorder(name)))
                swapped.append((parent, path[-1], layer))
            model(x)
        finally:
            for parent, key, layer in reversed(swapped):
                _set_child(parent, key, layer)
    names = list(outputs)
    variances = [float(jnp.var(outputs[name], ddof=1)) for name in names]
    return variances, names
