"""The training loop (both frameworks): it learns, reports the notebooks' metrics, checkpoints every epoch and
resumes exactly; the Flax runner does no host work per step; both frameworks see the same uint8 batches."""

from __future__ import annotations

import cProfile
import dataclasses
import json
import math
import pstats

import jax
import numpy as np
import pytest
from flax import nnx

from flax_resnet import _codecs, builders, plots, training
from flax_resnet.config import ModelConfig, OutputConfig, RunConfig
from flax_resnet.data import plan
from flax_resnet.store import CheckpointStore
from flax_resnet.training import engine
from flax_resnet.training.flax_backend import epoch_result
from flax_resnet.training.runners import SingleDeviceRunner


def fit(model, config, dataset, *, out_dir=None, resume=False, overwrite=False, max_to_keep=3, **kw):
    """``training.train`` with ``model`` and ``dataset`` given and the outputs in ``config.output``."""
    output = OutputConfig(out_dir, resume=resume, overwrite=overwrite, max_to_keep=max_to_keep)
    return training.train(config.replace(output=output), model=model, dataset=dataset, **kw)


TINY_MODEL = ("SimpleResNet", {"n_blocks": 1})


def tiny_model(seed: int = 0):
    return builders.build_flax(*TINY_MODEL, seed=seed)




def leaves(tree) -> list[np.ndarray]:
    """Every leaf as numpy (PRNG keys as their raw data), in tree order: what a checkpoint holds."""
    return list(_codecs.flax_to_arrays(tree).values())


def config(recipe, seed: int = 0, framework: str = "jax", **kw) -> RunConfig:
    return RunConfig(recipe=recipe, model=ModelConfig(*TINY_MODEL), framework=framework, seed=seed,
                     **kw)


class Crash(Exception):
    """Stands for whatever stops a run (Ctrl-C, a killed job): raised from inside the loop."""


class FakeBar:
    """Records what the loop tells a tqdm bar."""

    def __init__(self, total: int, desc: str):
        self.total, self.desc, self.n, self.postfix, self.closed = total, desc, 0, "", False

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self.postfix = s

    def close(self) -> None:
        self.closed = True


def test_learns_well_above_chance(small_dataset, make_recipe):
    """SimpleResNet(1), notebook 000's recipe cut to 3 epochs (lr / 10 for the last), 384 synthetic images.

    Measured: final test accuracy 93-99% over seeds 0-3 (chance is 10%); the bound leaves a wide margin.
    """
    recipe = make_recipe("plain-vs-residual", epochs=3, batch_size=32, eval_batch_size=128, milestones=(2,))
    result = fit(tiny_model(seed=0), config(recipe), small_dataset)
    history = result.history
    assert history["test_acc"][-1] > 60.0, history
    assert history["train_acc"][-1] > 60.0, history
    assert history["train_loss"][-1] < history["train_loss"][0] < 2.5, history


# --------------------------------------------------------------------- one run, interrupted and resumed
EPOCHS, STEPS = 3, 4  # 64 images in batches of 16


def test_a_run_writes_its_outputs_and_resumes_exactly(tmp_path, tiny_dataset, make_recipe):
    """Notebook 004's recipe (cosine, crop + flip) for 3 epochs, once straight through and once interrupted in
    the middle of epoch 2 (an exception from inside the loop), then resumed with ``resume=True``.

    One test rather than several sharing a module fixture: pytest-xdist would run such a fixture once per
    worker, and the three runs are most of this file's time.
    """
    recipe = make_recipe("resnet18-cifar", epochs=EPOCHS)
    bars: list[FakeBar] = []
    lines: list[str] = []

    def progress(total: int, desc: str) -> FakeBar:
        bars.append(FakeBar(total, desc))
        return bars[-1]

    straight = fit(tiny_model(), config(recipe, 7), tiny_dataset, out_dir=tmp_path / "straight",
                              max_to_keep=2, progress=progress, log=lines.append)
    check_history(straight.history, tmp_path / "straight")
    check_progress_and_log(bars, lines)
    check_checkpoints(tmp_path / "straight", straight.history)
    png = (tmp_path / "straight" / training.PLOT_FILE).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000

    # an output directory with checkpoints is neither overwritten silently nor resumed with other settings
    with pytest.raises(training.TrainError, match="--resume"):
        fit(tiny_model(), config(recipe, 7), tiny_dataset, out_dir=tmp_path / "straight")
    with pytest.raises(training.TrainError, match="seed: the checkpoint's run has 7, this one 8"):
        fit(tiny_model(), config(recipe, 8), tiny_dataset, out_dir=tmp_path / "straight", resume=True)

    def interrupt(step: int, loss) -> None:
        if step == STEPS + 1:  # the second step of epoch 2
            raise Crash

    with pytest.raises(Crash):
        fit(tiny_model(), config(recipe, 7), tiny_dataset, out_dir=tmp_path / "resumed", max_to_keep=2,
                       on_step=interrupt)
    assert CheckpointStore(tmp_path / "resumed" / "checkpoints").steps == [1]  # saved before the interruption

    # The resumed run gets a runner instance rather than the default factory (both must work), and a model
    # initialised differently: the checkpoint must replace all of it.
    model = tiny_model(seed=123)
    tx = engine.make_optimizer(recipe, STEPS)
    graphdef, _ = engine.init_train_state(tiny_model(), tx)
    resumed_lines: list[str] = []
    resumed = fit(model, config(recipe, 7), tiny_dataset, out_dir=tmp_path / "resumed", max_to_keep=2,
                             resume=True, runner=SingleDeviceRunner(graphdef, tx, recipe), log=resumed_lines.append)
    assert resumed_lines[0].startswith("resuming from") and len(resumed_lines) == 1 + 2

    # bit for bit what the uninterrupted run ended with: parameters, BatchNorm statistics, optimiser state
    a, b = leaves(straight.state), leaves(resumed.state)
    assert len(a) == len(b) > 0
    for x, y in zip(a, b, strict=True):
        assert x.dtype == y.dtype and np.array_equal(x, y)
    assert int(resumed.state.step) == EPOCHS * STEPS
    for key in ("train_loss", "train_acc", "test_loss", "test_acc", "lr"):
        assert resumed.history[key] == straight.history[key], key
    # the model object passed in ends up holding the trained variables
    assert resumed.model is model
    _, params, model_state = nnx.split(model, nnx.Param, ...)
    for x, y in zip(leaves((params, model_state)), leaves((resumed.state.params, resumed.state.model_state)),
                    strict=True):
        assert np.array_equal(x, y)


def check_history(history: dict, out_dir) -> None:
    """The notebooks' keys plus time, throughput and lr; one value per epoch; sane values; on disk too."""
    assert tuple(history) == training.HISTORY_KEYS
    assert all(len(values) == EPOCHS for values in history.values())
    for key in ("train_acc", "test_acc"):
        assert all(0.0 <= v <= 100.0 for v in history[key])
    for key in ("train_loss", "test_loss", "epoch_time", "images_per_sec"):
        assert all(math.isfinite(v) and v > 0 for v in history[key]), key
    # torch's CosineAnnealingLR(T_max=3) per epoch: 0.1, 0.075, 0.025
    np.testing.assert_allclose(history["lr"], [0.1, 0.075, 0.025], rtol=1e-6)
    assert json.loads((out_dir / training.HISTORY_FILE).read_text()) == history


def check_progress_and_log(bars: list[FakeBar], lines: list[str]) -> None:
    """One bar per epoch, advanced once per step; one notebook-style line per epoch."""
    assert [b.desc for b in bars] == [f"epoch {e}/{EPOCHS}" for e in range(1, EPOCHS + 1)]
    assert all(b.n == b.total == STEPS and b.closed and "test acc" in b.postfix for b in bars)
    assert len(lines) == EPOCHS and lines[0].startswith("Epoch 1/3: Train Loss:")


def check_checkpoints(out_dir, history: dict) -> None:
    """A checkpoint per epoch, only the last ``max_to_keep`` kept, each with the run's metadata."""
    ckpts = CheckpointStore(out_dir / "checkpoints")
    assert ckpts.steps == [2, 3]  # max_to_keep=2
    meta = ckpts.read_meta()
    assert meta["epoch"] == EPOCHS and meta["model"] == "SimpleResNet" and meta["seed"] == 7
    assert meta["history"] == history
    assert meta["recipe"]["name"] == "resnet18-cifar" and meta["dtype"] == "float32"


# --------------------------------------------------------------------------------------- definitions
def test_loss_definitions_follow_each_notebook(make_recipe):
    """Two batches (8 and 2 samples, mean losses 1.0 and 2.0): notebook 000 averages over samples,
    notebook 004 over batches; the torch backend runs each notebook's own epoch function."""
    from flax_resnet.training.torch_backend import TorchBackend
    from torch_ref import train as notebook

    sums = {"loss_x_count": 8 * 1.0 + 2 * 2.0, "loss_of_batches": 3.0, "correct": 5, "count": 10, "batches": 2,
            "first_nonfinite": engine.NO_STEP}
    samples = epoch_result(make_recipe("plain-vs-residual"), sums, 0)
    batches = epoch_result(make_recipe("resnet18-cifar"), sums, 0)
    assert samples.loss == pytest.approx(1.2) and batches.loss == pytest.approx(1.5)
    for result in (samples, batches):
        assert result.accuracy == 50.0 and result.count == 10 and result.first_nonfinite is None
    assert epoch_result(make_recipe(), {**sums, "first_nonfinite": 7}, 4).first_nonfinite == 3
    torch_model = builders.build_torch(*TINY_MODEL, seed=0)
    for name, epoch_fn in (("plain-vs-residual", notebook.train_one_epoch), ("resnet18-cifar", notebook.train_epoch)):
        backend = TorchBackend(torch_model, config(make_recipe(name), framework="torch"))
        assert backend.one_epoch is epoch_fn


def test_notebook_000_figure_and_comparison(tmp_path):
    history = {"train_loss": [2.0, 1.0], "train_acc": [30.0, 60.0], "test_loss": [2.1, 1.1], "test_acc": [25.0, 55.0]}
    single = plots.plot_history(history, tmp_path / "one.png", test_loss=False, title="SimpleResNet")
    both = plots.plot_comparison({"Plain CNN": history, "ResNet": history}, tmp_path / "cmp.png")
    for path in (single, both):
        assert path.read_bytes()[:4] == b"\x89PNG" and path.stat().st_size > 10_000


def test_torch_reference_run_resumes_exactly(tmp_path, tiny_dataset, make_recipe):
    """``--framework torch`` runs through the same loop: checkpoints (model, optimiser, scheduler) in the same
    store, and an exact resume."""
    import torch

    recipe = make_recipe("plain-vs-residual", epochs=2, milestones=(1,))
    straight_model = builders.build_torch(*TINY_MODEL, seed=0)
    straight = fit(straight_model, config(recipe, 5, "torch"), tiny_dataset, out_dir=tmp_path / "a").history

    def interrupt(step: int, loss) -> None:
        raise Crash

    first = fit(builders.build_torch(*TINY_MODEL, seed=0), config(dataclasses.replace(recipe, epochs=1), 5,
                           "torch"), tiny_dataset, out_dir=tmp_path / "b").history
    assert first["train_loss"] == straight["train_loss"][:1]
    with pytest.raises(Crash):  # a second process that dies in its first step
        fit(builders.build_torch(*TINY_MODEL, seed=0), config(recipe, 5, "torch"), tiny_dataset,
                       out_dir=tmp_path / "b", resume=True, on_step=interrupt)
    resumed_model = builders.build_torch(*TINY_MODEL, seed=9)
    resumed = fit(resumed_model, config(recipe, 5, "torch"), tiny_dataset, out_dir=tmp_path / "b",
                             resume=True).history
    for key in ("train_loss", "train_acc", "test_loss", "test_acc", "lr"):
        assert resumed[key] == straight[key], key
    expected = straight_model.state_dict()
    for key, value in resumed_model.state_dict().items():
        assert torch.equal(value, expected[key]), key
    assert CheckpointStore(tmp_path / "b" / "checkpoints").steps == [1, 2]
    assert (tmp_path / "b" / training.PLOT_FILE).is_file()


def test_runner_steps_do_no_host_work(tiny_dataset, make_recipe):
    """The hot path's promise: a step neither reads a device array back to the host (a per-step sync) nor walks
    NNX objects (the state travels as a flat list of arrays, rebuilt as a ``TrainState`` only inside the traced
    step), and ``get_state`` restores the ``TrainState`` exactly. Checked from the Python calls a profiler sees
    during three warm steps (``jax.transfer_guard`` cannot: on the CPU backend it does not guard reads)."""
    recipe = make_recipe("plain-vs-residual", batch_size=16)
    tx = engine.make_optimizer(recipe, steps_per_epoch=4)
    graphdef, state = engine.init_train_state(tiny_model(), tx)
    runner = SingleDeviceRunner(graphdef, tx, recipe)
    held = runner.put_state(state)
    assert isinstance(held, list) and all(isinstance(x, jax.Array) for x in held)
    assert jax.tree.structure(runner.get_state(held)) == jax.tree.structure(state)
    data = runner.put_data(tiny_dataset.train_images, tiny_dataset.train_labels)
    device_plan = runner.put_plan(plan.epoch_plan(0, 0, len(tiny_dataset.train_labels)))
    held, metrics = runner.train_step(held, runner.zero_metrics(), data, device_plan, 0, 16)  # compiles

    profiler = cProfile.Profile()
    with profiler:
        for start in (16, 32, 48):
            held, metrics = runner.train_step(held, metrics, data, device_plan, start, 16)
    called = [(file, name) for file, _, name in pstats.Stats(profiler).stats]  # type: ignore[attr-defined]
    host_reads = [c for c in called if c[1] in {"__float__", "__int__", "__array__", "_value", "item", "tolist",
                                                "device_get", "block_until_ready"}]
    nnx_calls = [c for c in called if "flax/nnx" in c[0].replace("\\", "/")]
    assert not host_reads and not nnx_calls, (host_reads, nnx_calls)
    assert int(runner.get_state(held).step) == 4
    assert float(metrics.count) == 64


# ------------------------------------------------------------------------------------- the batch stream
@pytest.mark.parametrize("augment", [True, False])
def test_both_frameworks_see_bit_identical_uint8_batches(tiny_dataset, make_recipe, augment):
    """The plan is NumPy data from (seed, epoch); the Flax runner gathers and augments on the device, torch_ref in
    torch: every uint8 batch of two epochs (the last one short) must be equal, byte for byte."""
    import torch

    from flax_resnet.training.runners import DeviceData, gather_uint8
    from torch_ref.data import PlannedBatches

    recipe = make_recipe("resnet18-cifar", batch_size=24, augment=augment)
    images, labels = tiny_dataset.train_images, tiny_dataset.train_labels
    loader = PlannedBatches(images, labels, recipe.batch_size, recipe.mean, recipe.std)
    data = DeviceData(jax.numpy.asarray(images), jax.numpy.asarray(labels))
    flips_seen = 0
    for epoch in range(2):
        p = plan.epoch_plan(3, epoch, len(labels))
        loader.set_plan(p.permutation, *((p.offsets, p.flips) if augment else ()))
        device_plan = jax.device_put(p)
        for step in range(len(loader)):
            start, stop = plan.batch_bounds(step, len(labels), recipe.batch_size)
            x_jax, y_jax = gather_uint8(data, device_plan, start, stop - start, augment)
            x_torch, y_torch = loader.uint8_batch(step)
            assert x_torch.dtype == torch.uint8 and np.asarray(x_jax).dtype == np.uint8
            np.testing.assert_array_equal(np.asarray(x_jax), x_torch.numpy())
            np.testing.assert_array_equal(np.asarray(y_jax), y_torch.numpy())
            flips_seen += int(p.flips[start:stop].sum())
    assert len(loader) == 3  # 64 = 24 + 24 + 16: the short last batch is kept
    assert flips_seen > 0  # the augmentation was exercised


def test_epoch_plan_is_numpy_and_depends_on_seed_and_epoch_only():
    a, b = plan.epoch_plan(1, 2, 100), plan.epoch_plan(1, 2, 100)
    assert all(isinstance(x, np.ndarray) for x in a)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert sorted(a.permutation.tolist()) == list(range(100))
    assert a.offsets.min() >= 0 and a.offsets.max() <= 2 * plan.CROP_PADDING
    assert not np.array_equal(a.permutation, plan.epoch_plan(1, 3, 100).permutation)
    # every bit of the seed counts (a 32-bit truncation would make 2**32 the same as 0)
    assert not np.array_equal(plan.epoch_plan(0, 0, 100).permutation, plan.epoch_plan(2**32, 0, 100).permutation)
    with pytest.raises(ValueError, match="seed"):
        plan.epoch_plan(-1, 0, 10)


def test_train_front_door_offers_every_option_of_the_loop():
    """``training.train`` spells out ``loop.run``'s options (a notebook's help shows them), so one added to the loop
    must be added to the front door too, with the same default."""
    import inspect

    from flax_resnet.training import loop

    front = inspect.signature(training.train).parameters
    for name, param in inspect.signature(loop.run).parameters.items():
        if param.kind is inspect.Parameter.KEYWORD_ONLY:
            assert name in front and front[name].default == param.default, name
    with pytest.raises(TypeError, match="out_dri"):
        training.train(None, out_dri="x")  # a misspelt option fails at the call, before any work
