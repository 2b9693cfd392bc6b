"""The notebooks' experiments, one module each (``MODULES``), over ``common``. Each module has ``NAME``, ``BASE``
(its default ``config.RunConfig``), ``Settings`` (its own frozen settings), ``QUICK`` (a ``config.Preset``) and
``run(config, settings)``, which writes summary.md, results.json and a figure. Importing this package loads neither
torch, matplotlib nor tensorflow-datasets: the experiments do when they run.
"""

from __future__ import annotations

from types import ModuleType

from flax_resnet.experiments import ablation, common, compare, depth, init_variance, landscape, plain_vs_residual

__all__ = ["MODULES", "common"]

MODULES: tuple[ModuleType, ...] = (plain_vs_residual, depth, init_variance, ablation, landscape, compare)
