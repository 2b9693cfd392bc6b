"""Faults and bad input (issue 7): each one provoked for real; nothing lost, nothing silent.

- a real ``python train.py`` killed with SIGKILL in the middle of an epoch: while it ran, a second run on its
  --out was refused naming its pid; afterwards --resume ends bit for bit where an uninterrupted run ends;
- a truncated, bit-flipped, garbled or partly missing latest checkpoint (of either framework: both write the same
  store, ``flax_resnet.store``): detected, moved aside, reported, and the run resumes from the one before (again to
  the bit-identical end);
- a loss that becomes nan stops the run naming the epoch and step, with the last good checkpoint kept (both
  frameworks);
- weights that do not fit (API, ``port``, ``train --init-from`` in both frameworks), pickles that would run code,
  and images of the wrong layout, channels or size: one clear error each, the model untouched;
- an unwritable --out and a full disk during a checkpoint: clear errors in seconds, earlier results intact.

Training runs are tiny (SimpleResNet(1), 64 synthetic images, batch 16: 4 steps per epoch). Faults land at a
known step through ``tests/fault_worker.py``; where a test simulates rather than provokes, its docstring says so.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
from cli_run import run_main
from fault_worker import file_hashes
from flax import nnx

from flax_resnet import _codecs, builders, data, port, registry, training
from flax_resnet.config import ModelConfig, OutputConfig, RunConfig
from flax_resnet.data.plan import steps_per_epoch
from flax_resnet.store import ARRAYS_FILE, CHECKPOINT_SUBDIR, META_FILE, UNREADABLE_SUFFIX, CheckpointStore
from flax_resnet.training import engine
from flax_resnet.training.outdir import LOCK_FILE


def fit(model, config, dataset, *, out_dir=None, resume=False, overwrite=False, max_to_keep=3, **kw):
    """``training.train`` with ``model`` and ``dataset`` given and the outputs in ``config.output``."""
    output = OutputConfig(out_dir, resume=resume, overwrite=overwrite, max_to_keep=max_to_keep)
    return training.train(config.replace(output=output), model=model, dataset=dataset, **kw)


REPO = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("fault_worker.py")
STEPS = 4  # 64 training images in batches of 16
# notebook 004's recipe (cosine schedule, crop + flip augmentation) on the smallest model
TRAIN = ["train", "--dataset", "synthetic", "--train-samples", "64", "--test-samples", "32", "--model", "SimpleResNet",
         "--n-blocks", "1", "--recipe", "resnet18-cifar", "--batch-size", "16", "--eval-batch-size", "32",
         "--no-progress"]
TIMED = ("epoch_time", "images_per_sec")  # history keys that legitimately differ between runs
CPU = jax.default_backend() == "cpu"



def store_of(out: Path) -> CheckpointStore:
    """The checkpoint store of a run's output directory (both frameworks write the same one)."""
    return CheckpointStore(out / CHECKPOINT_SUBDIR, max_to_keep=None)


def checkpoint_dir(out: Path, step: int) -> Path:
    return store_of(out).path(step)


def aside_dir(out: Path) -> Path:
    """Where unreadable checkpoints are moved to."""
    return out / (CHECKPOINT_SUBDIR + UNREADABLE_SUFFIX)


def saved_run(out: Path, step: int | None = None) -> tuple[list[np.ndarray], dict]:
    """Every array of a run's checkpoint (parameters, BN statistics, optimizer state, step) and its metadata,
    verified against its digest. A Flax checkpoint is also restored into the ``TrainState`` of a fresh model of the
    recorded settings (every name, shape and dtype must fit), and its arrays are returned in that state's order."""
    arrays, meta = store_of(out).read(step)
    if meta["framework"] != "jax":
        return [arrays[name] for name in sorted(arrays)], meta
    config = RunConfig.from_checkpoint_meta(meta)
    model = builders.build_flax(config.model.name, config.model.kwargs)
    tx = engine.make_optimizer(config.recipe, steps_per_epoch(meta["num_train"], config.recipe.batch_size))
    _, template = engine.init_train_state(model, tx)
    state = _codecs.flax_from_arrays(template._asdict(), arrays)
    return list(_codecs.flax_to_arrays(state).values()), meta


def assert_same_run(a: Path, b: Path) -> None:
    """Two runs' final checkpoints and history.json are identical, bit for bit (but for the timings)."""
    (left, meta_a), (right, meta_b) = saved_run(a), saved_run(b)
    assert len(left) == len(right) > 0
    for x, y in zip(left, right, strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        if CPU:
            assert np.array_equal(x, y)
        else:  # bit-exactness across processes is a CPU property (GPU kernels may pick other algorithms)
            np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
    histories = [training.read_history(d) for d in (a, b)] + [meta_a["history"], meta_b["history"]]
    for key in training.HISTORY_KEYS:
        if key not in TIMED:
            assert histories[0][key] == histories[1][key] == histories[2][key] == histories[3][key], key


def steps_of(out: Path) -> list[int]:
    return store_of(out).steps


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def start_paused(args: list[str], at_step: int, tmp_path: Path) -> subprocess.Popen:
    """``python train.py ARGS`` in a child that stops inside global step ``at_step``; returns once it is there."""
    marker = tmp_path / f"paused-{at_step}"
    proc = subprocess.Popen([sys.executable, str(WORKER), "--at-step", str(at_step), "--action", "pause", "--marker",
                             str(marker), "--", *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    deadline = time.monotonic() + 240
    while not marker.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before step {at_step}:\n{proc.stdout.read()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"the run did not reach step {at_step}")
        time.sleep(0.2)
    return proc


def sigkill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    proc.stdout.close()


# ----------------------------------------------------------------------------------------- bad checkpoints
def array_span(path: Path, name: str) -> tuple[int, int]:
    """Where array ``name``'s bytes lie in a safetensors file: the format's first 8 bytes give the JSON header's
    length, and the header gives each array's offsets from the end of the header."""
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    begin, end = json.loads(data[8:8 + length])[name]["data_offsets"]
    return 8 + length + begin, 8 + length + end


def flip_bit_in(path: Path, name: str) -> None:
    """One bit of array ``name`` flipped, in the middle of its data."""
    start, end = array_span(path, name)
    data = bytearray(path.read_bytes())
    data[(start + end) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def truncate(step_dir: Path) -> None:
    """Half of the arrays file, as a copy cut short or a disk that filled up."""
    f = step_dir / ARRAYS_FILE
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def flip_a_bit(step_dir: Path) -> None:
    """One flipped bit in the middle of the optimizer's biggest array: the file still parses, every array has its
    shape, and safetensors itself loads it without complaint; only the recorded SHA-256 tells."""
    f = step_dir / ARRAYS_FILE
    arrays, _ = CheckpointStore(step_dir.parent).read(int(step_dir.name.removeprefix("epoch_")))
    name = max((k for k in arrays if k.startswith("['opt_state']")), key=lambda k: arrays[k].size)
    flip_bit_in(f, name)
    assert len(safetensors.numpy.load(f.read_bytes())) == len(arrays)  # the damage is invisible to the format


def garble_meta(step_dir: Path) -> None:
    (step_dir / META_FILE).write_text("{this is not json")


def remove_file(step_dir: Path) -> None:
    (step_dir / ARRAYS_FILE).unlink()


CORRUPTIONS = {"truncated": truncate, "bit flip": flip_a_bit, "garbled meta": garble_meta, "missing file": remove_file}


@pytest.fixture(scope="module")
def good_run(tmp_path_factory) -> Path:
    """A 3-epoch run with all three checkpoints kept, the reference for the resumed ones."""
    out = tmp_path_factory.mktemp("good") / "run"
    assert run_main([*TRAIN, "--epochs", "3", "--max-to-keep", "3", "--out", str(out)]) == 0
    assert steps_of(out) == [1, 2, 3]
    return out


# ------------------------------------------------------------------------------- kill, lock and resume
def test_a_run_killed_mid_epoch_blocks_no_one_and_resumes_exactly(good_run, tmp_path, capsys, monkeypatch):
    """A real ``python train.py`` stopped inside epoch 2 (its 2nd step; epoch 1's checkpoint written).

    While it runs, a second run on the same --out (plain, --resume, even --overwrite) fails in seconds naming its
    pid, before loading any data, and changes nothing. Then it is killed with SIGKILL; its lock file stays behind
    and blocks nothing: the same command with --resume ends with parameters, BN statistics, optimizer state and
    history equal, bit for bit, to an uninterrupted run's, which also means the resumed epochs drew the same
    batches, crops and flips (notebook 004's recipe augments).
    """
    killed = tmp_path / "killed"
    proc = start_paused([*TRAIN, "--epochs", "3", "--out", str(killed)], at_step=STEPS + 1, tmp_path=tmp_path)
    try:
        written = snapshot(killed)
        assert steps_of(killed) == [1] and training.HISTORY_FILE in written
        with monkeypatch.context() as m:
            m.setattr(data, "load", refuse_data)
            for extra in ([], ["--resume"], ["--overwrite"]):
                start = time.perf_counter()
                assert run_main([*TRAIN, "--epochs", "3", "--out", str(killed), *extra]) == 1
                err = " ".join(capsys.readouterr().err.split())
                assert time.perf_counter() - start < 15
                assert err.startswith(f"error: {killed.absolute()} is in use by another run (pid {proc.pid} on "), err
                assert snapshot(killed) == written
    finally:
        sigkill(proc)
    assert snapshot(killed) == written  # SIGKILL mid-epoch: epoch 1's files as they were
    assert (killed / LOCK_FILE).read_text().startswith(f"pid {proc.pid} ")  # stale: its process is gone

    capsys.readouterr()
    assert run_main([*TRAIN, "--epochs", "3", "--out", str(killed), "--resume"]) == 0
    out = capsys.readouterr().out
    assert "resuming from" in out and "after epoch 1" in out and "Epoch 2/3" in out
    assert steps_of(killed) == [1, 2, 3]
    assert not (killed / LOCK_FILE).exists()
    assert_same_run(good_run, killed)


@pytest.mark.parametrize(("argv", "at_step", "words"), [
    ([*TRAIN, "--epochs", "3"], STEPS + 1, "continue with the same command and --resume"),
    (["depth", "--quick", "--no-progress"], 2, "finished runs are kept in"),  # 2 steps per epoch: in epoch 2
], ids=["train", "experiment"])
def test_sigterm_mid_epoch_is_handled_as_ctrl_c(argv, at_step, words, tmp_path):
    """SIGTERM (kill, SLURM, containers) inside epoch 2 of a real run: as Ctrl-C, epoch 1's checkpoint and history
    stay, every --out lock is released, the resume hint is printed, no traceback; then exit 143 (128 + 15)."""
    out = tmp_path / "out"
    proc = start_paused([*argv, "--out", str(out)], at_step=at_step, tmp_path=tmp_path)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 143, output[-3000:]
    assert "terminated (SIGTERM)" in output and words in output and "Traceback" not in output, output[-3000:]
    assert not list(out.rglob(LOCK_FILE))
    run = out if argv[0] == "train" else next((out / "runs").iterdir())
    assert steps_of(run) == [1] and len(training.read_history(run)["train_loss"]) == 1


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_unreadable_latest_checkpoint_falls_back_to_the_previous_one(corruption, good_run, tmp_path, capsys):
    """The latest checkpoint damaged on disk: --resume says so, moves it aside (kept for inspection), resumes from
    the one before, saves that epoch again under the same number, and ends where the undamaged run ended."""
    out = tmp_path / "run"
    shutil.copytree(good_run, out)
    CORRUPTIONS[corruption](checkpoint_dir(out, 3))
    damaged = snapshot(checkpoint_dir(out, 3))
    capsys.readouterr()

    assert run_main([*TRAIN, "--epochs", "3", "--max-to-keep", "3", "--out", str(out), "--resume"]) == 0
    said = " ".join(capsys.readouterr().out.split())
    assert f"checkpoint 3 in {out.absolute() / CHECKPOINT_SUBDIR} is unreadable (" in said, said
    assert "trying checkpoint 2" in said and "after epoch 2" in said and "Epoch 3/3" in said
    assert "Epoch 1/3" not in said and "Epoch 2/3" not in said
    aside = aside_dir(out) / checkpoint_dir(out, 3).name
    assert f"moved it to {aside.absolute()}" in said
    assert snapshot(aside) == damaged  # moved as it was, not deleted or repaired
    assert steps_of(out) == [1, 2, 3]
    assert_same_run(good_run, out)


def test_a_resume_past_a_damaged_checkpoint_prints_no_tracebacks(good_run, tmp_path):
    """A real ``python train.py --resume`` over a truncated latest checkpoint, as a child process so that all it
    prints is seen (other threads, interpreter exit included): the fallback is reported once, on stdout, and
    stderr stays empty. (The old orbax store printed ~600 lines of tracebacks here from the read's abandoned
    operations.)"""
    out = tmp_path / "run"
    shutil.copytree(good_run, out)
    truncate(checkpoint_dir(out, 3))
    proc = subprocess.run([sys.executable, "train.py", *TRAIN, "--epochs", "3", "--max-to-keep", "3", "--out",
                           str(out), "--resume"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("is unreadable") == 1 and "checkpoint 3 in" in proc.stdout, proc.stdout
    assert "Epoch 3/3" in proc.stdout
    assert proc.stderr == "", proc.stderr[-3000:]


def test_no_readable_checkpoint_is_a_clear_error(good_run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(good_run, out)
    truncate(checkpoint_dir(out, 3))
    garble_meta(checkpoint_dir(out, 2))
    remove_file(checkpoint_dir(out, 1))
    history = (out / training.HISTORY_FILE).read_bytes()
    capsys.readouterr()
    assert run_main([*TRAIN, "--epochs", "3", "--out", str(out), "--resume"]) == 1
    captured = capsys.readouterr()
    err = " ".join(captured.err.split())
    assert err.startswith("error: no checkpoint in") and "can be resumed from" in err and "Traceback" not in err
    for step in (1, 2, 3):
        assert f"checkpoint {step}:" in err and f"checkpoint {step} in" in captured.out
    assert sorted(p.name for p in aside_dir(out).iterdir()) == [checkpoint_dir(out, s).name for s in (1, 2, 3)]
    assert (out / training.HISTORY_FILE).read_bytes() == history


def test_a_checkpoint_of_another_run_is_refused_not_skipped(good_run, tmp_path, capsys):
    """A readable checkpoint made with other settings is no reason to fall back to an older one."""
    out = tmp_path / "run"
    shutil.copytree(good_run, out)
    before = snapshot(out / CHECKPOINT_SUBDIR)
    assert run_main([*TRAIN, "--epochs", "3", "--seed", "1", "--out", str(out), "--resume"]) == 1
    err = " ".join(capsys.readouterr().err.split())
    assert err.startswith("error: ") and "seed: the checkpoint's run has 0, this one 1" in err, err
    assert steps_of(out) == [1, 2, 3] and not aside_dir(out).exists()
    assert snapshot(out / CHECKPOINT_SUBDIR) == before


def test_torch_checkpoint_falls_back_too(tmp_path, tiny_dataset, make_recipe):
    """``--framework torch`` checkpoints (the same store): a truncated newest one and a bit flipped inside the
    first conv's weights of the one before are both moved aside, and the run resumes from epoch 1 to the same
    result. The bit flip leaves a file that safetensors loads without complaint: only the digest catches it."""
    recipe = make_recipe("plain-vs-residual", epochs=3)
    config = RunConfig(recipe=recipe, model=ModelConfig("SimpleResNet", {"n_blocks": 1}), framework="torch", seed=3)
    out = tmp_path / "run"
    straight = fit(builders.build_torch("SimpleResNet", {"n_blocks": 1}, seed=0), config, tiny_dataset,
                              out_dir=out, max_to_keep=3).history
    assert steps_of(out) == [1, 2, 3]
    three, two = checkpoint_dir(out, 3), checkpoint_dir(out, 2)
    (three / ARRAYS_FILE).write_bytes((three / ARRAYS_FILE).read_bytes()[:1000])
    flip_bit_in(two / ARRAYS_FILE, _codecs.MODEL_PREFIX + "conv1.weight")
    assert len(safetensors.numpy.load((two / ARRAYS_FILE).read_bytes())) > 0
    lines: list[str] = []
    resumed_model = builders.build_torch("SimpleResNet", {"n_blocks": 1}, seed=9)
    resumed = fit(resumed_model, config, tiny_dataset, out_dir=out, resume=True, max_to_keep=3,
                             log=lines.append).history
    assert "checkpoint 3" in lines[0] and "unreadable" in lines[0] and "trying checkpoint 2" in lines[0], lines
    assert "checkpoint 2" in lines[1] and "SHA-256" in lines[1] and "trying checkpoint 1" in lines[1], lines
    assert lines[2].startswith("resuming from") and "after epoch 1" in lines[2], lines
    for key in ("train_loss", "train_acc", "test_loss", "test_acc", "lr"):
        assert resumed[key] == straight[key], key
    assert sorted(p.name for p in aside_dir(out).iterdir()) == [two.name, three.name]
    assert steps_of(out) == [1, 2, 3]


# ------------------------------------------------------------------------------------------------ divergence
DIVERGE = ["--epochs", "3", "--schedule", "multistep", "--milestones", "1", "--gamma", "1e30"]  # lr 0.1, then 1e29


@pytest.mark.parametrize("framework", ["jax", "torch"])
def test_a_nan_loss_stops_the_run_naming_epoch_and_step(framework, tmp_path, capsys, monkeypatch):
    """lr 0.1 for epoch 1, then 1e29: the loss becomes nan in epoch 2. The run stops there with exit 1 and a message
    naming the epoch and step; epoch 1's checkpoint and history stay, nothing of epoch 2 is written.

    The named step must be the first non-finite one. For jax the loop finds it from a minimum kept on the device
    and read once per epoch; the oracle here reads each step's loss on the host after every step (through the
    loop's ``on_step`` hook, which changes nothing in the computation). The torch backend reads every loss anyway
    and stops at the first bad one, before the ``on_step`` hook sees it."""
    losses: list[float] = []
    real_train = training.train

    def train(*args, **kwargs):
        return real_train(*args, on_step=lambda step, loss: losses.append(loss()), **kwargs)

    monkeypatch.setattr(training, "train", train)
    out = tmp_path / "run"
    code = run_main([*TRAIN, *DIVERGE, "--framework", framework, "--out", str(out)])
    err = " ".join(capsys.readouterr().err.split())
    assert code == 1 and err.startswith("error: training diverged: the training loss became nan at epoch 2, step "), err
    assert "Traceback" not in err and "not saved" in err and "--lr" in err and "--overwrite" in err
    assert "checkpoint (epoch 1)" in err and str(out.absolute() / CHECKPOINT_SUBDIR) in err
    history = training.read_history(out)
    assert len(history["train_loss"]) == 1 and np.isfinite(history["train_loss"][0])
    assert steps_of(out) == [1]
    assert sorted(p.name for p in (out / CHECKPOINT_SUBDIR).iterdir()) == [checkpoint_dir(out, 1).name]  # no partial
    assert saved_run(out, 1)[1]["epoch"] == 1
    if framework == "jax":
        first = next(i for i, loss in enumerate(losses) if not np.isfinite(loss))
    else:
        first = len(losses)  # the steps before were finite
        assert all(np.isfinite(losses))
    assert first // STEPS == 1  # in epoch 2
    assert f"at epoch 2, step {first % STEPS + 1} of {STEPS} (optimizer step {first + 1})" in err, (first, err)


# ------------------------------------------------------------------------------------------- porting
def snapshot_model(model: nnx.Module) -> list[np.ndarray]:
    return [np.array(x) for x in jax.tree.leaves(nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat)))]


def torch_state(name: str = "SimpleResNet", kwargs: dict | None = None) -> dict[str, torch.Tensor]:
    return builders.build_torch(name, {"n_blocks": 1} if kwargs is None else kwargs, seed=1).state_dict()


def _renamed(sd: dict) -> dict:
    sd = dict(sd)
    sd["classifier.weight"] = sd.pop("fc.weight")
    return sd


def _transposed_fc(sd: dict) -> dict:
    return {**sd, "fc.weight": sd["fc.weight"].t()}


BAD_STATE_DICTS = {  # name -> (state_dict maker, words the message must hold)
    "missing": (lambda sd: {k: v for k, v in sd.items() if k != "bn1.running_var"},
                ["missing key(s) (1): bn1.running_var"]),
    "extra": (lambda sd: {**sd, "fc2.weight": torch.zeros(3)}, ["unexpected key(s) (1): fc2.weight"]),
    "renamed": (_renamed, ["missing key(s) (1): fc.weight", "unexpected key(s) (1): classifier.weight"]),
    "transposed fc": (_transposed_fc, ["size mismatch for fc.weight", "(64, 10)", "(10, 64)"]),
    "wrong shape": (lambda sd: {**sd, "conv1.weight": torch.zeros(16, 3, 5, 5)},
                    ["size mismatch for conv1.weight", "(16, 3, 5, 5)", "(16, 3, 3, 3)"]),
    "another architecture": (lambda sd: torch_state("PlainNet", {"num_blocks": (1, 1, 1, 1)}),
                             ["weights of another model", "layer1.0.conv1.weight", "... and"]),
    "DataParallel prefix": (lambda sd: {f"module.{k}": v for k, v in sd.items()}, ["'module.'"]),
    "not a tensor": (lambda sd: {**sd, "fc.bias": "ten zeros"}, ["'fc.bias' is a str, not a tensor"]),
    "a training checkpoint": (lambda sd: {"model": sd, "optimizer": {}, "epoch": 1},
                              ["'model'", "optimizer"]),
}


@pytest.mark.parametrize("case", list(BAD_STATE_DICTS))
def test_state_dicts_that_do_not_fit_raise_one_clear_error_and_change_nothing(case):
    make, words = BAD_STATE_DICTS[case]
    model = builders.build_flax("SimpleResNet", {"n_blocks": 1})
    before = snapshot_model(model)
    with pytest.raises(port.PortError) as info:
        port.load_torch_state_dict(model, make(torch_state()))
    message = str(info.value)
    for word in words:
        assert word in message, (word, message)
    assert message.count("\n") < 12, message  # a summary, not every key of a big model
    for a, b in zip(snapshot_model(model), before, strict=True):
        assert np.array_equal(a, b)


def test_a_transposed_square_kernel_cannot_be_detected():
    """Honest limit: a 3x3 conv with as many inputs as outputs has the same shape transposed (O and I swapped), so
    no loader can tell; it loads, and only the outputs show it. Porting never transposes by itself (the parity
    suite's round trips are bit-exact), so this arises only from a state_dict that was wrong to begin with."""
    sd = torch_state()
    key = "stage1.0.conv1.weight"  # 16 -> 16 channels
    assert sd[key].shape[0] == sd[key].shape[1]
    model = builders.build_flax("SimpleResNet", {"n_blocks": 1})
    port.load_torch_state_dict(model, {**sd, key: sd[key].transpose(0, 1)})  # no error: the shapes fit
    reference = builders.build_flax("SimpleResNet", {"n_blocks": 1})
    port.load_torch_state_dict(reference, sd)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 32, 32, 3)), jnp.float32)
    model.eval(), reference.eval()
    assert not np.allclose(np.asarray(model(x)), np.asarray(reference(x)))


class Payload:
    """A pickle that runs code when loaded (``__reduce__``): what weights_only=True must refuse."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "the pickle ran code"))


BAD_FILES = {  # name -> (writer, words of the error)
    "a tensor": (lambda p, m: torch.save(torch.zeros(3), p), ["holds a Tensor, not a state_dict"]),
    "a list": (lambda p, m: torch.save([torch.zeros(3)], p), ["holds a list, not a state_dict"]),
    "an arbitrary pickle": (lambda p, m: torch.save({"conv1.weight": Payload(m)}, p),
                            ["refused to load", "could run code", "weights_only"]),
    "a plain pickle": (lambda p, m: p.write_bytes(pickle.dumps(Payload(m))), ["refused to load", "could run code"]),
    "not a torch file": (lambda p, m: p.write_text("these are not weights\n"), ["cannot read", "as a torch file"]),
    "a truncated file": (lambda p, m: (torch.save(torch_state(), p), p.write_bytes(p.read_bytes()[:5000])),
                         ["cannot read", "as a torch file"]),
    "another architecture": (lambda p, m: torch.save(torch_state("PlainDeepCNN"), p),
                             ["does not fit SimpleResNet", "missing key", "weights of PlainDeepCNN: pass --model "
                              "PlainDeepCNN --n-blocks 1"]),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_pt_files_fail_cleanly_in_port_and_train(case, tmp_path, capsys, monkeypatch):
    """Through ``port`` and ``train --init-from`` (both frameworks): exit 1, one ``error:`` paragraph, no traceback,
    no output written, and a pickle that would run code is refused without running it."""
    write, words = BAD_FILES[case]
    pt, marker = tmp_path / "weights.pt", tmp_path / "ran"
    write(pt, marker)
    commands = {
        "port": ["port", "--from", str(pt), "--to", str(tmp_path / "ckpt"), "--model", "SimpleResNet", "--n-blocks",
                 "1"],
        "train jax": [*TRAIN, "--epochs", "1", "--init-from", str(pt), "--out", str(tmp_path / "jax")],
        "train torch": [*TRAIN, "--epochs", "1", "--init-from", str(pt), "--framework", "torch", "--out",
                        str(tmp_path / "torch")],
    }
    for name, argv in commands.items():
        capsys.readouterr()
        assert run_main(argv) == 1, name
        err = " ".join(capsys.readouterr().err.split())
        assert err.startswith("error: ") and "Traceback" not in err, (name, err)
        for word in words:  # torch's own report says "Missing key(s)"
            assert word.lower() in err.lower(), (name, word, err)
    assert not marker.exists()
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / "jax").exists() and not (tmp_path / "torch").exists()


# ---------------------------------------------------------------------------------------------- input shapes
BAD_INPUTS = {  # name -> (shape, words); SimpleNet's fc fixes 32x32, the others pool to 1x1 and take any size
    "NCHW": ((2, 3, 32, 32), ["NHWC", "(2, 3, 32, 32)", "NCHW", "transpose"]),
    "one channel": ((2, 32, 32, 1), ["3 channels last", "(2, 32, 32, 1)"]),
    "four channels": ((2, 32, 32, 4), ["3 channels last", "(2, 32, 32, 4)"]),
    "no batch axis": ((32, 32, 3), ["a batch of NHWC images", "(32, 32, 3)"]),
}


@pytest.mark.parametrize("name", registry.model_names())
def test_wrong_images_get_a_message_that_says_what_was_expected(name):
    """Every registered model, traced abstractly (no weights computed): a clear ValueError, not an XLA dump."""
    abstract = nnx.eval_shape(lambda: builders.build_flax(name))
    graphdef, state = nnx.split(abstract)

    def forward(shape: tuple[int, ...]):
        x = jax.ShapeDtypeStruct(shape, jnp.float32)
        return jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x), state, x)

    assert forward((2, 32, 32, 3)).shape == (2, 10)
    cases = dict(BAD_INPUTS)
    if name == "SimpleNet":
        cases["16x16"] = ((2, 16, 16, 3), ["takes 32x32 images", "got 16x16"])
    else:
        assert forward((2, 16, 16, 3)).shape == (2, 10)  # adaptive pooling: any size works
    for shape, words in cases.values():
        with pytest.raises(ValueError) as info:
            forward(shape)
        message = str(info.value)
        assert len(message) < 300 and "\n" not in message, message
        for word in words:
            assert word in message, (shape, word, message)


# ------------------------------------------------------------------------------------------ disk and --out
def refuse_data(*args) -> None:
    raise AssertionError("the data was loaded before the output directory was checked")


@pytest.fixture
def no_data_loading(monkeypatch):
    """Fails the test if the command gets as far as loading data (the checks must come first)."""
    monkeypatch.setattr(data, "load", refuse_data)


def test_an_unwritable_out_fails_before_anything_else(tmp_path, capsys, no_data_loading):
    """--out below a regular file: no user, root included, can create it (ENOTDIR). This is how the test makes a
    place that root cannot write to; chmod would not stop root (the next test uses it when not root)."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    start = time.perf_counter()
    assert run_main([*TRAIN, "--out", str(blocker / "run")]) == 1
    err = " ".join(capsys.readouterr().err.split())
    assert time.perf_counter() - start < 15
    assert err.startswith(f"error: cannot create the output directory {blocker / 'run'}") and "Not a directory" in err
    assert blocker.read_text() == "not a directory"


def test_a_read_only_out_fails_before_anything_else(tmp_path, capsys, no_data_loading):
    """A directory that cannot be written to: as root (permission bits do not stop root) a read-only tmpfs mount,
    a real EROFS; otherwise a chmod 500 directory, a real EACCES."""
    out = tmp_path / "ro"
    out.mkdir()
    if os.geteuid() == 0:
        if not can_mount() or subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(out)],
                                             capture_output=True).returncode != 0:
            pytest.skip("root, and no read-only tmpfs can be mounted here")
        undo = ["umount", "-l", str(out)]
    else:
        out.chmod(0o500)
        undo = ["chmod", "700", str(out)]
    try:
        assert run_main([*TRAIN, "--out", str(out / "run")]) == 1
        assert run_main([*TRAIN, "--out", str(out)]) == 1
    finally:
        subprocess.run(undo, check=False)
    err = " ".join(capsys.readouterr().err.split())
    assert f"error: cannot create the output directory {out.absolute() / 'run'}" in err
    assert f"error: cannot write to the output directory {out.absolute()}" in err
    assert ("Read-only file system" if os.geteuid() == 0 else "Permission denied") in err, err


def can_mount() -> bool:
    return os.geteuid() == 0 and shutil.which("mount") is not None


@pytest.fixture
def tiny_disk(tmp_path):
    """A 4 MiB tmpfs (root only): a real file system that fills up."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if not can_mount() or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)],
                                         capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root and CAP_SYS_ADMIN); the rlimit variant covers this")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def assert_only_the_report(stderr: str) -> str:
    """``stderr`` is one ``error:`` report as ``commands.fail`` prints it and nothing else (no log lines, no
    tracebacks, nothing printed later by other threads or at exit): the ``error:`` line, then only its indented
    continuation lines. Returns the report on one line."""
    assert stderr.startswith("error: ") and stderr.endswith("\n"), stderr[-3000:]
    lines = stderr[:-1].split("\n")
    assert lines[0].startswith("error: ") and all(line.startswith("  ") for line in lines[1:]), stderr[-3000:]
    assert stderr.count("error: ") == 1 and "Traceback" not in stderr, stderr[-3000:]
    return " ".join(stderr.split())


@pytest.mark.parametrize("framework", ["jax", "torch"])
@pytest.mark.parametrize("how", ["full tmpfs", "file size limit"])
def test_a_full_disk_while_checkpointing_loses_nothing(how, framework, tmp_path, request, capsys):
    """The checkpoint of epoch 2 cannot be written. 'full tmpfs': a real 4 MiB tmpfs is filled up during epoch 2
    (real ENOSPC from the kernel; needs root). 'file size limit': RLIMIT_FSIZE instead (real EFBIG from the kernel
    for any write past 64 KiB; any user). Either way, and for both frameworks (they write the same store): exit 1
    with one message that says what happened and is all the run printed to stderr, every file epoch 1 wrote
    unchanged, no partial checkpoint or temporary directory left (also not once the process has ended), and
    --resume continues once there is room.

    The run is a child process (tests/fault_worker.py), so that all it prints is seen and the fault (a full file
    system, a lowered file size limit) ends with it.
    """
    if how == "full tmpfs":
        disk = request.getfixturevalue("tiny_disk")
        out, fault = disk / "run", ["--action", "fill", "--ballast", str(disk / "ballast")]
        word = "No space left on device"
    else:
        out, fault = tmp_path / "run", ["--action", "fsize"]
        word = "File too large"
    argv = [*TRAIN, "--epochs", "2", "--framework", framework, "--out", str(out)]
    hashes = tmp_path / "before.json"
    proc = subprocess.run([sys.executable, str(WORKER), "--at-step", str(STEPS + 1), *fault, "--leave", "65536",
                           "--snapshot", str(hashes), "--snapshot-of", str(out), "--", *argv],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    message = assert_only_the_report(proc.stderr)
    checkpoints = out.absolute() / CHECKPOINT_SUBDIR
    assert message.startswith(f"error: could not write checkpoint 2 to {checkpoints} ({word})"), message
    assert "steps: 1" in message and "free some space" in message.lower() and "--out" in message
    assert "--resume" in message and "partial files" not in message  # none left to name
    assert "Epoch 1/2" in proc.stdout and "Epoch 2/2" not in proc.stdout
    if how == "full tmpfs":
        (disk / "ballast").unlink()
    before = {k: v for k, v in json.loads(hashes.read_text()).items() if k != LOCK_FILE}
    assert file_hashes(out) == before and training.HISTORY_FILE in before
    assert sorted(p.name for p in checkpoints.iterdir()) == [checkpoint_dir(out, 1).name]  # hidden ones included
    saved_run(out, 1)  # readable, and it matches its digest

    assert run_main([*argv, "--resume"]) == 0
    assert len(training.read_history(out)["train_loss"]) == 2
    assert steps_of(out) == [1, 2]
