"""Checkpoints with orbax-checkpoint: one per epoch, written atomically, the last few kept.

A checkpoint directory is an orbax ``CheckpointManager`` root; each step (the number of epochs completed; 0
for a checkpoint made by ``port``) holds up to three items:

- ``model``: ``{"params": ..., "model_state": ...}``, the model's parameters and its other variables
  (BatchNorm statistics, dropout RNG state), as the ``nnx.State`` pytrees of ``engine.TrainState``;
- ``opt``: ``{"opt_state": ..., "step": ...}``, the optimiser's state (training checkpoints only);
- ``meta``: JSON: model name and arguments, recipe, seed, dtype, epoch, the history so far.

So weights can be read without knowing the optimiser (porting, ``--init-from``), and a run resumes from
``model`` + ``opt`` + ``meta`` exactly where it stopped. Orbax writes each step into a temporary directory
and renames it when complete, so an interrupted save never leaves a checkpoint that looks whole, and nothing is
overwritten in place; a failed save (a full disk) leaves the earlier steps as they were and its partial directory
is removed. Saves are synchronous: the training step donates the state's buffers, which must not be reused while
being written.

Integrity: ``meta`` records a SHA-256 digest of each array item (``digests``), checked on restore. Orbax notices
a truncated or missing file, but stores no checksum of array contents, so a flipped bit in a data file would
restore silently without it. ``restore_latest_good`` is the resume path: the newest checkpoint that reads back
whole and matches its digests; unreadable newer ones are moved aside to ``<root>.unreadable/`` (never deleted),
and each one is reported.

Errors: a failed save or restore is reported once, by its root cause; the tracebacks that orbax's abandoned
operations print later are dropped as echoes of it (``_FailedOperations``).

A run's output directory keeps its checkpoints in ``checkpoints/``; functions taking a path accept either.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import hashlib
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from flax_resnet.engine import TrainState
from flax_resnet.errors import FlaxResnetError

__all__ = ["CHECKPOINT_SUBDIR", "CheckpointError", "Checkpoints", "UNREADABLE_SUFFIX", "host_leaves", "load_model",
           "no_readable_checkpoint", "read_meta", "resolve", "save_model", "tree_digest", "unreadable_target"]

CHECKPOINT_SUBDIR = "checkpoints"
UNREADABLE_SUFFIX = ".unreadable"  # checkpoints that failed to restore go to <root>.unreadable/<step>


class CheckpointError(FlaxResnetError, RuntimeError):
    """No checkpoint where one was expected, or one that does not fit the model or the run."""


def resolve(path: str | Path) -> Path:
    """The checkpoint root for ``path``: a run's output directory (its ``checkpoints/``) or the root itself."""
    path = Path(path).expanduser()
    return path / CHECKPOINT_SUBDIR if (path / CHECKPOINT_SUBDIR).is_dir() else path


def _abstract(tree: Any) -> Any:
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def _host_array(leaf: Any) -> np.ndarray:
    if isinstance(leaf, jax.Array):
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            leaf = jax.random.key_data(leaf)
        if not leaf.is_fully_addressable:  # a replicated array of a multi-process run: this process's copy
            leaf = leaf.addressable_data(0)
    return np.ascontiguousarray(np.asarray(leaf))


def host_leaves(tree: Any) -> list[np.ndarray]:
    """Every leaf as a NumPy array (PRNG keys as their raw data), in tree order: what the digest reads, and what
    the tests compare bit for bit."""
    return [_host_array(leaf) for leaf in jax.tree.leaves(tree)]


def tree_digest(tree: Any) -> str:
    """SHA-256 of every leaf's path, dtype, shape and bytes, in tree order (see the module docstring for why)."""
    h = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        array = _host_array(leaf)
        h.update(f"{jax.tree_util.keystr(path)}|{array.dtype.name}|{array.shape}|".encode())
        h.update(array.tobytes())
    return h.hexdigest()


def _chain(e: BaseException | None) -> list[BaseException]:
    """``e`` and the exceptions behind it (``raise ... from``, or raised while handling), outermost first."""
    chain = []
    while e is not None:
        chain.append(e)
        e = e.__cause__ or e.__context__
    return chain


def _short(e: BaseException, limit: int = 300) -> str:
    """The root cause of an orbax error, on one line: orbax wraps tensorstore's precise message ('Requested byte
    range ... is not valid', 'No space left on device') in exceptions that print object reprs."""
    e = _chain(e)[-1]
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"


_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # no room: the disk, a quota, a file size limit


def _no_room(e: BaseException | None) -> str | None:
    """The OS's words for 'no room' anywhere in the chain (tensorstore reports them inside a ValueError's text)."""
    for link in _chain(e):
        if isinstance(link, OSError) and link.errno in _FULL:
            return os.strerror(link.errno)
        for code in _FULL:
            if os.strerror(code) in str(link):
                return os.strerror(code)
    return None


def unreadable_target(directory: Path, name: str) -> Path:
    """A free path for checkpoint ``name`` of ``directory`` in ``<directory>.unreadable/`` (``name``, then
    ``name-1``, ...: an earlier set-aside of the same step is never overwritten)."""
    aside = directory.with_name(directory.name + UNREADABLE_SUFFIX)
    target = aside / name
    n = 0
    while target.exists():
        n += 1
        target = aside / f"{name}-{n}"
    return target


def no_readable_checkpoint(directory: Path, problems: list[str]) -> CheckpointError:
    """The error of a resume that found no checkpoint it can read (each one's problem listed)."""
    return CheckpointError(f"no checkpoint in {directory} can be resumed from (the unreadable ones were moved to "
                           f"{directory.name}{UNREADABLE_SUFFIX}/):\n  " + "\n  ".join(problems)
                           + "\nStart over with --overwrite, or restore a backup of the checkpoints.")


def _is_closed_loop_callback(unraisable: Any) -> bool:
    """Whether an unraisable error is tensorstore calling back into an asyncio loop that is closed: the bare
    ``RuntimeError('Event loop is closed')`` of ``loop.call_soon_threadsafe``, with no Python caller."""
    tb = unraisable.exc_traceback
    return (unraisable.object is None and isinstance(unraisable.exc_value, RuntimeError)
            and str(unraisable.exc_value) == "Event loop is closed"
            and tb is not None and tb.tb_frame.f_code.co_name == "call_soon_threadsafe")


class _FailedOperations(logging.Filter):
    """The echoes of a failed orbax operation (a save or a restore), which ``Checkpoints`` reports itself, once.

    When one tensorstore read or write of an orbax operation fails, orbax raises and closes the operation's event
    loop while the others are still in flight, and abandons their coroutines. Then, at times nobody chooses,
    possibly after our report: each operation still in flight ends by calling back into the closed loop, which
    tensorstore prints as an "unraisable" ``RuntimeError('Event loop is closed')`` (a bare traceback, tens of
    them within ~0.1 s); each abandoned coroutine, when collected, prints "Exception ignored in: <coroutine ...>"
    with the error; asyncio logs "... exception was never retrieved" for its tasks and futures; orbax logs an
    ERROR with a traceback for each failed thread. A damaged checkpoint on --resume printed ~600 lines of them.
    None carries anything the report does not, so this object, installed as a logging filter (loggers "asyncio"
    and "absl") and as ``sys.unraisablehook`` (wrapping the hook that was there), drops them: the closed-loop
    callbacks always (they say nothing at all); the other kinds while an operation is under way (``active``) or
    when they name the directory of one that failed (``failed``). Everything else passes. It also notes when
    the last closed-loop callback came, so a failed save can wait until its orphaned writes are over (a write
    landing after the partial directory was removed would create it again; see ``Checkpoints._discard_partial``).
    """

    def __init__(self) -> None:
        super().__init__()
        self.active = 0
        self.failed: set[str] = set()
        self.previous_hook: Callable[[Any], None] | None = None
        self.last_callback = 0.0

    @contextlib.contextmanager
    def watch(self, directory: Path) -> Iterator[None]:
        """Around an orbax call on ``directory``: its echoes are dropped, then and (if it raises) later."""
        if sys.unraisablehook is not self:  # (again, if something such as pytest replaced it since)
            self.previous_hook, sys.unraisablehook = sys.unraisablehook, self
        self.active += 1
        try:
            yield
        except Exception:
            self.failed.add(str(directory))
            raise
        finally:
            self.active -= 1

    def _echoes(self, text: str) -> bool:
        return bool(self.active) or any(d in text for d in self.failed)

    def filter(self, record: logging.LogRecord) -> bool:
        if not (self.active or self.failed):
            return True
        text = record.getMessage()
        repeats = ("exception was never retrieved" in text.split("\n")[0] if record.name == "asyncio"
                   else record.levelno >= logging.ERROR and "raised an exception" in text)
        return not (repeats and self._echoes(text))

    def __call__(self, unraisable: Any) -> None:
        if _is_closed_loop_callback(unraisable):
            self.last_callback = time.monotonic()
            return
        code = getattr(unraisable.object, "cr_code", None)  # a coroutine collected unfinished
        abandoned = (code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename
                     and self._echoes("\n".join(map(str, _chain(unraisable.exc_value)))))
        if not abandoned and self.previous_hook is not None:
            self.previous_hook(unraisable)


_FAILED_OPERATIONS = _FailedOperations()
for _logger in ("asyncio", "absl"):
    logging.getLogger(_logger).addFilter(_FAILED_OPERATIONS)

SETTLE_QUIET_S = 0.5  # a failed save's writes end within ~0.1 s of its error on a quiet machine (measured)
SETTLE_LIMIT_S = 15.0


def _listing(directories: list[Path]) -> set[tuple[str, int]]:
    """Every file under ``directories`` with its size: what a write still in flight would change (``os.walk``
    skips what vanishes while it looks)."""
    found = set()
    for root, _, files in (entry for directory in directories for entry in os.walk(directory)):
        for path in (Path(root, name) for name in files):
            with contextlib.suppress(OSError):  # removed or renamed meanwhile
                found.add((str(path), path.stat().st_size))
    return found


def _wait_for_quiet(paths: Callable[[], list[Path]], deadline: float) -> set[tuple[str, int]]:
    """Wait until neither the files under ``paths()`` nor orphaned writes (by their callbacks) have changed for
    ``SETTLE_QUIET_S`` (or until ``deadline``); what is there then."""
    listing, changed = _listing(paths()), time.monotonic()
    while (time.monotonic() < deadline
           and time.monotonic() - max(changed, _FAILED_OPERATIONS.last_callback) < SETTLE_QUIET_S):
        time.sleep(0.05)
        if (new := _listing(paths())) != listing:
            listing, changed = new, time.monotonic()
    return listing


class Checkpoints:
    """The checkpoints of one directory; a thin layer over ``ocp.CheckpointManager`` (use as a context)."""

    def __init__(self, directory: str | Path, *, max_to_keep: int | None = 3, create: bool = True):
        self.directory = Path(directory).expanduser().absolute()
        if not create and not self.directory.is_dir():
            raise CheckpointError(f"no checkpoint directory at {self.directory}")
        # A writer (create=True) removes what an earlier run's interrupted save left behind; a reader must not,
        # as that may be the save in progress of a run using the directory right now.
        self._options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=create,
                                                     enable_async_checkpointing=False, cleanup_tmp_directories=create)
        self._manager = ocp.CheckpointManager(self.directory, options=self._options)

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
        trees = {"model": {"params": params, "model_state": model_state}}
        if state is not None:
            trees["opt"] = {"opt_state": state.opt_state, "step": state.step}
        meta = {**meta, "digests": {name: tree_digest(tree) for name, tree in trees.items()}}
        items = {name: ocp.args.StandardSave(tree) for name, tree in trees.items()}
        with _FAILED_OPERATIONS.watch(self.directory):
            try:
                self._manager.save(step, args=ocp.args.Composite(**items, meta=ocp.args.JsonSave(meta)), force=True)
                self._manager.wait_until_finished()
                return
            except Exception as e:
                no_room, reason = _no_room(e), _short(e)
            # Out of the except block, so that nothing holds orbax's failed tasks any more (see _discard_partial);
            # the error is reported by its text, without its chain of internal tracebacks.
            _FAILED_OPERATIONS.failed.add(str(self.directory))
            left = ", ".join(path.name for path in self._discard_partial(step))
        hint = ("the disk is full: free some space (or choose another --out), then continue with --resume"
                if no_room else "continue with --resume once the cause is fixed")
        kept = ", ".join(map(str, self.steps)) or "none"
        raise CheckpointError(f"could not write checkpoint {step} to {self.directory} "
                              f"({f'{no_room}: ' if no_room else ''}{reason}); its partial files "
                              f"{f'could not all be removed ({left})' if left else 'were removed'} and the "
                              f"checkpoints already there (steps: {kept}) are unchanged; {hint}")

    def _discard_partial(self, step: int) -> list[Path]:
        """Remove the temporary directory of a save of ``step`` that failed, and start a fresh manager; what could
        not be removed (normally nothing).

        Orbax removes such directories only when a manager opens (``cleanup_tmp_directories``); on a full disk
        the space is wanted back now. The save's orphaned writes (see ``_FailedOperations``) must end first, or one
        landing later would create the directory again: wait until neither they nor the directory's files have
        changed for ``SETTLE_QUIET_S``, remove it, and check it stays away. After a failed save the manager's
        state is not to be trusted either.
        """
        try:
            self._manager.close()
        except Exception:  # noqa: BLE001 - the save's own error is the one to report
            pass
        # Orbax's failed write tasks log their errors when collected: now, before our report, not after it.
        self._manager = None
        gc.collect()

        def partial() -> list[Path]:
            return [self.directory / name for name in ocp.path.step.tmp_checkpoints(self.directory)
                    if name.split(".")[0] == str(step)]

        deadline = time.monotonic() + SETTLE_LIMIT_S
        while True:  # remove what is there once quiet, until a quiet spell finds nothing left (or time is up)
            quiet_listing = _wait_for_quiet(partial, deadline)
            if (not quiet_listing and not partial()) or time.monotonic() >= deadline:
                break
            for path in partial():
                shutil.rmtree(path, ignore_errors=True)
        self._manager = ocp.CheckpointManager(self.directory, options=self._options)
        return partial()

    def _restore(self, step: int, args: Any) -> Any:
        with _FAILED_OPERATIONS.watch(self.directory):
            return self._manager.restore(step, args=args)

    def read_meta(self, step: int | None = None) -> dict[str, Any]:
        step = self._step(step)
        try:
            meta = self._restore(step, ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
        except Exception as e:
            raise CheckpointError(f"checkpoint {step} in {self.directory}: its metadata is unreadable "
                                  f"({_short(e)})") from e
        if not isinstance(meta, dict):
            raise CheckpointError(f"checkpoint {step} in {self.directory}: its metadata is unreadable "
                                  f"(a {type(meta).__name__}, not a JSON object)")
        return meta

    def _verify(self, step: int, name: str, tree: Any, meta: dict[str, Any]) -> None:
        """Compare item ``name`` as restored with the digest written with it (older checkpoints have none)."""
        want = (meta.get("digests") or {}).get(name)
        if want is not None and tree_digest(tree) != want:
            raise CheckpointError(f"checkpoint {step} in {self.directory}: corrupted, its {name!r} item does not "
                                  "match the digest recorded when it was written")

    def restore(self, template: TrainState, step: int | None = None) -> tuple[TrainState, dict[str, Any]]:
        """The whole training state of step ``step`` (default: the latest), shaped like ``template``."""
        step = self._step(step)
        args = ocp.args.Composite(
            model=ocp.args.StandardRestore(_abstract({"params": template.params,
                                                      "model_state": template.model_state})),
            opt=ocp.args.StandardRestore(_abstract({"opt_state": template.opt_state, "step": template.step})),
            meta=ocp.args.JsonRestore())
        try:
            out = self._restore(step, args)
        except Exception as e:  # orbax raises assorted types for missing, truncated or misfitting files
            raise CheckpointError(f"checkpoint {step} in {self.directory}: cannot be read into this run "
                                  f"({_short(e)})") from e
        for name in ("model", "opt"):
            self._verify(step, name, getattr(out, name), out.meta)
        state = TrainState(out.model["params"], out.model["model_state"], out.opt["opt_state"], out.opt["step"])
        return state, out.meta

    def set_aside(self, step: int) -> Path:
        """Move step ``step`` out of the root into ``<root>.unreadable/`` (kept for inspection, never deleted), so
        that the run can save that step again; returns where it went."""
        target = unreadable_target(self.directory, str(step))
        if jax.process_index() == 0:
            target.parent.mkdir(parents=True, exist_ok=True)
            (self.directory / str(step)).rename(target)
        if jax.process_count() > 1:
            ocp.multihost.sync_global_processes(f"flax_resnet_set_aside_{step}")
        self._manager.reload()
        return target

    def restore_latest_good(self, template: TrainState, check_meta: Callable[[dict[str, Any]], None] | None = None,
                            report: Callable[[str], None] | None = None) -> tuple[TrainState, dict[str, Any]]:
        """The newest checkpoint that restores whole and matches its digests (see ``restore``).

        ``check_meta(meta)`` may raise to refuse a checkpoint of another run; that error propagates (it is no
        reason to fall back). A newer checkpoint that cannot be read is moved aside (``set_aside``) and
        ``report`` told so; ``CheckpointError`` when none is readable.
        """
        problems = []
        for step in reversed(self.steps):
            try:
                meta = self.read_meta(step)
                if check_meta is not None:
                    check_meta(meta)
                state, meta = self.restore(template, step)
            except CheckpointError as e:
                reason = str(e).removeprefix(f"checkpoint {step} in {self.directory}: ")
                problems.append(f"checkpoint {step}: {reason}")
                aside = self.set_aside(step)
                older = [s for s in self.steps if s < step]
                then = f"trying checkpoint {older[-1]}" if older else "no older checkpoint is left"
                if report is not None:
                    report(f"checkpoint {step} in {self.directory} is unreadable ({reason}); moved it to {aside}; "
                           f"{then}")
                continue
            return state, meta
        raise no_readable_checkpoint(self.directory, problems)

    def restore_model(self, params: nnx.State, model_state: nnx.State, step: int | None = None
                      ) -> tuple[nnx.State, nnx.State, dict[str, Any]]:
        """Only the model's variables (no optimiser), shaped like the templates."""
        step = self._step(step)
        args = ocp.args.Composite(
            model=ocp.args.StandardRestore(_abstract({"params": params, "model_state": model_state})),
            meta=ocp.args.JsonRestore())
        try:
            out = self._restore(step, args)
        except Exception as e:
            raise CheckpointError(f"checkpoint {step} in {self.directory} does not fit "
                                  f"the model ({type(e).__name__}: {e})") from e
        # the digest is of the saved dtypes: compare only when the model has them (not when cast on restore)
        floating = {np.dtype(x.dtype).name for x in jax.tree.leaves(params) if np.issubdtype(x.dtype, np.floating)}
        if floating <= {out.meta.get("dtype", "float32")}:
            self._verify(step, "model", out.model, out.meta)
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
