"""Checkpoints with orbax-checkpoint: one per epoch, written atomically, the last few kept.

A checkpoint directory is an orbax ``CheckpointManager`` root; each step (the number of epochs completed; 0
for a checkpoint made by ``port``) holds up to three items:

- ``model``: ``{"params": ..., "model_state": ...}``, the model's parameters and its other variables
  (BatchNorm statistics, dropout RNG state), as the ``nnx.State`` pytrees of ``engine.TrainState``;
- ``opt``: ``{"opt_state": ..., "step": ...}``, the optimiser's state (training checkpoints only);
- ``meta``: JSON: model name and arguments, recipe, seed, dtype, epoch, the history so far.

So weights can be read without knowing the optimiser (porting, ``--init-from``), and a run resumes from
``model`` + ``opt`` + ``meta`` exactly where it stopped. Orbax writes each step into a temporary directory
and renames it when complete, so an interrupted save never leaves a checkpoint that looks whole. Saves are
synchronous: the training step donates the state's buffers, which must not be reused while being written.

A run's output directory keeps its checkpoints in ``checkpoints/``; functions taking a path accept either.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx

from flax_resnet.engine import TrainState

__all__ = ["CHECKPOINT_SUBDIR", "CheckpointError", "Checkpoints", "load_model", "read_meta", "resolve",
           "save_model"]

CHECKPOINT_SUBDIR = "checkpoints"


class CheckpointError(RuntimeError):
    """No checkpoint where one was expected, or one that does not fit the model or the run."""


def resolve(path: str | Path) -> Path:
    """The checkpoint root for ``path``: a run's output directory (its ``checkpoints/``) or the root itself."""
    path = Path(path).expanduser()
    return path / CHECKPOINT_SUBDIR if (path / CHECKPOINT_SUBDIR).is_dir() else path


def _abstract(tree: Any) -> Any:
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


class Checkpoints:
    """The checkpoints of one directory; a thin layer over ``ocp.CheckpointManager`` (use as a context)."""

    def __init__(self, directory: str | Path, *, max_to_keep: int | None = 3, create: bool = True):
        self.directory = Path(directory).expanduser().absolute()
        if not create and not self.directory.is_dir():
            raise CheckpointError(f"no checkpoint directory at {self.directory}")
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=create,
                                               enable_async_checkpointing=False)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def __enter__(self) -> Checkpoints:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._manager.close()

    @property
    def steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    @property
    def latest(self) -> int | None:
        return self._manager.latest_step()

    def _step(self, step: int | None) -> int:
        step = self.latest if step is None else step
        if step is None or step not in self.steps:
            raise CheckpointError(f"no checkpoint {'' if step is None else f'{step} '}in {self.directory}")
        return step

    def save(self, step: int, state: TrainState | None, meta: dict[str, Any], *,
             model: tuple[nnx.State, nnx.State] | None = None) -> None:
        """Write step ``step``: the whole ``state`` (or only ``model`` = (params, model_state)) and ``meta``."""
        params, model_state = (state.params, state.model_state) if state is not None else model
        items = {"model": ocp.args.StandardSave({"params": params, "model_state": model_state}),
                 "meta": ocp.args.JsonSave(meta)}
        if state is not None:
            items["opt"] = ocp.args.StandardSave({"opt_state": state.opt_state, "step": state.step})
        self._manager.save(step, args=ocp.args.Composite(**items), force=True)
        self._manager.wait_until_finished()

    def read_meta(self, step: int | None = None) -> dict[str, Any]:
        step = self._step(step)
        return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

    def restore(self, template: TrainState, step: int | None = None) -> tuple[TrainState, dict[str, Any]]:
        """The whole training state of step ``step`` (default: the latest), shaped like ``template``."""
        step = self._step(step)
        args = ocp.args.Composite(
            model=ocp.args.StandardRestore(_abstract({"params": template.params,
                                                      "model_state": template.model_state})),
            opt=ocp.args.StandardRestore(_abstract({"opt_state": template.opt_state, "step": template.step})),
            meta=ocp.args.JsonRestore())
        try:
            out = self._manager.restore(step, args=args)
        except Exception as e:  # orbax raises assorted types for a structure that does not fit
            raise CheckpointError(f"checkpoint {step} in {self.directory} does not fit this run "
                                  f"({type(e).__name__}: {e})") from e
        state = TrainState(out.model["params"], out.model["model_state"], out.opt["opt_state"], out.opt["step"])
        return state, out.meta

    def restore_model(self, params: nnx.State, model_state: nnx.State, step: int | None = None
                      ) -> tuple[nnx.State, nnx.State, dict[str, Any]]:
        """Only the model's variables (no optimiser), shaped like the templates."""
        step = self._step(step)
        args = ocp.args.Composite(
            model=ocp.args.StandardRestore(_abstract({"params": params, "model_state": model_state})),
            meta=ocp.args.JsonRestore())
        try:
            out = self._manager.restore(step, args=args)
        except Exception as e:
            raise CheckpointError(f"checkpoint {step} in {self.directory} does not fit "
                                  f"the model ({type(e).__name__}: {e})") from e
        return out.model["params"], out.model["model_state"], out.meta


def read_meta(path: str | Path, step: int | None = None) -> dict[str, Any]:
    """The JSON metadata of a checkpoint (default: the latest step) under ``path``."""
    with Checkpoints(resolve(path), create=False, max_to_keep=None) as ckpts:
        return ckpts.read_meta(step)


def save_model(path: str | Path, model: nnx.Module, meta: dict[str, Any], step: int = 0) -> Path:
    """Write ``model``'s variables (no optimiser state) as checkpoint ``step`` under ``path``."""
    _, params, model_state = nnx.split(model, nnx.Param, ...)
    directory = Path(path).expanduser()
    with Checkpoints(directory, max_to_keep=None) as ckpts:
        ckpts.save(step, None, meta, model=(params, model_state))
    return directory


def load_model(path: str | Path, model: nnx.Module, step: int | None = None) -> dict[str, Any]:
    """Load the variables of a checkpoint under ``path`` into ``model`` in place; returns its metadata."""
    _, params, model_state = nnx.split(model, nnx.Param, ...)
    with Checkpoints(resolve(path), create=False, max_to_keep=None) as ckpts:
        params, model_state, meta = ckpts.restore_model(params, model_state, step)
    nnx.update(model, params, model_state)
    return meta
