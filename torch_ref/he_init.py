"""Notebook 004's ``verify_he_init``: the output variance of every Conv2d/Linear layer, via forward hooks."""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["verify_he_init"]


def verify_he_init(model: nn.Module, input_shape: tuple[int, ...] = (64, 3, 32, 32), *,
                   x: torch.Tensor | None = None) -> tuple[list[float], list[str]]:
    """Run one forward pass on a unit-variance batch and return ``(variances, layer_names)``: ``Tensor.var()`` of
    each ``nn.Conv2d`` / ``nn.Linear`` output, in the order the layers ran, with the ``named_modules()`` names.

    As the notebook writes it: forward hooks capture the outputs of ``model(x)`` under ``torch.no_grad()`` in the
    model's current mode (in train mode BatchNorm updates its running statistics). Two additions: ``x`` feeds a
    given batch instead of ``torch.randn(input_shape)`` (to compare with the Flax twin on the same input), and the
    random batch has the model's dtype and device, so that a float64 or GPU model works too.
    """
    if x is None:
        reference = next(model.parameters(), None)
        options = {} if reference is None else {"dtype": reference.dtype, "device": reference.device}
        x = torch.randn(input_shape, **options)  # unit-variance input

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
