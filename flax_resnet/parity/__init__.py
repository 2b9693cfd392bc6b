"""Parity of a PyTorch module and its Flax NNX port: does the port compute what torch computes, and where not?

- ``compare`` (``parity.forward``): one forward and backward pass, layer by layer; in float32 each difference
  beyond the tolerance is classified against float64 references (rounding, port defect, precision loss), and
  ``report.diagnosis`` names the known trap that fits (``parity.diagnosis``).
- ``compare_training`` (``parity.training``): training steps with each framework's optimizer, compared after every
  step (loss, parameters, BatchNorm statistics, optimizer moments), with the known trap named when the numbers
  fit one; ``per_epoch`` makes an optax schedule of torch's per-epoch one.
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
from flax_resnet.parity.training import StepRow, TrainingReport, compare_training, per_epoch

__all__ = ["PORT_DEFECT", "PRECISION_FACTOR", "PRECISION_FLOOR", "PRECISION_LOSS", "ROUNDING", "TOLERANCES",
           "ParityReport", "Row", "StepRow", "Tolerance", "TrainingReport", "compare", "compare_training",
           "per_epoch", "perturb_batchnorm"]
