"""Notebook 004's ``verify_he_init``: the output variance of every Conv2d/Linear layer, via forward hooks."""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["verify_he_init"]


def verify_he_init(model: nn.Module, input_shape: tuple[int, ...] = (64, 3, 32, 32), *,
                   x: torch.Tensor | None = None) -> tuple[list[float], list[str]]:
    """One forward pass (``torch.no_grad()``, the model's current mode) on a unit-variance batch; returns
    ``(variances, layer_names)``: ``Tensor.var()`` of each ``nn.Conv2d`` / ``nn.Linear`` output in the order the
    layers ran, with their ``named_modules()`` names. Two additions to the notebook: ``x`` feeds a given batch
    (to compare with the Flax twin), and the random batch has the model's dtype and device.
    """
    if x is None:
        reference = next(model.parameters())
        x = torch.randn(input_shape, dtype=reference.dtype, device=reference.device)  # unit-variance input

    activations: dict[str, torch.Tensor] = {}

    def get_activation(name):
        def hook(module, input, output):
            activations[name] = output.detach()

        return hook

    handles = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d | nn.Linear):
            handles.append(module.register_forward_hook(get_activation(name)))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()

    return [act.var().item() for act in activations.values()], list(activations)
