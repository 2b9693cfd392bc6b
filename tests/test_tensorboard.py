"""TensorBoard event files of every run (``training.tensorboard_log``): read back with TensorBoard's own reader and
through its real server, they equal ``history.json``, in both frameworks, across an interrupted and resumed run,
and in each run of an experiment; ``--no-tensorboard`` and a missing tensorboardX write none.

The event files store float32 (``simple_value``), history.json the float64 of Python: the values are compared after
``np.float32``, exactly."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from cli_run import run_main
from tensorboard.backend.event_processing import event_accumulator  # the [tensorboard] extra, in [test]

from flax_resnet import training
from flax_resnet.config import ModelConfig, OutputConfig, ParallelConfig, RunConfig, with_recipe
from flax_resnet.data import synthetic_dataset
from flax_resnet.recipes import RECIPES
from flax_resnet.training import loop, parallel
from flax_resnet.training.tensorboard_log import EVENT_FILES, STEP_TAG

# 32 images of 8x8 in batches of 8: 4 steps an epoch
TINY = ["--dataset", "synthetic", "--model", "SimpleResNet", "--n-blocks", "1", "--train-samples", "32",
        "--test-samples", "8", "--image-size", "8", "--batch-size", "8", "--no-progress"]


def scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag of ``run_dir`` as TensorBoard reads it: (step, value) in the order read, all of them
    (size_guidance 0: no sampling)."""
    acc = event_accumulator.EventAccumulator(str(run_dir), size_guidance={event_accumulator.SCALARS: 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def assert_equal_to_history(read: dict[str, list[tuple[int, float]]], run_dir: Path) -> None:
    """Each history.json key is a tag with steps 1..E once each and the history's values (float32); a key with no
    value (null) has no point."""
    history = json.loads((run_dir / training.HISTORY_FILE).read_text())
    assert set(history) == set(training.HISTORY_KEYS)
    for key, values in history.items():
        expected = [(epoch, np.float32(v)) for epoch, v in enumerate(values, 1) if v is not None]
        assert read.get(key, []) == expected, key


def test_the_event_files_of_a_flax_run_equal_history_json(tmp_path):
    """(The PyTorch run: ``test_the_tensorboard_server_shows_the_runs_scalars``, which reads it both ways.)"""
    out = tmp_path / "run"
    assert run_main(["train", *TINY, "--framework", "jax", "--epochs", "2", "--out", str(out)]) == 0
    assert len(list(out.glob(EVENT_FILES))) == 1
    read = scalars(out)
    assert_equal_to_history(read, out)
    assert len(read["train_loss"]) == 2 and STEP_TAG not in read  # 8 steps, fewer than the interval of 50


class Crash(Exception):
    """Stands for Ctrl-C or SIGTERM (both reach the loop as an exception)."""


def test_an_interrupted_and_resumed_run_continues_the_curves_without_a_repeated_step(tmp_path, monkeypatch):
    """Three sessions of one 3-epoch run, the step loss every 2nd step: the first is stopped after checkpoint 1 was
    saved but before its events were written (they are written on the way out), the second in the middle of epoch 2
    (its step points of epoch 2 were never written, and the third trains those steps again). Read back: epochs 1-3
    and steps 2, 4, ..., 12 once each, with the values of history.json and of an uninterrupted run's every step.
    Then a fourth session that falls back from a damaged checkpoint 3 to 2."""
    dataset = synthetic_dataset(num_train=32, num_test=8, image_size=8)
    recipe = with_recipe(RECIPES["plain-vs-residual"], epochs=3, batch_size=8, eval_batch_size=8)
    out = tmp_path / "run"

    made = []

    def runner(*args, **kwargs):  # one runner for the four runs: its steps are compiled once (seconds saved)
        if not made:
            made.append(parallel.runner_factory(ParallelConfig())(*args, **kwargs))
        return made[0]

    def train(resume: bool, out_dir: Path | None = out, **kwargs) -> None:
        config = RunConfig(recipe=recipe, model=ModelConfig("SimpleResNet", {"n_blocks": 1}),
                           output=OutputConfig(out_dir, resume=resume, tensorboard_every=2, progress=False))
        training.train(config, dataset=dataset, runner=runner, **kwargs)

    losses: list[float] = []  # every step's loss, uninterrupted and without event files
    train(False, None, on_step=lambda step, loss: losses.append(loss()))
    assert len(losses) == 12
    seen: list[float] = []  # a user's hook beside the event files' own reads: both get every step's own loss
    train(False, tmp_path / "beside", on_step=lambda step, loss: seen.append(loss()))
    assert seen == losses
    assert scalars(tmp_path / "beside")[STEP_TAG] == [(step, np.float32(losses[step - 1])) for step in range(2, 13, 2)]

    def stop_after_checkpoint_1(*args, **kwargs):  # before history.json, curves.png and the events are written
        raise Crash

    monkeypatch.setattr(loop, "_write_outputs", stop_after_checkpoint_1)
    with pytest.raises(Crash):
        train(False)
    monkeypatch.undo()
    assert [step for step, _ in scalars(out)[STEP_TAG]] == [2, 4]  # written on the way out

    def stop_in_epoch_2(step: int, loss) -> None:
        if step == 6:  # 0-based (optimizer step 7, the third of epoch 2): step 6's point is held, not written
            raise Crash

    with pytest.raises(Crash):
        train(True, on_step=stop_in_epoch_2)
    train(True)

    assert len(list(out.glob(EVENT_FILES))) == 2  # one per session that wrote an epoch
    read = scalars(out)
    assert_equal_to_history(read, out)
    assert read[STEP_TAG] == [(step, np.float32(losses[step - 1])) for step in range(2, 13, 2)]

    # checkpoint 3 damaged: --resume falls back to 2 and trains epoch 3 again; the files are written afresh from the
    # checkpoint's history (the step points before it are gone: no reader of the old files is needed)
    arrays = out / "checkpoints" / "epoch_0003" / "arrays.safetensors"
    arrays.write_bytes(arrays.read_bytes()[:100])
    with pytest.warns(RuntimeWarning, match="checkpoint 3 .* unreadable"):
        train(True)
    read = scalars(out)
    assert_equal_to_history(read, out)
    assert read[STEP_TAG] == [(step, np.float32(losses[step - 1])) for step in (10, 12)]


def test_no_tensorboard_and_a_missing_tensorboardx_write_no_event_files(tmp_path, monkeypatch, capsys):
    argv = ["train", *TINY, "--framework", "torch", "--epochs", "1"]
    assert run_main([*argv, "--no-tensorboard", "--out", str(tmp_path / "off")]) == 0
    assert (tmp_path / "off" / training.HISTORY_FILE).is_file() and not list((tmp_path / "off").glob(EVENT_FILES))
    capsys.readouterr()

    monkeypatch.setitem(sys.modules, "tensorboardX", None)  # as on an install without the [tensorboard] extra
    assert run_main([*argv, "--out", str(tmp_path / "missing")]) == 0
    assert (tmp_path / "missing" / training.HISTORY_FILE).is_file()
    assert not list((tmp_path / "missing").glob(EVENT_FILES))
    captured = capsys.readouterr()
    notes = [line for line in (captured.out + captured.err).splitlines() if "tensorboardX" in line]
    assert notes == ["note: no TensorBoard event files without tensorboardX: pip install 'flax-resnet[tensorboard]'"]


def test_each_run_of_an_experiment_writes_its_event_files(tmp_path):
    """compare trains the model in Flax and in PyTorch: each run's directory holds its curves, which
    ``tensorboard --logdir OUT/runs`` overlays."""
    out = tmp_path / "compare"
    assert run_main(["compare", "--quick", "--image-size", "8", "--train-samples", "32", "--test-samples", "8",
                     "--epochs", "1", "--no-progress", "--out", str(out)]) == 0
    runs = sorted(p for p in (out / "runs").iterdir() if (p / training.HISTORY_FILE).is_file())
    assert len(runs) >= 2
    for run_dir in runs:
        assert_equal_to_history(scalars(run_dir), run_dir)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get_json(url: str) -> object:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


def test_the_tensorboard_server_shows_the_runs_scalars(tmp_path):
    """A PyTorch run's event files equal its history.json read with TensorBoard's reader, and through the real
    ``tensorboard`` on 127.0.0.1 (a free port, 60 s at most to serve the data): asked through its HTTP API for each
    history key, it returns history.json's values at steps 1..E."""
    run_dir = tmp_path / "logs" / "SimpleResNet-torch"
    assert run_main(["train", *TINY, "--framework", "torch", "--epochs", "2", "--out", str(run_dir)]) == 0
    assert_equal_to_history(scalars(run_dir), run_dir)
    history = json.loads((run_dir / training.HISTORY_FILE).read_text())
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", str(tmp_path / "logs"),
                               "--host", "127.0.0.1", "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}/data/plugin/scalars/scalars?run={run_dir.name}&tag="
    try:
        deadline, points = time.monotonic() + 60, None
        while time.monotonic() < deadline and server.poll() is None:
            try:
                points = _get_json(base + "train_loss")
                if isinstance(points, list) and len(points) == 2:
                    break
            except (urllib.error.URLError, ConnectionError, ValueError):  # not serving yet, or the run not loaded
                pass
            time.sleep(0.5)
        assert server.poll() is None, server.stderr.read().decode()[-2000:]
        assert isinstance(points, list) and len(points) == 2, points
        for key, values in history.items():
            points = _get_json(base + key)  # [[wall_time, step, value], ...]
            assert [(step, np.float32(value)) for _, step, value in points] == [
                (epoch, np.float32(v)) for epoch, v in enumerate(values, 1) if v is not None], key
    finally:
        server.kill()
        server.wait(timeout=30)
