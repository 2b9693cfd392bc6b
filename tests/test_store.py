"""The checkpoint store (``flax_resnet.store``) and its codecs (``flax_resnet._codecs``).

- round trips, bit for bit: a Flax ``TrainState`` (BatchNorm statistics, SGD momentum), an ``nnx.State`` with a
  PRNG key, a torch model and SGD(momentum) optimiser whose resumed training continues bit-identically, and the
  dtypes a state meets;
- the directory: steps, latest, max_to_keep, never overwriting, multi-process roles through a barrier;
- damaged checkpoints (truncated, one flipped bit, garbled meta.json, a missing file): detected, set aside,
  reported, the one before restored; none readable: one error listing each problem;
- ``remove_all`` (--overwrite) removes only what the store wrote;
- a full disk (a real tmpfs as root, else RLIMIT_FSIZE), in a child process: one error in the OS's words, no
  leftovers, earlier checkpoints readable, and stderr empty;
- importing the modules changes nothing global.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from flax import nnx

from flax_resnet import _codecs, store
from flax_resnet.recipes import RECIPES
from flax_resnet.store import CheckpointError, CheckpointStore, UnreadableCheckpoint
from flax_resnet.training import engine

REPO = Path(__file__).resolve().parents[1]
RECIPE = RECIPES["resnet18-cifar"]  # SGD with momentum 0.9 and weight decay


# ------------------------------------------------------------------------------------------------ helpers
def assert_trees_identical(a, b) -> None:
    """Same structure, and every leaf of the same dtype, shape and bits (PRNG keys: same impl and data)."""
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            assert jax.random.key_impl(x) == jax.random.key_impl(y)
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        assert x.tobytes() == y.tobytes()


class TinyNet(nnx.Module):
    """Conv, BatchNorm, Linear: a TrainState of every kind of leaf a ResNet's has, compiled in a second."""

    def __init__(self, rngs: nnx.Rngs):
        self.conv = nnx.Conv(3, 4, (3, 3), rngs=rngs)
        self.bn = nnx.BatchNorm(4, rngs=rngs)
        self.fc = nnx.Linear(4, 10, rngs=rngs)

    def __call__(self, x):
        return self.fc(nnx.relu(self.bn(self.conv(x))).mean(axis=(1, 2)))


TX = engine.make_optimizer(RECIPE, 4)


@pytest.fixture(scope="module")
def trained():
    """TinyNet's TrainState after 2 SGD steps (BN statistics and momentum non-zero) and its jitted step."""
    graphdef, state = engine.init_train_state(TinyNet(nnx.Rngs(0)), TX)
    step = jax.jit(lambda s, x, y: engine.train_step(graphdef, TX, s, x, y)[0])
    rng = np.random.default_rng(0)
    for _ in range(2):
        state = step(state, jnp.asarray(rng.normal(size=(4, 8, 8, 3)), jnp.float32),
                     jnp.asarray(rng.integers(0, 10, 4), jnp.int32))
    return step, state


def fresh_template():
    return engine.init_train_state(TinyNet(nnx.Rngs(1)), TX)[1]


def small_arrays(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"w": rng.normal(size=(8, 8)).astype(np.float32), "n": np.asarray(seed, np.int32)}


def filled(directory: Path, steps, max_to_keep=None) -> CheckpointStore:
    ckpts = CheckpointStore(directory, max_to_keep=max_to_keep)
    for step in steps:
        ckpts.save(step, small_arrays(step), {"epoch": step})
    return ckpts


def assert_one_line_naming(error: BaseException, *words: str) -> None:
    text = str(error)
    assert "\n" not in text, text
    for word in words:
        assert word in text, text


# ------------------------------------------------------------------------------------------- round trips
def test_a_flax_train_state_round_trips_bit_exactly(trained, tmp_path):
    """Parameters, BatchNorm statistics, optax SGD-momentum state and step, into a template of another seed; and
    the restored state's next training step equals the original's."""
    step, state = trained
    arrays = _codecs.flax_to_arrays(state)
    assert ".step" in arrays and any(k.startswith(".opt_state") and ".trace" in k for k in arrays)
    assert any(k.startswith(".model_state") and "['mean']" in k for k in arrays)
    ckpts = CheckpointStore(tmp_path / "ckpt")
    ckpts.save(2, arrays, {"epoch": 2, "history": {"loss": [2.5, float("nan")]}})
    read, meta = ckpts.read(2)
    assert meta["epoch"] == 2 and meta["history"]["loss"][0] == 2.5 and np.isnan(meta["history"]["loss"][1])
    restored = _codecs.flax_from_arrays(fresh_template(), read)
    assert_trees_identical(restored, state)
    assert isinstance(restored.params, nnx.State)
    for array in read.values():  # the restored state owns its memory (on CPU jax could share NumPy's)
        array.fill(0)
    assert_trees_identical(restored, state)
    # and it trains on: the restored state gives the same next step as the original
    x, y = jnp.ones((4, 8, 8, 3), jnp.float32), jnp.zeros((4,), jnp.int32)
    assert_trees_identical(step(restored, x, y), step(state, x, y))


def test_an_nnx_state_with_a_prng_key_round_trips(tmp_path):
    """``nnx.state(model)`` of a model with dropout: its RNG key (here of the 'rbg' implementation, which the
    template supplies) and counter come back exactly; so do the weights and BN statistics."""

    class Tiny(nnx.Module):
        def __init__(self, rngs: nnx.Rngs):
            self.lin = nnx.Linear(3, 4, rngs=rngs)
            self.bn = nnx.BatchNorm(4, rngs=rngs)
            self.drop = nnx.Dropout(0.5, rngs=rngs)

        def __call__(self, x):
            return self.drop(self.bn(self.lin(x)))

    def make(seed: int) -> Tiny:
        return Tiny(nnx.Rngs(params=seed, dropout=jax.random.key(seed + 7, impl="rbg")))

    model = make(0)
    model(jnp.ones((5, 3)))  # draws a dropout mask: the counter moves, BN statistics change
    state = nnx.state(model)
    keys = [leaf for leaf in jax.tree.leaves(state) if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key)]
    assert len(keys) == 1 and "rbg" in str(jax.random.key_impl(keys[0]))
    ckpts = CheckpointStore(tmp_path)
    ckpts.save(0, _codecs.flax_to_arrays(state), {})
    other = make(1)
    restored = _codecs.flax_from_arrays(nnx.state(other), ckpts.read()[0])
    assert_trees_identical(restored, state)
    nnx.update(other, restored)
    assert np.array_equal(other(jnp.ones((5, 3))), model(jnp.ones((5, 3))))


def test_weights_only_from_a_training_checkpoint(trained, tmp_path):
    """``strict=False``: the model's part of a TrainState checkpoint, the optimiser's arrays ignored."""
    _, state = trained
    ckpts = CheckpointStore(tmp_path)
    ckpts.save(3, _codecs.flax_to_arrays(state), {})
    template = fresh_template()._replace(opt_state=None, step=None)
    with pytest.raises(CheckpointError, match="unexpected"):
        _codecs.flax_from_arrays(template, ckpts.read()[0])
    weights = _codecs.flax_from_arrays(template, ckpts.read()[0], strict=False)
    assert_trees_identical((weights.params, weights.model_state), (state.params, state.model_state))


def torch_training(dtype: torch.dtype, seed: int):
    torch.manual_seed(seed)
    from torch_ref.models import SimpleResNet

    model = SimpleResNet(n_blocks=1).to(dtype)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    return model, optimizer


def torch_steps(model, optimizer, batches) -> None:
    model.train()
    for x, y in batches:
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_torch_training_resumes_bit_identically(dtype, tmp_path):
    """A torch model and SGD(momentum) after 2 steps, saved and loaded into a model and optimiser built from
    another seed: 2 more steps end exactly where 4 uninterrupted steps end (weights, BN buffers, momentum)."""
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(4, 3, 32, 32, generator=g, dtype=dtype), torch.randint(0, 10, (4,), generator=g))
               for _ in range(4)]
    model, optimizer = torch_training(dtype, seed=0)
    torch_steps(model, optimizer, batches[:2])
    arrays, extra = _codecs.torch_to_arrays(model, optimizer)
    assert any(k.startswith("optimizer/") and k.endswith("/momentum_buffer") for k in arrays)
    assert "model/bn1.running_mean" in arrays and "model/bn1.num_batches_tracked" in arrays
    ckpts = CheckpointStore(tmp_path)
    ckpts.save(1, arrays, {"torch_optimizer": extra})
    torch_steps(model, optimizer, batches[2:])  # the uninterrupted run

    resumed, resumed_optimizer = torch_training(dtype, seed=1)
    read, meta = ckpts.read()
    _codecs.torch_from_arrays(resumed, resumed_optimizer, read, meta["torch_optimizer"])
    torch_steps(resumed, resumed_optimizer, batches[2:])
    for (k, a), (k2, b) in zip(model.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert k == k2 and a.dtype == b.dtype == (dtype if a.is_floating_point() else a.dtype)
        assert torch.equal(a, b), k
    end, resumed_end = optimizer.state_dict(), resumed_optimizer.state_dict()
    assert end["param_groups"] == resumed_end["param_groups"]
    for index, values in end["state"].items():
        assert torch.equal(values["momentum_buffer"], resumed_end["state"][index]["momentum_buffer"])


def test_torch_weights_only_and_a_misfit(tmp_path):
    """optimizer=None writes and reads the weights alone; a model of another size gets the short listing."""
    model, _ = torch_training(torch.float32, seed=0)
    arrays, extra = _codecs.torch_to_arrays(model)
    assert extra == {} and all(k.startswith("model/") for k in arrays)
    other, optimizer = torch_training(torch.float32, seed=1)
    _codecs.torch_from_arrays(other, None, arrays, extra)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values(),
                                                       strict=True))
    with pytest.raises(CheckpointError, match="weights only"):
        _codecs.torch_from_arrays(other, optimizer, arrays, extra)
    _, sgd = torch_training(torch.float32, seed=0)
    arrays, extra = _codecs.torch_to_arrays(model, sgd)
    params = list(other.parameters())
    two_groups = torch.optim.SGD([{"params": params[:1]}, {"params": params[1:]}], lr=0.1)
    with pytest.raises(CheckpointError, match="optimiser state does not fit this SGD"):  # not torch's traceback
        _codecs.torch_from_arrays(other, two_groups, arrays, extra)
    from torch_ref.models import SimpleResNet

    with pytest.raises(CheckpointError) as info:
        _codecs.torch_from_arrays(SimpleResNet(n_blocks=3), None, arrays, extra)
    text = str(info.value)
    assert text.startswith("the checkpoint does not fit this SimpleResNet (") and "missing" in text
    assert len(text.splitlines()) <= 13 and len(text) < 2000 and "more" in text


def test_a_flax_state_of_another_model_gets_one_short_error(trained):
    """A TrainState of another model against TinyNet's arrays (wider layers: mismatched; a head named otherwise:
    missing and unexpected): counted, ten listed, never a page."""

    class OtherNet(nnx.Module):
        def __init__(self, rngs: nnx.Rngs):
            self.conv = nnx.Conv(3, 8, (3, 3), rngs=rngs)
            self.bn = nnx.BatchNorm(8, rngs=rngs)
            self.head = nnx.Linear(8, 10, rngs=rngs)

    _, state = trained
    other = engine.init_train_state(OtherNet(nnx.Rngs(0)), TX)[1]
    with pytest.raises(CheckpointError) as info:
        _codecs.flax_from_arrays(other, _codecs.flax_to_arrays(state))
    text = str(info.value)
    assert text.startswith("the checkpoint does not fit this state (") and "missing" in text and "unexpected" in text
    assert len(text.splitlines()) <= 13 and len(text) < 2000 and "... and " in text, text
    # a dtype mismatch alone is named with both dtypes
    arrays = _codecs.flax_to_arrays(state)
    arrays[".step"] = arrays[".step"].astype(np.int64)
    with pytest.raises(CheckpointError, match=r"mismatched \.step: saved int64\[\], this state has int32\[\]"):
        _codecs.flax_from_arrays(state, arrays)


def test_every_dtype_a_state_meets_round_trips(tmp_path):
    """float32/64, float16, int32/64, uint32, bool, bfloat16 (stored as uint16 bits and viewed back: safetensors'
    NumPy loader lacks it), 0-d and empty arrays, a non-contiguous input, and names with any characters."""
    rng = np.random.default_rng(0)
    arrays = {
        "f32": rng.normal(size=(3, 4)).astype(np.float32),
        "f64": rng.normal(size=(2,)),
        "f16": rng.normal(size=(5,)).astype(np.float16),
        "i32": np.arange(-3, 3, dtype=np.int32),
        "i64": np.asarray(2**40, np.int64),
        "u32": np.asarray([0, 2**32 - 1], np.uint32),
        "bool": np.asarray([True, False, True]),
        "bf16": rng.normal(size=(2, 3)).astype(ml_dtypes.bfloat16),
        "empty": np.zeros((0, 3), np.float32),
        "strided": np.arange(12.0).reshape(3, 4)[:, ::-1],
        "big-endian": np.arange(3, dtype=">f4"),
        ".params['conv1']['kernel'].value": np.ones((1,), np.float32),
        "model/layer1.0.bn1.running_var ✓": np.ones((2,), np.float32),
    }
    ckpts = CheckpointStore(tmp_path)
    ckpts.save(0, arrays, {})
    read, _ = ckpts.read(0)
    assert set(read) == set(arrays)
    for name, a in arrays.items():
        a = a.astype(a.dtype.newbyteorder("="))  # read back in this machine's byte order
        assert read[name].dtype == a.dtype and read[name].shape == a.shape, name
        assert np.ascontiguousarray(read[name]).tobytes() == np.ascontiguousarray(a).tobytes(), name
        assert read[name].flags.writeable
    with pytest.raises(TypeError, match="cannot hold"):
        ckpts.save(1, {"text": np.asarray(["a"])}, {})
    with pytest.raises(TypeError, match="__metadata__"):  # safetensors' header would hold it twice: unreadable
        ckpts.save(1, {"__metadata__": np.zeros(1)}, {})
    with pytest.raises(TypeError):
        ckpts.save(1, {"x": np.zeros(1)}, {"not json": object()})
    assert ckpts.steps == [0] and sorted(os.listdir(tmp_path)) == ["epoch_0000"]  # nothing half written


# -------------------------------------------------------------------------------------------- directory
def test_steps_latest_pruning_and_no_overwriting(tmp_path):
    ckpts = CheckpointStore(tmp_path / "c", max_to_keep=3)
    assert ckpts.steps == [] and ckpts.latest is None
    for step in range(6):
        assert ckpts.save(step, small_arrays(step), {"epoch": step}) == tmp_path / "c" / f"epoch_{step:04d}"
    assert ckpts.steps == [3, 4, 5] and ckpts.latest == 5
    assert sorted(os.listdir(tmp_path / "c")) == ["epoch_0003", "epoch_0004", "epoch_0005"]  # no temporaries
    assert ckpts.read_meta() == {"epoch": 5} and ckpts.read_meta(3) == {"epoch": 3}
    arrays, _ = ckpts.read(4)
    assert np.array_equal(arrays["w"], small_arrays(4)["w"])
    # the one just written is never pruned, even when older than the rest
    ckpts.save(1, small_arrays(1), {"epoch": 1})
    assert ckpts.steps == [1, 4, 5]
    with pytest.raises(CheckpointError, match="already exists .* never overwritten"):
        ckpts.save(5, small_arrays(0), {})
    assert ckpts.read_meta(5) == {"epoch": 5}
    with pytest.raises(CheckpointError, match=r"no checkpoint 2 in .* \(steps there: 1, 4, 5\)"):
        ckpts.read(2)
    keep_all = filled(tmp_path / "all", range(5), max_to_keep=None)
    assert keep_all.steps == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="max_to_keep must be at least 1"):  # 0 would prune all but the newest
        CheckpointStore(tmp_path / "none", max_to_keep=0)
    with pytest.raises(CheckpointError, match="there is no checkpoint in"):
        CheckpointStore(tmp_path / "nowhere").read()
    (tmp_path / "a-file").write_text("")
    with pytest.raises(CheckpointError) as info:  # the OS's words, and no traceback of an OSError
        CheckpointStore(tmp_path / "a-file" / "c").save(1, small_arrays(1), {})
    assert_one_line_naming(info.value, f"could not write checkpoint 1 to {tmp_path / 'a-file' / 'c'} (Not a directory)")


def test_stale_temporaries_are_swept_by_the_next_writer(tmp_path):
    """A save killed half way leaves a hidden temporary directory, never a checkpoint: invisible to ``steps``,
    removed by the next writer's first save."""
    filled(tmp_path, [1])
    stale = tmp_path / ".epoch_0002.tmp-12345-abcdef01"
    stale.mkdir()
    (stale / store.ARRAYS_FILE).write_bytes(b"half")
    assert CheckpointStore(tmp_path).steps == [1]
    ckpts = CheckpointStore(tmp_path)
    write = ckpts._write
    seen_at_write = []  # swept before the write: on a nearly full disk its space is what the new checkpoint needs
    ckpts._write = lambda *args: seen_at_write.append(stale.exists()) or write(*args)
    ckpts.save(2, small_arrays(2), {})
    assert seen_at_write == [False]
    assert sorted(os.listdir(tmp_path)) == ["epoch_0001", "epoch_0002"]


def test_a_step_is_an_integer_at_least_0(tmp_path):
    """-1 would be written as epoch_-001, which ``steps`` never lists; a float or bool is a caller's mistake; a NumPy
    integer is taken as the int it is (JSON has no NumPy types)."""
    ckpts = CheckpointStore(tmp_path)
    for step in (-1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="integer >= 0"):
            ckpts.save(step, small_arrays(1), {})
    assert not tmp_path.exists() or os.listdir(tmp_path) == []
    ckpts.save(np.int64(3), small_arrays(3), {})
    assert ckpts.steps == [3] and ckpts.read(3)[1] == {}


def test_only_the_writer_writes_and_every_process_meets_at_the_barrier(tmp_path):
    """Two processes' stores on one directory (simulated in one process): the non-writer writes, moves and removes
    nothing, and both call the barrier with the same names, in the same order."""
    calls: dict[str, list[str]] = {"writer": [], "other": []}
    writer = CheckpointStore(tmp_path, barrier=calls["writer"].append)
    other = CheckpointStore(tmp_path, is_writer=False, barrier=calls["other"].append)
    other.save(1, small_arrays(1), {})
    assert other.steps == []
    writer.save(1, small_arrays(1), {})
    assert other.steps == [1] and other.read_meta(1) == {}
    (tmp_path / "epoch_0001" / store.META_FILE).write_text("{")
    assert other.set_aside(1) == writer.set_aside(1) == tmp_path.with_name(tmp_path.name + ".unreadable") / "epoch_0001"
    assert writer.steps == []
    writer.save(2, small_arrays(2), {})
    other.save(2, small_arrays(2), {})
    assert other.remove_all() == [] and writer.steps == [2]
    assert writer.remove_all() == [tmp_path / "epoch_0002"]
    assert calls["writer"] == calls["other"] == ["checkpoint-1", "checkpoint-set-aside-1",
                                                 "checkpoint-set-aside-1-done", "checkpoint-2",
                                                 "checkpoint-remove-all"]


def test_resolve_finds_a_runs_checkpoints(tmp_path):
    assert store.resolve(tmp_path) == tmp_path
    (tmp_path / store.CHECKPOINT_SUBDIR).mkdir()
    assert store.resolve(tmp_path) == tmp_path / "checkpoints"


# --------------------------------------------------------------------------------------- damaged checkpoints
def truncate(step_dir: Path) -> None:
    f = step_dir / store.ARRAYS_FILE
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def flip_a_bit(step_dir: Path) -> None:
    """One bit in the middle of the arrays' data: safetensors itself would load this without complaint."""
    f = step_dir / store.ARRAYS_FILE
    data = bytearray(f.read_bytes())
    data[len(data) - 100] ^= 0x10
    f.write_bytes(bytes(data))


def garble_meta(step_dir: Path) -> None:
    (step_dir / store.META_FILE).write_text("{this is not json")


def remove_arrays(step_dir: Path) -> None:
    (step_dir / store.ARRAYS_FILE).unlink()


CORRUPTIONS = {"truncated": (truncate, "bytes where", "cut short"),
               "bit flip": (flip_a_bit, "does not match the SHA-256", "corrupted"),
               "garbled meta": (garble_meta, "meta.json is not valid JSON", "garbled"),
               "missing arrays": (remove_arrays, "arrays.safetensors is missing", "")}


@pytest.mark.parametrize("corruption", CORRUPTIONS)
def test_a_damaged_checkpoint_is_detected_set_aside_and_the_previous_one_restored(corruption, tmp_path):
    damage, *words = CORRUPTIONS[corruption]
    ckpts = filled(tmp_path / "ckpt", [1, 2, 3])
    damage(ckpts.path(3))
    assert_one_line_naming(pytest.raises(UnreadableCheckpoint, ckpts.read).value,
                           f"checkpoint 3 in {ckpts.directory} is unreadable: ", *words)
    reports: list[str] = []
    step, arrays, meta = ckpts.restore_latest_good(report=reports.append)
    assert step == 2 and meta == {"epoch": 2} and np.array_equal(arrays["w"], small_arrays(2)["w"])
    aside = tmp_path / "ckpt.unreadable" / "epoch_0003"
    assert ckpts.steps == [1, 2] and aside.is_dir()
    assert len(reports) == 1
    assert_one_line_naming(reports[0], f"checkpoint 3 in {ckpts.directory} is unreadable (", *words,
                           f"moved it to {aside}; trying checkpoint 2")
    # the run saves step 3 again; damaged again, it goes aside next to the first, which is kept
    ckpts.save(3, small_arrays(3), {"epoch": 3})
    damage(ckpts.path(3))
    assert ckpts.restore_latest_good()[0] == 2
    assert sorted(os.listdir(aside.parent)) == ["epoch_0003", "epoch_0003-1"]


def test_no_readable_checkpoint_lists_each_problem(tmp_path):
    ckpts = filled(tmp_path / "ckpt", [1, 2])
    truncate(ckpts.path(2))
    garble_meta(ckpts.path(1))
    reports: list[str] = []
    with pytest.raises(CheckpointError) as info:
        ckpts.restore_latest_good(report=reports.append)
    lines = str(info.value).splitlines()
    assert lines[0].startswith(f"no checkpoint in {ckpts.directory} can be resumed from")
    assert lines[1].startswith("  checkpoint 2: arrays.safetensors has ") and "cut short" in lines[1]
    assert lines[2].startswith("  checkpoint 1: meta.json is not valid JSON")
    assert "--overwrite" in lines[3] and "backup" in lines[3]
    assert len(reports) == 2 and reports[1].endswith("no older checkpoint is left")
    assert ckpts.steps == [] and sorted(os.listdir(tmp_path / "ckpt.unreadable")) == ["epoch_0001", "epoch_0002"]
    with pytest.raises(CheckpointError, match="there is no checkpoint in .* start without --resume"):
        ckpts.restore_latest_good()


def test_a_refusal_by_check_meta_propagates_and_moves_nothing(tmp_path):
    ckpts = filled(tmp_path / "ckpt", [1, 2])

    class OtherRun(CheckpointError):
        pass

    def check(meta):
        raise OtherRun(f"made by another run (epoch {meta['epoch']})")

    with pytest.raises(OtherRun, match="epoch 2"):
        ckpts.restore_latest_good(check_meta=check)
    assert ckpts.steps == [1, 2] and not (tmp_path / "ckpt.unreadable").exists()
    seen = []
    assert ckpts.restore_latest_good(check_meta=seen.append)[0] == 2 and seen == [{"epoch": 2}]


# ---------------------------------------------------------------------------------------------- removal
def test_remove_all_removes_only_this_stores_checkpoints(tmp_path):
    ckpts = filled(tmp_path / "ckpt", [0, 1, 2])
    garble_meta(ckpts.path(1))  # damaged, still recognised by its arrays file's header
    root = ckpts.directory
    (root / "notes.txt").write_text("keep me")
    (root / "best").mkdir()
    (root / "best" / "model.pt").write_bytes(b"torch")
    (root / "5").mkdir()
    (root / "5" / "model.bin").write_bytes(b"orbax?")
    (root / "epoch_0009").mkdir()  # the name, not the marker
    (root / "epoch_0009" / store.META_FILE).write_text('{"format": "someone else"}')
    (root / "epoch_7").mkdir()
    (root / ".epoch_0003.tmp-1-ab").mkdir()  # a stale temporary of this store
    (root / "linked").symlink_to(root / "best")
    removed = ckpts.remove_all()
    assert sorted(p.name for p in removed) == [".epoch_0003.tmp-1-ab", "epoch_0000", "epoch_0001", "epoch_0002"]
    assert sorted(os.listdir(root)) == ["5", "best", "epoch_0009", "epoch_7", "linked", "notes.txt"]
    assert (root / "notes.txt").read_text() == "keep me" and (root / "best" / "model.pt").read_bytes() == b"torch"
    assert (root / "5" / "model.bin").read_bytes() == b"orbax?"
    assert CheckpointStore(tmp_path / "absent").remove_all() == []

    link = tmp_path / "link"
    link.symlink_to(root)
    with pytest.raises(CheckpointError, match="is a symbolic link"):
        CheckpointStore(link).remove_all()
    assert sorted(os.listdir(root)) == ["5", "best", "epoch_0009", "epoch_7", "linked", "notes.txt"]


# ---------------------------------------------------------------------------------------------- full disk
FULL_DISK = """
import json, os, resource, sys
import numpy as np
from flax_resnet.store import CheckpointError, CheckpointStore

directory, how = sys.argv[1], sys.argv[2]
ckpts = CheckpointStore(directory)
ckpts.save(1, {"w": np.ones((1000,), np.float32)}, {"epoch": 1})
big = {"w": np.ones((1 << 18,), np.float32)}  # 1 MiB
if how == "fill":  # leave 64 KiB free on the tmpfs
    with open(sys.argv[3], "wb") as f:
        try:
            while True:
                f.write(b"\\0" * 65536)
                f.flush()
        except OSError:
            pass
    os.truncate(sys.argv[3], os.path.getsize(sys.argv[3]) - 65536)
else:  # any write past 64 KiB fails with EFBIG (CPython ignores SIGXFSZ)
    resource.setrlimit(resource.RLIMIT_FSIZE, (65536, resource.RLIM_INFINITY))
try:
    ckpts.save(2, big, {"epoch": 2})
except CheckpointError as e:
    print(json.dumps({"error": str(e), "chained": type(e.__cause__).__name__}))
"""


def can_mount() -> bool:
    return os.geteuid() == 0 and shutil.which("mount") is not None


@pytest.mark.parametrize("how", ["full tmpfs", "file size limit"])
def test_a_full_disk_fails_one_clean_error_and_loses_nothing(how, tmp_path):
    """Real ENOSPC from a 4 MiB tmpfs filled up (root), or real EFBIG from RLIMIT_FSIZE (any user), in a child
    process: one CheckpointError in the OS's words naming the fix, the temporary directory gone at once, the
    earlier checkpoint readable, and the child's stderr exactly empty (nothing printed, then or later)."""
    if how == "full tmpfs":
        disk = tmp_path / "disk"
        disk.mkdir()
        if not can_mount() or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)],
                                             capture_output=True).returncode != 0:
            pytest.skip("cannot mount a tmpfs here (needs root); the file size limit variant covers this")
        args, word = [str(disk / "ckpt"), "fill", str(disk / "ballast")], "No space left on device"
    else:
        disk = None
        args, word = [str(tmp_path / "ckpt"), "fsize"], "File too large"
    try:
        proc = subprocess.run([sys.executable, "-c", FULL_DISK, *args], cwd=REPO, capture_output=True, text=True,
                              timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
        assert proc.returncode == 0 and proc.stderr == "", proc.stderr[-3000:]
        result = json.loads(proc.stdout)
        directory = Path(args[0]).absolute()
        assert_one_line_naming(result["error"], f"could not write checkpoint 2 to {directory} ({word})",
                               "steps: 1", "--out", "--resume")
        assert "free some space" in result["error"].lower() and "partial files" not in result["error"]
        assert result["chained"] == "OSError"
        assert sorted(os.listdir(directory)) == ["epoch_0001"]
        arrays, meta = CheckpointStore(directory).read()
        assert meta == {"epoch": 1} and np.array_equal(arrays["w"], np.ones((1000,), np.float32))
        if disk is not None:  # with room again, the same save succeeds
            (disk / "ballast").unlink()
            CheckpointStore(directory).save(2, {"w": np.ones((1 << 18,), np.float32)}, {"epoch": 2})
            assert CheckpointStore(directory).steps == [1, 2]
    finally:
        if disk is not None:
            subprocess.run(["umount", "-l", str(disk)], check=False)


# ----------------------------------------------------------------------------------------- no side effects
SIDE_EFFECTS = """
import asyncio, logging, sys, warnings
import numpy, safetensors.numpy, jax, flax.nnx, flax_resnet.errors  # the dependencies may do what they do

def snapshot():
    loggers = {name: (list(logging.getLogger(name).filters), list(logging.getLogger(name).handlers),
                      logging.getLogger(name).level, logging.getLogger(name).propagate)
               for name in ("asyncio", "absl", "")}
    return loggers, sys.unraisablehook, sys.excepthook, list(warnings.filters), dict(sys.modules).keys() - {""}

before = snapshot()
import flax_resnet.store, flax_resnet._codecs, flax_resnet.weights
after = snapshot()
assert before[:4] == after[:4], (before[:4], after[:4])
new = sorted(m for m in after[4] - before[4] if not m.startswith("flax_resnet."))
assert not any(m.split(".")[0] in ("torch", "orbax", "tensorstore", "absl") for m in new), new
print("unchanged")
"""


def test_importing_the_store_codecs_and_weights_changes_nothing_global():
    """Logging filters, handlers and levels of 'asyncio', 'absl' and the root logger, sys.unraisablehook,
    sys.excepthook and the warning filters are as they were; neither torch nor orbax is imported."""
    proc = subprocess.run([sys.executable, "-c", SIDE_EFFECTS], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0 and proc.stdout.strip() == "unchanged" and proc.stderr == "", proc.stderr[-3000:]


def test_the_store_imports_no_framework():
    """store.py: the standard library, NumPy, safetensors and the project's error class, nothing else."""
    tree = ast.parse((REPO / "flax_resnet" / "store.py").read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module}
    third_party = imported - set(sys.stdlib_module_names) - {"__future__"}
    assert third_party == {"numpy", "safetensors", "flax_resnet", "ml_dtypes"}, third_party
    assert "import ml_dtypes" in textwrap.dedent(ast.get_source_segment(
        (REPO / "flax_resnet" / "store.py").read_text(),
        next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "_dtype_named")))
