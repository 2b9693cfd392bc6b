"""Runs the parallel runners in a fresh process for tests/test_parallel.py and saves what they computed as .npz.

The parent sets ``XLA_FLAGS=--xla_force_host_platform_device_count=N`` in this process's environment (it must be
set before jax is imported), so one CPU shows up as N devices. Modes:

- ``compare``: 5 steps (the last one short) and an eval pass with every runner on all devices, plus, for
  ``bn_sync=False``, a reference computed by hand on one device from each device's share of the batch.
- ``multihost``: the same training through ``jax.distributed.initialize`` (one process of several).
- ``unreachable``: ``flax_resnet.training.distributed.initialize`` against a coordinator nobody runs; prints the error.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flax_resnet.data import plan as plan_lib  # noqa: E402

# 5 steps of 32; eval batches of 20 do not divide by 8 devices: the runners pad them
NUM_TRAIN, NUM_TEST, BATCH, EVAL_BATCH, IMAGE = 160, 40, 32, 20, 8


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["compare", "multihost", "unreachable"])
    p.add_argument("--out", type=Path)
    p.add_argument("--dtype", default="float64", choices=["float32", "float64"])
    p.add_argument("--runs", default="single,shard_map,pmap,shard_map-off,pmap-off,reference-off")
    p.add_argument("--coordinator")
    p.add_argument("--num-processes", type=int)
    p.add_argument("--process-id", type=int)
    p.add_argument("--timeout", type=float, default=60)
    p.add_argument("--checkpoint", type=Path, help="multihost: checkpoint get_state here, restore, compare")
    return p.parse_args(argv)


def flat(prefix: str, tree) -> dict:
    import jax
    import numpy as np

    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if jax.numpy.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            leaf = jax.random.key_data(leaf)
        out[prefix + jax.tree_util.keystr(path)] = np.asarray(leaf)
    return out


def setup(dtype_name: str):
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from flax_resnet import cast_floating
    from flax_resnet.models import SimpleResNet
    from flax_resnet.recipes import Recipe
    from flax_resnet.training import engine

    if dtype_name == "float64":
        jax.config.update("jax_enable_x64", True)
    dtype = jnp.dtype(dtype_name)
    recipe = Recipe(name="tiny", model="SimpleResNet", epochs=2, batch_size=BATCH, eval_batch_size=EVAL_BATCH,
                    lr=0.1, momentum=0.9, weight_decay=5e-4, schedule="cosine", augment=True)
    rng = np.random.default_rng(0)
    data = {split: (rng.integers(0, 256, (n, IMAGE, IMAGE, 3), dtype=np.uint8), rng.integers(0, 10, n).astype(np.int32))
            for split, n in (("train", NUM_TRAIN), ("test", NUM_TEST))}
    model = nnx.jit(lambda: cast_floating(SimpleResNet(1, rngs=nnx.Rngs(0)), dtype))()  # one compile, not 100
    tx = engine.make_optimizer(recipe, plan_lib.steps_per_epoch(NUM_TRAIN, BATCH))
    graphdef, state = engine.init_train_state(model, tx)
    state = jax.device_get(state)  # host copies: every run puts (and donates) its own
    plan = plan_lib.epoch_plan(1, 0, NUM_TRAIN)  # NumPy; each runner puts it on its devices (put_plan)
    return recipe, data, graphdef, state, tx, plan, dtype


def train_and_eval(runner, recipe, data, state, plan, dtype, prefix: str) -> dict:
    """5 steps then one eval pass; returns the state, the running metric sums after each step, eval metrics."""
    import jax
    import numpy as np

    train, test = runner.put_data(*data["train"]), runner.put_data(*data["test"])
    state = runner.put_state(state)
    plan = runner.put_plan(plan)
    metrics, sums = runner.zero_metrics(), []
    for step in range(plan_lib.steps_per_epoch(NUM_TRAIN, BATCH)):
        start, stop = plan_lib.batch_bounds(step, NUM_TRAIN, BATCH)
        state, metrics = runner.train_step(state, metrics, train, plan, start, stop - start)
        sums.append(np.array([float(x) for x in jax.device_get(metrics)]))
    evals = runner.zero_metrics()
    for start in range(0, NUM_TEST, EVAL_BATCH):
        evals = runner.eval_step(state, evals, test, start, EVAL_BATCH)
    out = flat(prefix + "/state", runner.get_state(state))
    out[prefix + "/train_sums"] = np.stack(sums)
    out[prefix + "/eval_sums"] = np.array([float(x) for x in jax.device_get(evals)])
    try:  # a batch that does not split across the devices must fail before it runs
        runner.train_step(state, runner.zero_metrics(), train, plan, 0, runner.num_devices + 1)
    except ValueError as e:
        out[prefix + "/odd_batch_error"] = np.array(str(e))
    return out


def reference_bn_off(recipe, data, graphdef, state, tx, plan, dtype, num_devices: int) -> dict:
    """bn_sync=False by hand on one device: each device's share separately, gradients and losses averaged,
    the BatchNorm running statistics of device 0's share kept (DDP's broadcast_buffers rule)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from flax import nnx

    from flax_resnet.training import engine
    from flax_resnet.training.runners import DeviceData, gather_batch

    train = DeviceData(*(jnp.asarray(a) for a in data["train"]))

    @functools.partial(jax.jit, static_argnames="size")
    def shard_grads(state, start, size):
        x, y = gather_batch(train, plan, start, size, recipe, dtype)
        model = nnx.merge(graphdef, state.params, state.model_state)
        model.train()

        def loss_fn(model):
            logits = model(x)
            return engine.cross_entropy(logits, y), logits

        (loss, logits), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
        correct = jnp.sum(jnp.argmax(logits, -1) == y)
        return loss, correct, grads, nnx.state(model, nnx.Not(nnx.Param))

    sums, total = [], np.zeros(5)
    for step in range(plan_lib.steps_per_epoch(NUM_TRAIN, BATCH)):
        start, stop = plan_lib.batch_bounds(step, NUM_TRAIN, BATCH)
        local = (stop - start) // num_devices
        results = [shard_grads(state, start + d * local, size=local) for d in range(num_devices)]
        grads = jax.tree.map(lambda *g: sum(g) / num_devices, *(r[2] for r in results))
        loss = sum(float(r[0]) for r in results) / num_devices
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        state = engine.TrainState(optax.apply_updates(state.params, updates), results[0][3], opt_state,
                                  state.step + 1)
        total += [loss * (stop - start), loss, sum(int(r[1]) for r in results), stop - start, 1]
        sums.append(np.append(total, engine.NO_STEP))  # every loss finite: no first non-finite step (Metrics)
    out = flat("reference-off/state", state)
    out["reference-off/train_sums"] = np.stack(sums)
    return out


def hlo_facts(runner, data, state, plan) -> dict:
    """What the compiler made of the jit runner's training step (read from its compiled HLO): how many
    all-reduces and all-gathers it has, and the batch dimension of every gather from the uint8 training images."""
    import re

    import numpy as np

    train = runner.put_data(*data["train"])
    held, device_plan = runner.put_state(state), runner.put_plan(plan)
    text = runner.lower_train_step(held, runner.zero_metrics(), train, device_plan, 0, BATCH).compile().as_text()
    image = f",{IMAGE},{IMAGE},3]"
    gathers = [int(m.group(1)) for m in re.finditer(r"= u8\[(\d+)(,\d+)*\]\S* gather\(", text)
               if image in m.group(0)]
    return {"jit/hlo_all_reduces": np.array(len(re.findall(r" all-reduce(-start)?\(", text))),
            "jit/hlo_all_gathers": np.array(len(re.findall(r" all-gather(-start)?\(", text))),
            "jit/hlo_image_gathers": np.array(gathers)}


def compare(args) -> None:
    import jax
    import numpy as np

    from flax_resnet.training import parallel

    recipe, data, graphdef, state, tx, plan, dtype = setup(args.dtype)
    out = {"num_devices": np.array(jax.device_count())}
    for name, bn_sync in (("auto_runner", True), ("auto_runner_off", False)):
        runner = parallel.make_runner("auto", graphdef, tx, recipe, dtype=dtype, bn_sync=bn_sync)
        out[name] = np.array(type(runner).__name__)
    for run in args.runs.split(","):
        t0 = time.perf_counter()
        if run == "reference-off":
            out.update(reference_bn_off(recipe, data, graphdef, state, tx, plan, dtype, jax.device_count()))
        else:
            kind, _, off = run.partition("-")
            runner = parallel.make_runner(kind, graphdef, tx, recipe, dtype=dtype, bn_sync=not off)
            out.update(train_and_eval(runner, recipe, data, state, plan, dtype, run))
            if kind == "jit":
                out.update(hlo_facts(runner, data, state, plan))
        print(f"{run}: {time.perf_counter() - t0:.1f} s", flush=True)
    np.savez(args.out, **out)


def multihost(args) -> None:
    from flax_resnet.training import distributed

    distributed.initialize(args.coordinator, args.num_processes, args.process_id, timeout_s=args.timeout)
    import jax
    import numpy as np

    from flax_resnet.training import parallel

    recipe, data, graphdef, state, tx, plan, dtype = setup(args.dtype)
    out = {"num_devices": np.array(jax.device_count()), "local_devices": np.array(jax.local_device_count()),
           "is_main": np.array(distributed.is_main_process())}
    for kind in args.runs.split(","):
        runner = parallel.make_runner(kind, graphdef, tx, recipe, dtype=dtype)
        out.update(train_and_eval(runner, recipe, data, state, plan, dtype, kind))
        if args.checkpoint:
            out[f"{kind}/checkpoint_error"] = checkpoint_roundtrip(runner, state, args.checkpoint / kind)
    np.savez(args.out, **out)
    distributed.shutdown()


def checkpoint_roundtrip(runner, state, directory: Path):
    """What the training loop does with a multi-process state: every process calls the one store's ``save`` (process
    0 writes, all meet at the barrier), then every process reads it back through the Flax codec into the same
    shardings and puts it on its devices; the largest difference to the saved state."""
    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    from flax_resnet import _codecs
    from flax_resnet.store import CheckpointStore
    from flax_resnet.training.engine import TrainState

    saved = runner.get_state(runner.put_state(state))
    store = CheckpointStore(directory, is_writer=jax.process_index() == 0,
                            barrier=multihost_utils.sync_global_devices)
    store.save(1, _codecs.flax_to_arrays(saved._asdict()), {"processes": jax.process_count()})
    arrays, _ = store.read(1)
    back = runner.get_state(runner.put_state(TrainState(**_codecs.flax_from_arrays(saved._asdict(), arrays))))
    return np.array(max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                        for a, b in zip(jax.tree.leaves(saved), jax.tree.leaves(back), strict=True)))


def unreachable(args) -> None:
    from flax_resnet.training import distributed

    t0 = time.perf_counter()
    try:
        distributed.initialize(args.coordinator, args.num_processes, args.process_id, timeout_s=args.timeout)
    except distributed.DistributedInitError as e:
        print(f"ERROR after {time.perf_counter() - t0:.1f} s: {e}")
        return
    print("no error raised")
    sys.exit(1)


if __name__ == "__main__":
    a = parse_args()
    try:
        {"compare": compare, "multihost": multihost, "unreachable": unreachable}[a.mode](a)
    except Exception:
        traceback.print_exc()
        sys.exit(2)
