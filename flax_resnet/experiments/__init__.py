"""The notebooks' experiments, one module each, over ``common``. Each module has ``NAME``, ``BASE`` (its default
``config.RunConfig``), ``Settings`` (its own frozen settings), ``QUICK`` (a ``config.Preset``) and
``run(config, settings)``, which writes summary.md, results.json and a figure. The first four are
``settings.EXPERIMENTS``' (which imports no framework, for the command line's parsers); the modules that run
import JAX, and torch and matplotlib when they run.
"""

from __future__ import annotations

from flax_resnet.experiments.settings import EXPERIMENTS, Experiment

__all__ = ["EXPERIMENTS", "Experiment"]
