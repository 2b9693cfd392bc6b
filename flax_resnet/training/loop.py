"""The training loop, written once for both frameworks: epochs -> steps -> eval -> history -> checks -> checkpoint.

A ``Backend`` per framework runs the steps on the epoch plan of ``(seed, epoch)`` (``flax_resnet.data.plan``), so a
resumed run sees the batches an uninterrupted one would. Losses are averaged as the recipe's notebook does
(``recipe.train_loss_mean``), accuracies are in percent. The library never prints: progress goes to the bar from
``progress``, epoch lines to ``log``."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from flax_resnet import files
from flax_resnet.config import RunConfig
from flax_resnet.data import plan as plans
from flax_resnet.data.plan import EpochPlan
from flax_resnet.errors import FlaxResnetError, installed
from flax_resnet.recipes import Recipe
from flax_resnet.store import CHECKPOINT_SUBDIR, CheckpointStore
from flax_resnet.training.engine import epoch_learning_rate

__all__ = ["HISTORY_FILE", "HISTORY_KEYS", "PLOT_FILE", "Backend", "EpochResult", "StepHook", "TrainError",
           "read_history", "run", "write_history", "write_json"]

HISTORY_KEYS = ("train_loss", "train_acc", "test_loss", "test_acc", "epoch_time", "images_per_sec", "lr")
HISTORY_FILE = "history.json"
PLOT_FILE = "curves.png"

History = dict[str, list[Any]]
StepHook = Callable[[int, Callable[[], float]], None]
"""``on_step(step, loss)``: called after each training step (``step``: global for ``run``'s hook, within the
epoch for a ``Backend``'s ``train_epoch``); ``loss()`` reads that step's loss (a host sync per call on a device:
for tests and debugging; a second call in the same step returns the first's value. The Flax backend's is the loss
since its last read, which is the step's own when the step before was read too)."""
ProgressFactory = Callable[..., Any]
"""``factory(total=steps, desc="epoch 1/20")``: a bar with tqdm's ``update``, ``set_postfix_str`` and ``close``."""


class TrainError(FlaxResnetError, RuntimeError):
    """A run that cannot start or go on as asked (checkpoints of another run, a diverged loss, ...)."""


@dataclasses.dataclass
class EpochResult:
    """One epoch of training as a backend reports it."""

    loss: float  # by the recipe's definition (train_loss_mean)
    accuracy: float  # percent
    count: int  # training samples seen
    first_nonfinite: int | None = None  # 0-based step of the epoch whose loss was nan/inf, if any


class Backend(Protocol):
    """What the loop needs from a framework, called in this order: ``prepare`` once (checks that must fail before
    any compilation, e.g. a batch size the devices cannot share), ``load_state`` when resuming, then per epoch
    ``train_epoch``, ``evaluate`` and ``state`` (named host arrays plus JSON-able extras, for the checkpoint), and
    ``finish`` (the trained model). ``barrier``: all processes meet; only the main process writes outputs.
    """

    is_main_process: bool

    def prepare(self, train_images: np.ndarray, train_labels: np.ndarray, test_images: np.ndarray,
                test_labels: np.ndarray) -> None: ...
    def train_epoch(self, epoch: int, plan: EpochPlan, on_step: StepHook) -> EpochResult: ...
    def evaluate(self) -> tuple[float, float]: ...
    def state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]: ...
    def load_state(self, arrays: Mapping[str, np.ndarray], extra: Mapping[str, Any]) -> None: ...
    def barrier(self, name: str) -> None: ...
    def finish(self) -> Any: ...


def write_json(path: Path, value: Any) -> None:
    """``value`` as JSON at ``path``, written whole and then renamed, so a reader never sees half a file."""
    files.write_atomic(path, json.dumps(value, indent=1, allow_nan=False) + "\n")


def write_history(out_dir: str | Path, history: History) -> None:
    """``history.json``, written atomically; a missing value (no test set) is ``null``, as JSON has no NaN."""
    write_json(Path(out_dir) / HISTORY_FILE, {key: [None if isinstance(v, float) and not math.isfinite(v) else v
                                                   for v in values] for key, values in history.items()})


def read_history(out_dir: str | Path) -> History:
    return json.loads((Path(out_dir) / HISTORY_FILE).read_text())


def _write_outputs(out_dir: Path, history: History, recipe: Recipe, title: str | None, epoch: int,
                   events: Any) -> None:
    """``history.json``, ``curves.png`` and the TensorBoard events (``events``, an ``EventLog`` or None) after epoch
    ``epoch``'s checkpoint; a failure says what is safe. Without matplotlib (the [plots] extra) there is no
    ``curves.png``: the core install trains all the same."""
    try:
        write_history(out_dir, history)
        if events is not None:
            events.catch_up(history, epoch)
        if not installed("matplotlib"):
            return
        from flax_resnet import plots

        plots.plot_history(history, out_dir / PLOT_FILE, title=title, test_loss=recipe.report_test_loss,
                           target_accuracy=plots.TARGET_ACCURACY.get(recipe.name))
    except OSError as e:
        raise TrainError(f"checkpoint {epoch} was saved, but writing {HISTORY_FILE}, {PLOT_FILE} and the TensorBoard "
                         f"events to {out_dir} failed ({e}), so they show the previous epoch. Fix the cause, then "
                         "continue with --resume.") from e


def epoch_summary(epoch: int, epochs: int, row: Mapping[str, Any]) -> str:
    """The notebooks' per-epoch line, with time and throughput (n/a for the test values without a test set)."""
    test = ("Test Loss: n/a, Test Acc: n/a" if row["test_loss"] is None
            else f"Test Loss: {row['test_loss']:.4f}, Test Acc: {row['test_acc']:.2f}%")
    return (f"Epoch {epoch + 1}/{epochs}: Train Loss: {row['train_loss']:.4f}, Train Acc: {row['train_acc']:.2f}%, "
            f"{test} ({row['epoch_time']:.1f} s, {row['images_per_sec']:.0f} img/s, lr {row['lr']:.4g})")


def _diverged(what: str, store: CheckpointStore | None) -> TrainError:
    """The error that stops a run whose loss became nan or inf, with what the run leaves behind. The fix is a new
    run: --resume would repeat the divergence (a run is deterministic, and it refuses another --lr or data)."""
    if store is None:
        kept, again = "nothing was written (no --out)", "run again"
    elif store.latest is None:
        kept, again = f"no checkpoint was written to {store.directory}", "run again"
    else:
        kept = f"the last good checkpoint (epoch {store.latest}) in {store.directory} is kept"
        again = "start over with --overwrite"
    return TrainError(f"training diverged: {what}, so this epoch was not saved and {kept}. Lower --lr (or check "
                      f"the data), then {again}.")


def run(backend: Backend, config: RunConfig, dataset: Any, *, progress: ProgressFactory | None = None,
        log: Callable[[str], None] | None = None, on_step: StepHook | None = None,
        title: str | None = None) -> History:
    """Train through ``backend`` on ``dataset`` (a ``data.Dataset``) as ``config`` says; returns the history (the
    backend holds the trained state).

    ``config.output.out_dir``: where checkpoints, ``history.json`` and ``curves.png`` go (nothing is written
    without it). ``resume``: continue from the newest readable checkpoint there whose metadata fits
    (``RunConfig.resume_problems``; an unreadable newer one is set aside and reported), with the same result as an
    uninterrupted run; ``overwrite``: remove the checkpoints there and start over.
    """
    train_images, train_labels = dataset.train_images, dataset.train_labels
    output, name = config.output, getattr(dataset, "name", None)
    out_dir, resume, overwrite, max_to_keep = output.out_dir, output.resume, output.overwrite, output.max_to_keep
    recipe = config.recipe
    num_train, num_test = len(train_labels), len(dataset.test_labels)
    if num_train == 0:
        raise TrainError("the training set is empty")
    spe = plans.steps_per_epoch(num_train, recipe.batch_size)
    # fails before any compilation
    backend.prepare(train_images, train_labels, dataset.test_images, dataset.test_labels)
    if not backend.is_main_process:
        progress = log = None
    # what must not go unsaid when the caller gave no log (the library does not print)
    report = (log or (lambda m: warnings.warn(m, RuntimeWarning, stacklevel=3))) if backend.is_main_process else None

    meta = config.checkpoint_meta(name, num_train, num_test)
    history: History = {key: [] for key in HISTORY_KEYS}
    start_epoch, store, fell_back = 0, None, False
    if out_dir is not None:
        out_dir = Path(out_dir)
        if log is not None and not installed("matplotlib"):
            log(f"note: no {PLOT_FILE} without matplotlib: pip install 'flax-resnet[plots]'")
        store = CheckpointStore(out_dir / CHECKPOINT_SUBDIR, max_to_keep=max_to_keep,
                                is_writer=backend.is_main_process, barrier=backend.barrier)
        if store.steps and not resume:
            if not overwrite:
                raise TrainError(f"{out_dir} already holds checkpoints of a run (epochs {store.steps}); pass --resume "
                                 "to continue it, --overwrite to start over, or choose another --out")
            store.remove_all()  # only the files the store wrote; every process calls it, the writer removes
        if resume and store.steps:

            def check(saved: dict[str, Any]) -> None:
                if problems := config.resume_problems(saved, name, num_train, num_test):
                    raise TrainError(f"the checkpoints in {store.directory} were made by a different run, so --resume "
                                     "cannot continue it:\n  " + "\n  ".join(problems)
                                     + "\nRun with the checkpoint's settings, or start over with --overwrite.")

            newest = store.latest
            start_epoch, arrays, saved = store.restore_latest_good(check_meta=check, report=report)
            fell_back = start_epoch < newest  # a damaged newer checkpoint set aside: its epochs' events go too
            backend.load_state(arrays, saved.get("backend", {}))
            history = {key: list(saved["history"].get(key, [])) for key in HISTORY_KEYS}
            if log:
                log(f"resuming from {store.directory} after epoch {start_epoch}")
        elif resume and report is not None:  # a mistyped --out would otherwise train from scratch unsaid
            report(f"note: --resume, but there is no checkpoint in {out_dir}: this run starts afresh")

    events = _event_log(out_dir, output, history, backend.is_main_process, log, rewrite=fell_back)
    if events is not None:
        on_step = _both(events.on_step, on_step)
    try:
        for epoch in range(start_epoch, recipe.epochs):
            bar = progress(total=spe, desc=f"epoch {epoch + 1}/{recipe.epochs}") if progress else None
            try:
                if events is not None:
                    events.epoch_start()
                row = _epoch(backend, config, epoch, spe, num_train, num_test, store, bar, on_step)
                for key in HISTORY_KEYS:
                    history[key].append(row[key])
                if store is not None:
                    arrays, extra = backend.state()
                    store.save(epoch + 1, arrays, {**meta, "epoch": epoch + 1, "history": history, "backend": extra})
                    if backend.is_main_process:
                        _write_outputs(out_dir, history, recipe, title, epoch + 1, events)
                if bar is not None:
                    accuracy = "n/a" if row["test_acc"] is None else f"{row['test_acc']:.2f}%"
                    bar.set_postfix_str(f"loss {row['train_loss']:.4f}, test acc {accuracy}")
            finally:  # also on an error or Ctrl-C: a bar left open would be the line the error message ends up on
                if bar is not None:
                    bar.close()
            if log:
                log(epoch_summary(epoch, recipe.epochs, row))
    finally:  # also on an error, Ctrl-C or SIGTERM: the events of every saved epoch, so that --resume continues them
        if events is not None:
            try:  # after a failure the events matter less than its message: an OSError here is not raised
                with contextlib.suppress(OSError):
                    if store is not None and store.latest is not None:
                        events.catch_up(history, min(store.latest, len(history["train_loss"])))
            finally:
                events.close()
    return history


def _event_log(out_dir: Path | None, output: Any, history: History, is_main: bool,
               log: Callable[[str], None] | None, rewrite: bool) -> Any:
    """The run's TensorBoard event files (``tensorboard_log.EventLog``): written by the main process into
    ``out_dir`` unless ``output.tensorboard`` is off; without tensorboardX (the [tensorboard] extra), a note."""
    if out_dir is None or not output.tensorboard or not is_main:
        return None
    if not installed("tensorboardX"):
        if log is not None:
            log("note: no TensorBoard event files without tensorboardX: pip install 'flax-resnet[tensorboard]'")
        return None
    from flax_resnet.training.tensorboard_log import EventLog

    return EventLog(out_dir, output.tensorboard_every, history, rewrite=rewrite)


def _both(first: StepHook, second: StepHook | None) -> StepHook:
    """Both hooks on each step (a backend's ``loss()`` reads the device at most once a step, however many call it)."""
    if second is None:
        return first

    def hook(step: int, loss: Callable[[], float]) -> None:
        first(step, loss)
        second(step, loss)

    return hook


def _epoch(backend: Backend, config: RunConfig, epoch: int, spe: int, num_train: int, num_test: int,
           store: CheckpointStore | None, bar: Any, on_step: StepHook | None) -> dict[str, Any]:
    """Train and evaluate one epoch; its row of history (``TrainError`` if the loss diverged)."""

    def step_done(step: int, loss: Callable[[], float]) -> None:
        if bar is not None:
            bar.update(1)
        if on_step is not None:
            on_step(epoch * spe + step, loss)

    t0 = time.perf_counter()
    result = backend.train_epoch(epoch, plans.epoch_plan(config.seed, epoch, num_train), step_done)
    train_time = time.perf_counter() - t0
    if result.first_nonfinite is not None or not math.isfinite(result.loss):
        where = f"epoch {epoch + 1}"
        if result.first_nonfinite is not None:
            step = result.first_nonfinite
            where += f", step {step + 1} of {spe} (optimizer step {epoch * spe + step + 1})"
        kind = "inf" if math.isinf(result.loss) else "nan"
        raise _diverged(f"the training loss became {kind} at {where}", store)
    test_loss = test_acc = None
    if num_test:
        test_loss, test_acc = backend.evaluate()
        if not math.isfinite(test_loss):  # weights that went non-finite in the epoch's last update show only here
            raise _diverged(f"the test loss after epoch {epoch + 1} is {test_loss} (every training loss was finite)",
                            store)
    # epoch_time: training and evaluation (the first includes compilation); images_per_sec: the training phase;
    # lr: torch's per-epoch scheduler value
    return {"train_loss": result.loss, "train_acc": result.accuracy, "test_loss": test_loss, "test_acc": test_acc,
            "epoch_time": time.perf_counter() - t0, "images_per_sec": result.count / max(train_time, 1e-9),
            "lr": float(epoch_learning_rate(config.recipe, epoch))}
