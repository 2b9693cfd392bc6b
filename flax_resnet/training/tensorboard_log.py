"""TensorBoard event files for a run, written by ``tensorboardX`` (no TensorFlow; the [tensorboard] extra) into the
run's output directory, so that ``tensorboard --logdir runs`` overlays every run of either framework.

Per epoch, each ``history.json`` key is a scalar tag at step = the epoch (1-based); the training loss of every
``every``-th optimizer step is the tag ``STEP_TAG`` at step = the global optimizer step (1-based). Nothing is
written before the epoch's checkpoint is saved: the step points of an epoch wait in memory until then, so a run
interrupted mid-epoch and resumed (which trains that epoch again) writes each step once. A resumed run writes only
the epochs after its checkpoint, into a new event file beside the earlier ones (TensorBoard reads a directory's
files as one run)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["EVENT_FILES", "STEP_TAG", "EventLog"]

EVENT_FILES = "events.out.tfevents.*"  # the names tensorboardX (and TensorFlow) give event files
STEP_TAG = "step/train_loss"


class EventLog:
    """The event files of one session of a run in ``out_dir``; ``history`` holds the epochs done before it
    (a resumed run's, from its checkpoint).

    A session that starts at epoch 0 removes the event files already in ``out_dir``: they are of a run that is being
    replaced (``--overwrite``, or one that never saved a checkpoint), whose curves would otherwise mix with this
    one's. So does a resumed session with ``rewrite`` (it fell back to an older checkpoint, and the files hold
    epochs after it) and then writes the epochs of ``history`` again, without the step points before them; so does a
    resumed session into a directory without event files (its earlier sessions ran with ``--no-tensorboard``)."""

    def __init__(self, out_dir: Path, every: int, history: Mapping[str, Sequence[Any]], *,
                 rewrite: bool = False) -> None:
        self.out_dir, self.every = Path(out_dir), every
        self.written = len(history["train_loss"])  # epochs whose events are in the files
        self.pending: list[tuple[int, float]] = []  # (global step, loss) of the epoch in progress
        self._writer: Any = None
        existing = sorted(self.out_dir.glob(EVENT_FILES))
        if self.written == 0 or rewrite or not existing:
            for path in existing:
                path.unlink(missing_ok=True)
            self.written = 0

    def on_step(self, step: int, loss: Callable[[], float]) -> None:
        """The loop's step hook (``step``: global, 0-based). ``loss()`` is a host sync on a device, so it is read
        only around every ``every``-th step: that step's, and the step's before it (the Flax backend's ``loss()`` is
        the difference of running sums since the last read, so the read before makes it the step's own)."""
        number = step + 1
        if number % self.every == 0:
            self.pending.append((number, float(loss())))
        elif (number + 1) % self.every == 0:
            loss()

    def epoch_start(self) -> None:
        self.pending.clear()

    def catch_up(self, history: Mapping[str, Sequence[Any]], saved: int) -> None:
        """Write the epochs after the last one written up to ``saved`` (the newest checkpoint's epoch), with the step
        points held for the last of them; an epoch without a value for a key (no test set) has no point there."""
        if saved <= self.written:
            return
        # tensorboardX's SummaryWriter hands events to a background thread through a queue, and its flush() does
        # not wait for that queue: a run stopped right after a checkpoint could lose that epoch's points, and --resume
        # would not write them again. EventsWriter is the synchronous file writer that SummaryWriter wraps.
        from tensorboardX.event_file_writer import EventsWriter  # the [tensorboard] extra
        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.summary import scalar

        if self._writer is None:  # a new file per session, named uniquely: two sessions in one second would share
            self._writer = EventsWriter(str(self.out_dir / "events"), f".{os.getpid()}.{time.time_ns()}")
        now = time.time()
        for epoch in range(self.written + 1, saved + 1):
            for key, values in history.items():
                value = values[epoch - 1] if epoch <= len(values) else None
                if value is not None:
                    self._writer.write_event(Event(wall_time=now, step=epoch, summary=scalar(key, float(value))))
        for number, loss in self.pending:
            self._writer.write_event(Event(wall_time=now, step=number, summary=scalar(STEP_TAG, loss)))
        self._writer.flush()  # synchronous: on disk when this returns, for a TensorBoard watching the run
        self.pending.clear()
        self.written = saved

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
