"""The training loop: epochs of runner steps, the notebooks' metrics, history, checkpoints and curves.

The loop only talks to a ``runners.Runner``, so the single-device ``jit`` runner, ``pmap`` and ``shard_map``
(``flax_resnet.parallel``) all plug in: pass a runner, or a factory called as
``factory(graphdef, tx, recipe, dtype=dtype)`` (``SingleDeviceRunner`` itself is one).

Per epoch: the epoch plan of ``(seed, epoch)`` (so a resumed run sees the batches an uninterrupted one would),
the train steps (dispatched back to back: metrics are summed on the device and read once at the end of the
epoch, never per step), an evaluation over every test sample, then one row of history:

| key              | definition                                                                             |
| ---------------- | -------------------------------------------------------------------------------------- |
| ``train_loss``   | recipe.train_loss_mean 'samples': sum(loss * n) / total (notebook 000's ``train_model``);|
|                  | 'batches': mean of batch losses (notebook 004's ``train_epoch``)                        |
| ``train_acc``    | percent of training samples classified right during the epoch (train mode, as both)    |
| ``test_loss``    | mean over test batches of the batch-mean loss (notebook 004's ``evaluate``)             |
| ``test_acc``     | percent of test samples classified right (eval mode)                                   |
| ``epoch_time``   | seconds for the epoch, training and evaluation (the first includes compilation)        |
| ``images_per_sec`` | training images per second of the training phase                                     |
| ``lr``           | the learning rate of the epoch (torch's per-epoch scheduler value)                     |

With an output directory, each epoch also writes ``history.json``, ``curves.png`` and a checkpoint
(``flax_resnet.checkpoint``); ``resume=True`` continues from the last checkpoint with the same final result (the
newest readable one: an unreadable newer one is moved aside and reported, ``Checkpoints.restore_latest_good``).
A nan or inf loss stops the run with ``TrainError`` naming the epoch and step, before that epoch is saved
(``check_finite``: found from the epoch's summed metrics, still one read per epoch).
The library never prints: progress goes to the bar from ``progress`` and epoch lines to ``log``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flax_resnet import engine, plots
from flax_resnet.checkpoint import CHECKPOINT_SUBDIR, Checkpoints
from flax_resnet.dtypes import cast_floating
from flax_resnet.engine import Metrics, TrainState
from flax_resnet.errors import FlaxResnetError
from flax_resnet.recipes import Recipe, epoch_learning_rate
from flax_resnet.runners import Runner, SingleDeviceRunner, zero_metrics

__all__ = ["HISTORY_FILE", "HISTORY_KEYS", "PLOT_FILE", "TrainError", "TrainResult", "check_finite",
           "check_resumable", "check_test_loss", "empty_history", "epoch_summary", "history_row",
           "kept_checkpoints", "make_runner", "train", "training_diverged", "write_epoch_outputs", "write_history",
           "write_outputs"]

HISTORY_KEYS = ("train_loss", "train_acc", "test_loss", "test_acc", "epoch_time", "images_per_sec", "lr")
HISTORY_FILE = "history.json"
PLOT_FILE = "curves.png"

History = dict[str, list[float]]


class TrainError(FlaxResnetError, RuntimeError):
    """A run that cannot start as asked (e.g. checkpoints of another run in the output directory)."""


class ProgressBar(Protocol):
    """The part of ``tqdm`` the loop uses."""

    def update(self, n: int = 1) -> Any: ...

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> Any: ...

    def close(self) -> Any: ...


ProgressFactory = Callable[..., ProgressBar]  # called as factory(total=steps, desc="epoch 1/20")
RunnerFactory = Callable[..., Runner]


@dataclasses.dataclass
class TrainResult:
    """What a run ends with: the model passed in (now holding the trained variables), its graph, its final
    state (host-readable, with the optimiser's) and the history."""

    model: nnx.Module
    graphdef: nnx.GraphDef
    state: TrainState
    history: History


def empty_history() -> History:
    return {key: [] for key in HISTORY_KEYS}


def make_runner(runner: Runner | RunnerFactory | None, graphdef: nnx.GraphDef, tx: Any, recipe: Recipe,
                dtype: Any) -> Runner:
    """``runner`` if it is one, else the runner its factory builds (default: ``SingleDeviceRunner``)."""
    if runner is None:
        runner = SingleDeviceRunner
    if isinstance(runner, type) or not hasattr(runner, "train_step"):
        return runner(graphdef, tx, recipe, dtype=dtype)
    return runner


def _host_metrics(metrics: Metrics) -> dict[str, float]:
    """One device-to-host read of the epoch's sums (replicated over devices and processes by the parallel
    runners: this process's first copy is read)."""
    local = [m.addressable_data(0) if isinstance(m, jax.Array) else m for m in metrics]
    host = jax.device_get(local)
    return {name: float(np.asarray(value).reshape(-1)[0]) for name, value in zip(Metrics._fields, host, strict=True)}


def _warn(message: str) -> None:
    """What must not go unsaid when the caller gave no ``log`` (the library does not print)."""
    warnings.warn(message, RuntimeWarning, stacklevel=3)


def check_finite(epoch: int, steps_per_epoch: int, train: dict[str, float], test: dict[str, float] | None,
                 kept: str) -> None:
    """Stop a run whose loss became nan or inf (``TrainError``), naming the epoch and step.

    ``train`` holds the epoch's metric sums, read once per epoch: the sum of losses is non-finite as soon as
    one loss is, and ``first_nonfinite`` (a minimum kept on the device) says which step it was. The test loss
    is checked too: weights that went non-finite in the epoch's last update show up only there.
    """
    loss = train["loss_of_batches"]
    first = int(train["first_nonfinite"])
    if first != engine.NO_STEP or not math.isfinite(loss):
        where = f"epoch {epoch + 1}"
        if first != engine.NO_STEP:
            where += f", step {first % steps_per_epoch + 1} of {steps_per_epoch} (optimizer step {first + 1})"
        raise training_diverged(where, loss, kept)
    if test is not None:
        check_test_loss(epoch, test["loss_of_batches"], kept)


def training_diverged(where: str, loss: float, kept: str) -> TrainError:
    """The error for a nan or inf training loss at ``where`` (both frameworks' loops raise it)."""
    kind = "nan" if math.isnan(loss) else "inf"
    return TrainError(f"training diverged: the training loss became {kind} at {where}. This epoch was not saved; "
                      f"{kept}. Lower --lr (or check the data), then start over with --overwrite or continue from "
                      "the last checkpoint with --resume.")


def check_test_loss(epoch: int, test_loss: float, kept: str) -> None:
    """``TrainError`` if the weights after ``epoch`` give a non-finite test loss: weights that went non-finite in
    the epoch's last update show up only there (both frameworks' loops check it)."""
    if not math.isfinite(test_loss):
        raise TrainError(f"training diverged: the weights after epoch {epoch + 1} give a non-finite test loss "
                         f"({test_loss}) although every training loss of the epoch was finite. This epoch was not "
                         f"saved; {kept}. Lower --lr, then start over with --overwrite or continue from the last "
                         "checkpoint with --resume.")


def kept_checkpoints(directory: Path | None, latest: int | None) -> str:
    """What a stopped run leaves behind, for its error message: the newest checkpoint in ``directory``."""
    if directory is None:
        return "no output directory was given, so nothing was written"
    if latest is None:
        return f"no checkpoint was written to {directory}"
    return f"the last good checkpoint (epoch {latest}) in {directory} is kept"


def _ratio(num: float, den: float) -> float:
    return num / den if den else math.nan


def history_row(recipe: Recipe, epoch: int, train: dict[str, float], test: dict[str, float], epoch_time: float,
                train_time: float) -> dict[str, float]:
    """One epoch of history from the summed metrics (see the module docstring for the definitions)."""
    if recipe.train_loss_mean == "samples":
        train_loss = _ratio(train["loss_x_count"], train["count"])
    else:
        train_loss = _ratio(train["loss_of_batches"], train["batches"])
    return {
        "train_loss": train_loss,
        "train_acc": _ratio(100.0 * train["correct"], train["count"]),  # the notebooks' 100. * correct / total
        "test_loss": _ratio(test["loss_of_batches"], test["batches"]),
        "test_acc": _ratio(100.0 * test["correct"], test["count"]),
        "epoch_time": epoch_time,
        "images_per_sec": _ratio(train["count"], train_time),
        "lr": float(epoch_learning_rate(recipe, epoch)),
    }


def epoch_summary(epoch: int, epochs: int, row: dict[str, float]) -> str:
    """The notebooks' per-epoch line, with time and throughput."""
    return (f"Epoch {epoch + 1}/{epochs}: Train Loss: {row['train_loss']:.4f}, Train Acc: {row['train_acc']:.2f}%, "
            f"Test Loss: {row['test_loss']:.4f}, Test Acc: {row['test_acc']:.2f}% "
            f"({row['epoch_time']:.1f} s, {row['images_per_sec']:.0f} img/s, lr {row['lr']:.4g})")


def write_history(out_dir: str | Path, history: History) -> Path:
    """``history.json``, written atomically."""
    path = Path(out_dir) / HISTORY_FILE
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(json.dumps(history, indent=1) + "\n")
        os.replace(tmp, path)
    finally:  # a failed write (a full disk) leaves the previous history.json and no partial file
        tmp.unlink(missing_ok=True)
    return path


def write_outputs(out_dir: str | Path, history: History, recipe: Recipe, title: str | None = None) -> None:
    """``history.json`` and ``curves.png`` (the recipe's notebook figure) in ``out_dir``."""
    write_history(out_dir, history)
    plots.plot_history(history, Path(out_dir) / PLOT_FILE, title=title, test_loss=recipe.report_test_loss,
                       target_accuracy=plots.TARGET_ACCURACY.get(recipe.name))


def write_epoch_outputs(out_dir: str | Path, history: History, recipe: Recipe, title: str | None, epoch: int) -> None:
    """``write_outputs`` after epoch ``epoch``'s checkpoint, a failure turned into a ``TrainError`` that says what
    is safe (the checkpoint) and how to go on (both frameworks' loops call this)."""
    try:
        write_outputs(out_dir, history, recipe, title)
    except OSError as e:
        raise TrainError(f"checkpoint {epoch} was saved, but writing {HISTORY_FILE} and {PLOT_FILE} to {out_dir} "
                         f"failed ({e}); the files there are those of the previous epoch. Fix the cause, then "
                         "continue with --resume.") from e


def _comparable(value: Any) -> Any:
    return json.loads(json.dumps(value))


def check_resumable(meta: dict[str, Any], expected: dict[str, Any], directory: Path) -> None:
    """A checkpoint continues this run only if it was made with the same settings (epochs may grow)."""
    problems = []
    for key, want in expected.items():
        have = meta.get(key)
        if key == "recipe" and isinstance(have, dict):
            have = {k: v for k, v in have.items() if k != "epochs"}
            want = {k: v for k, v in want.items() if k != "epochs"}
        if _comparable(have) != _comparable(want):
            problems.append(f"{key}: checkpoint {have!r}, now {want!r}")
    if problems:
        raise TrainError(f"the checkpoints in {directory} were made by a different run, so --resume cannot "
                         "continue it:\n  " + "\n  ".join(problems))


def _kept(ckpts: Checkpoints | None) -> str:
    return kept_checkpoints(None, None) if ckpts is None else kept_checkpoints(ckpts.directory, ckpts.latest)


def train(model: nnx.Module, recipe: Recipe, dataset: Any, *, seed: int = 0, dtype: Any = jnp.float32,
          runner: Runner | RunnerFactory | None = None, out_dir: str | Path | None = None, resume: bool = False,
          overwrite: bool = False, meta: dict[str, Any] | None = None, max_to_keep: int = 3,
          progress: ProgressFactory | None = None, log: Callable[[str], None] | None = None,
          on_step: Callable[[int, Metrics], None] | None = None, title: str | None = None) -> TrainResult:
    """Train ``model`` (changed: cast to ``dtype``; the result holds the trained state) on a ``data.Dataset``.

    ``seed`` fixes the batch order and augmentation (the model's initialisation is the caller's). ``meta``
    (e.g. model name and arguments) goes into every checkpoint. ``on_step(global_step, summed_metrics)`` is
    called after each dispatched step with the epoch's running sums on the device: reading them forces a
    host sync per step, so it is for tests and debugging; the bar only counts steps.
    """
    if jnp.dtype(dtype) == jnp.float64 and not jax.config.read("jax_enable_x64"):
        raise ValueError("float64 training needs jax.config.update('jax_enable_x64', True) first")
    num_train, num_test = len(dataset.train_labels), len(dataset.test_labels)
    if num_train == 0:
        raise ValueError("the training set is empty")
    spe = engine.steps_per_epoch(num_train, recipe.batch_size)
    tx = engine.make_optimizer(recipe, spe)
    cast_floating(model, dtype)
    graphdef, state = engine.init_train_state(model, tx)

    runner = make_runner(runner, graphdef, tx, recipe, dtype)
    validate = getattr(runner, "validate_batch_sizes", None)  # the data-parallel runners' up-front check
    if validate is not None:
        validate(num_train, recipe.batch_size)
    # In a multi-process run every process trains and saves checkpoints together; only process 0 reports.
    main_process = jax.process_index() == 0
    if not main_process:
        progress = log = None

    run_meta = {"recipe": dataclasses.asdict(recipe), "seed": seed, "dtype": jnp.dtype(dtype).name,
                "num_train": num_train, "num_test": num_test, **(meta or {})}
    history, start_epoch, ckpts = empty_history(), 0, None
    if out_dir is not None:
        out_dir = Path(out_dir)
        ckpt_dir = out_dir / CHECKPOINT_SUBDIR
        if ckpt_dir.is_dir() and not resume:
            with Checkpoints(ckpt_dir, create=False, max_to_keep=None) as existing:
                taken = existing.steps
            if taken and not overwrite:
                raise TrainError(f"{out_dir} already holds checkpoints of a run (epochs {taken}); pass --resume "
                                 "to continue it, --overwrite to start over, or choose another --out")
            if taken:
                shutil.rmtree(ckpt_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        ckpts = Checkpoints(ckpt_dir, max_to_keep=max_to_keep)
        if resume and ckpts.latest is not None:
            # the newest readable checkpoint; each unreadable newer one is moved aside and reported
            report = log or (_warn if main_process else None)
            state, saved = ckpts.restore_latest_good(
                state, check_meta=lambda saved_meta: check_resumable(saved_meta, run_meta, ckpt_dir), report=report)
            history = {key: list(saved["history"].get(key, [])) for key in HISTORY_KEYS}
            start_epoch = int(saved["epoch"])
            if log:
                log(f"resuming from {ckpt_dir} after epoch {start_epoch}")

    try:
        state = runner.put_state(state)
        train_data = runner.put_data(dataset.train_images, dataset.train_labels)
        test_data = runner.put_data(dataset.test_images, dataset.test_labels) if num_test else None
        zero = getattr(runner, "zero_metrics", None) or (lambda: zero_metrics(dtype))
        for epoch in range(start_epoch, recipe.epochs):
            bar = progress(total=spe, desc=f"epoch {epoch + 1}/{recipe.epochs}") if progress else None
            t0 = time.perf_counter()
            plan = engine.epoch_plan(seed, epoch, num_train)
            metrics = zero()
            for step in range(spe):
                start, stop = engine.batch_bounds(step, num_train, recipe.batch_size)
                state, metrics = runner.train_step(state, metrics, train_data, plan, start, stop - start)
                if on_step is not None:
                    on_step(epoch * spe + step, metrics)
                if bar is not None:
                    bar.update(1)
            train_metrics = _host_metrics(metrics)  # the epoch's one wait for the device
            check_finite(epoch, spe, train_metrics, None, _kept(ckpts))
            train_time = time.perf_counter() - t0
            test_metrics = dict.fromkeys(Metrics._fields, 0.0)
            if test_data is not None:
                metrics = zero()
                for start in range(0, num_test, recipe.eval_batch_size):
                    metrics = runner.eval_step(state, metrics, test_data, start, recipe.eval_batch_size)
                test_metrics = _host_metrics(metrics)
                check_finite(epoch, spe, train_metrics, test_metrics, _kept(ckpts))
            row = history_row(recipe, epoch, train_metrics, test_metrics, time.perf_counter() - t0, train_time)
            for key in HISTORY_KEYS:
                history[key].append(row[key])
            if ckpts is not None:
                ckpts.save(epoch + 1, runner.get_state(state), {**run_meta, "epoch": epoch + 1, "history": history})
                if main_process:
                    write_epoch_outputs(out_dir, history, recipe, title, epoch + 1)
            if bar is not None:
                bar.set_postfix_str(f"loss {row['train_loss']:.4f}, test acc {row['test_acc']:.2f}%")
                bar.close()
            if log:
                log(epoch_summary(epoch, recipe.epochs, row))
    finally:
        if ckpts is not None:
            ckpts.close()
    state = runner.get_state(state)
    nnx.update(model, state.params, state.model_state)
    return TrainResult(model, graphdef, state, history)
