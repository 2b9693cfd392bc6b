"""Parity of a PyTorch module and its Flax NNX port: does the port compute what torch computes, and where not?

- ``compare`` (``parity.forward``): one forward and backward pass, layer by layer.
"""

from __future__ import annotations

from flax_resnet.parity.forward import (
    PORT_DEFECT,
    PRECISION_FACTOR,
    PRECISION_FLOOR,
    PRECISION_LOSS,
    ROUNDING,
    TOLERANCES,
    ParityReport,
    Row,
    Tolerance,
    compare,
    perturb_batchnorm,
)

__all__ = ["PORT_DEFECT", "PRECISION_FACTOR", "PRECISION_FLOOR", "PRECISION_LOSS", "ROUNDING", "TOLERANCES",
           "ParityReport", "Row", "Tolerance", "compare", "perturb_batchnorm"]
