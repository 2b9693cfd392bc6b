"""Training: ``train(config)``, the one way to set up a run, for the command line, the experiments, selftest and
the notebooks alike. It builds what ``config`` names and the caller did not pass (the model, the data, the
runner), then trains through one loop (``loop``) for both frameworks: an NNX module in JAX/Flax
(``flax_backend``, through a runner), a torch ``nn.Module`` in the PyTorch reference (``torch_backend``). Both see
the same batches for the same ``config.seed``."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
from flax import nnx

from flax_resnet import data, precision, registry, store, weights
from flax_resnet.config import ConfigError, RunConfig
from flax_resnet.errors import require
from flax_resnet.training import distributed, parallel
from flax_resnet.training.flax_backend import FlaxBackend
from flax_resnet.training.loop import (
    HISTORY_FILE,
    HISTORY_KEYS,
    PLOT_FILE,
    History,
    ProgressFactory,
    StepHook,
    TrainError,
    read_history,
    run,
)
from flax_resnet.training.outdir import claim_output_dir

__all__ = ["HISTORY_FILE", "HISTORY_KEYS", "PLOT_FILE", "TrainError", "TrainResult", "check", "read_history", "train"]


@dataclasses.dataclass
class TrainResult:
    """What a run ends with: the model (holding the trained weights), the history, and for Flax the whole final
    ``engine.TrainState`` (with the optimiser's state)."""

    model: Any
    history: History
    state: Any = None


def check(config: RunConfig, *, model: Any = None, dataset: Any = None) -> None:
    """Refuse ``config`` before anything is read or written (``ConfigError`` naming the option, or the missing
    extra): what ``train`` will have to read or create must be able to exist."""
    init_from, out = config.model.init_from, config.output.out_dir
    if isinstance(init_from, str | Path) and not Path(init_from).exists():
        raise ConfigError(f"--init-from {init_from}: no such file or directory.")
    if out is not None and Path(out).exists() and not Path(out).is_dir():
        raise ConfigError(f"--out {out} is a file, not a directory.")
    if model is None and config.model.name not in registry.MODELS:
        raise ConfigError(f"model {config.model.name!r} is not registered; pass it to train(model=...).")
    if dataset is None:
        data.check(config.data)
    if config.framework == "torch":
        require("torch", "--framework torch")
    init_file = Path(init_from) if isinstance(init_from, str | Path) else None
    if init_file is not None and init_file.is_file() and init_file.suffix.lower() != ".safetensors":
        require("torch", "--init-from FILE.pt (a .safetensors file needs no torch)")


def _exit_on_timeout(error: Exception) -> None:
    """A peer that never joins: end the process with the named error, before JAX aborts it 30 s later with a C++
    stack trace (a watchdog thread cannot raise into the main thread)."""
    sys.stdout.flush()
    print(f"error: {error}", file=sys.stderr, flush=True)
    os._exit(1)


def _build_model(config: RunConfig, model: Any) -> Any:
    """``model``, or the registered ``config.model`` built from ``config.seed``, with ``config.model.init_from``'s
    weights (``weights`` reads a mapping, a file or a checkpoint) and (Flax) ``config.precision`` applied."""
    name, kwargs, init_from = config.model.name, dict(config.model.kwargs), config.model.init_from
    jax_model = config.framework == "jax"
    if model is not None:
        if init_from is not None:
            weights.load(init_from, model)
        return model
    given = (name, kwargs) if name in registry.MODELS else None
    built, _, _ = weights.load_model(init_from, config.framework, model=given, seed=config.seed)
    return precision.apply_precision(built, config.precision) if jax_model else built


def train(config: RunConfig, *, model: Any = None, dataset: Any = None, runner: Any = None, device: Any = "cpu",
          progress: ProgressFactory | None = None, log: Callable[[str], None] | None = None,
          on_step: StepHook | None = None, title: str | None = None) -> TrainResult:
    """Train as ``config`` says; what is not passed is built from it.

    ``model``: an NNX module (framework 'jax') or a torch module ('torch'), trained in place; default: the
    registered ``config.model`` initialised from ``config.seed``, with ``config.model.init_from``'s weights.
    ``dataset``: a ``data.Dataset``; default: ``config.data`` loaded. ``runner``: for Flax, a ``runners.Runner``
    or a factory; default: ``config.parallel``'s. ``device``: where a torch model trains. ``progress``: a tqdm-like
    factory, used when ``config.output.progress``; ``log``: epoch lines; ``on_step(step, loss)`` (``loss()`` reads
    that step's loss); ``title`` of ``curves.png``. Outputs follow ``config.output``; a float64 run computes under
    ``jax.enable_x64(True)``, scoped to the run (use a float64 model it returns under that context too); a
    multi-host ``config.parallel`` joins its processes first, before any device is used.
    """
    check(config, model=model, dataset=dataset)
    # Scoped, not jax.config.update: a global switch left on by one float64 run made the process's later float32
    # runs compute their schedules in float64 (their recorded lr 0.1 instead of float32's 0.10000000149).
    with jax.enable_x64(True) if config.dtype == "float64" else contextlib.nullcontext():
        return _train(config, model, dataset, runner, device, progress, log, on_step, title)


def _train(config: RunConfig, model: Any, dataset: Any, runner: Any, device: Any, progress: ProgressFactory | None,
           log: Callable[[str], None] | None, on_step: StepHook | None, title: str | None) -> TrainResult:
    if config.framework == "jax":
        distributed.initialize_from_config(config.parallel, on_timeout=_exit_on_timeout)
    out = config.output.out_dir
    # Before data or models: an unwritable --out, or another run writing to it, fails in seconds. The processes of
    # one multi-process run share --out, so process 0 holds the claim for all of them.
    claim = claim_output_dir(out) if out is not None and jax.process_index() == 0 else None
    try:
        ckpt_dir = Path(out or ".") / store.CHECKPOINT_SUBDIR  # anything there (ours or not) is refused before data
        if out is not None and ckpt_dir.is_dir() and any(ckpt_dir.iterdir()) and not (
                config.output.resume or config.output.overwrite):
            raise TrainError(f"{out} already holds checkpoints of a run. Pass --resume to continue it, --overwrite "
                             "to start over, or choose another --out.")
        dataset = dataset if dataset is not None else data.load(config.data, log)
        model = _build_model(config, model)
        kind, framework = ("an NNX", "jax") if isinstance(model, nnx.Module) else ("a torch", "torch")
        if config.framework != framework:
            raise ConfigError(f"{kind} model trains with --framework {framework}, but the config says "
                              f"{config.framework}.")
        if framework == "jax":
            backend: Any = FlaxBackend(model, config, runner=runner or parallel.runner_factory(config.parallel))
        else:
            from flax_resnet.training.torch_backend import TorchBackend  # torch is an optional dependency

            backend = TorchBackend(model, config, device=device)
        if title is None and config.model.name in registry.MODELS:
            title = f"{registry.constructor_call(config.model.name, config.model.kwargs)}, {config.recipe.name}, " \
                    f"{framework}"
        history = run(backend, config, dataset, progress=progress if config.output.progress else None, log=log,
                      on_step=on_step, title=title)
    finally:
        if claim is not None:
            claim.release()
    return TrainResult(backend.finish(), history, getattr(backend, "final_state", None))


