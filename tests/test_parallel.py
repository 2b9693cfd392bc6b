"""Data-parallel and multi-host training (flax_resnet.training.parallel, .distributed) on simulated CPU devices.

The runs happen in subprocesses (tests/parallel_worker.py) with ``--xla_force_host_platform_device_count=N`` set
before jax is imported; they save what they computed as .npz and the tests compare here. Compilation is the cost,
so each subprocess serves several checks, and the ones the selected tests need start together, two at a time,
when the first of them is asked for. Every subprocess is bounded by a timeout and killed when the module ends.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from flax_resnet import builders, layers
from flax_resnet.cli import options
from flax_resnet.config import ConfigError, ParallelConfig
from flax_resnet.data import plan
from flax_resnet.training import cpu, distributed, engine, parallel

WORKER = Path(__file__).with_name("parallel_worker.py")
TIMEOUT_S = 420  # per subprocess; the runs take 20-90 s on two busy cores
NUM_TEST = 40  # as in parallel_worker
# XLA's CPU backend spends most of these tests in LLVM optimisation (model init alone: 15-20 s at the default level
# on two busy cores, 2 s without); every run of a comparison compiles with the same flags, so nothing is lost.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def free_port() -> int:
    """A local TCP port nobody listens on (bound to port 0, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------ subprocesses
class Procs:
    """The worker subprocesses of this module, so that none outlives it."""

    def __init__(self):
        self.lock, self.live = threading.Lock(), []

    def start(self, args: list[str], devices: int) -> subprocess.Popen:
        env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}",
               "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}
        p = subprocess.Popen([sys.executable, str(WORKER), *args], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
        with self.lock:
            self.live.append(p)
        return p

    def finish(self, procs: list[subprocess.Popen], timeout: float) -> list[str]:
        """Wait for ``procs`` (killing all of them at the first failure or the timeout); their outputs."""
        deadline, outputs = time.monotonic() + timeout, []
        try:
            for p in procs:
                out, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
                outputs.append(out)
                if p.returncode != 0:
                    raise AssertionError(f"worker {p.args[2:]} exited with {p.returncode}:\n{out[-4000:]}")
        except subprocess.TimeoutExpired:
            raise AssertionError(f"worker did not finish within {timeout} s") from None
        finally:
            self.kill(procs)
        return outputs

    def kill(self, procs: list[subprocess.Popen] | None = None) -> None:
        with self.lock:
            procs = list(self.live) if procs is None else procs
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def compare_job(dtype: str, runs: str, devices: int):
    def job(procs: Procs, tmp: Path) -> dict:
        out = tmp / f"compare-{dtype}-{devices}.npz"
        procs.finish([procs.start(["compare", "--dtype", dtype, "--runs", runs, "--out", str(out)], devices)],
                     TIMEOUT_S)
        return dict(np.load(out))

    return job


def multihost_job(procs: Procs, tmp: Path) -> list[dict]:
    """Two processes on 127.0.0.1 with two devices each, joined through jax.distributed.initialize."""
    coordinator = f"127.0.0.1:{free_port()}"
    started = [procs.start(["multihost", "--runs", "shard_map,pmap,jit", "--coordinator", coordinator,
                            "--num-processes", "2", "--process-id", str(i), "--timeout", "120",
                            "--checkpoint", str(tmp / "checkpoints"), "--out", str(tmp / f"multihost-{i}.npz")], 2)
               for i in range(2)]
    procs.finish(started, TIMEOUT_S)
    return [dict(np.load(tmp / f"multihost-{i}.npz")) for i in range(2)]


JOBS = {  # longest first: they start in this order, two at a time
    "compare64": compare_job("float64", "single,jit,shard_map,pmap,shard_map-off,reference-off", 8),
    "multihost": multihost_job,
    "compare32": compare_job("float32", "single,shard_map,pmap", 8),
    "four_devices": compare_job("float64", "jit,shard_map,pmap", 4),
}


@pytest.fixture(scope="module")
def jobs(request, tmp_path_factory):
    """Starts the worker runs that the selected tests of this module need; name -> Future of their results."""
    needed = {name for item in request.session.items if getattr(item, "module", None) is request.module
              for name in JOBS if name in getattr(item, "fixturenames", ())}  # notebooks are items without either
    tmp, procs = tmp_path_factory.mktemp("parallel"), Procs()
    pool = ThreadPoolExecutor(max_workers=2)
    futures: dict[str, Future] = {name: pool.submit(JOBS[name], procs, tmp) for name in JOBS if name in needed}
    try:
        yield futures
    finally:
        procs.kill()
        pool.shutdown(wait=True, cancel_futures=True)


def _result(jobs: dict[str, Future], name: str):
    return jobs[name].result(timeout=2 * TIMEOUT_S)


@pytest.fixture(scope="module")
def compare64(jobs):
    return _result(jobs, "compare64")


@pytest.fixture(scope="module")
def compare32(jobs):
    return _result(jobs, "compare32")


@pytest.fixture(scope="module")
def multihost(jobs):
    return _result(jobs, "multihost")


@pytest.fixture(scope="module")
def four_devices(jobs):
    return _result(jobs, "four_devices")


# ------------------------------------------------------------------------------------------ comparisons
def rel_error(got: np.ndarray, want: np.ndarray) -> float:
    """max |got - want| / max |want| (0 when equal), in float64."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    diff = float(np.max(np.abs(got - want), initial=0.0))
    return diff / max(float(np.max(np.abs(want), initial=0.0)), 1e-300) if diff else 0.0


def assert_runs_agree(results: dict, run: str, ref: str, tol: float, other: dict | None = None,
                      keys: str = "state,train_sums,eval_sums") -> None:
    """Every saved array of ``run`` (state leaves: parameters, BN statistics, counters, optimiser state; the
    running metric sums after each step; the eval sums) within ``tol`` of ``ref``'s, integers exactly."""
    other = results if other is None else other
    prefixes = tuple(f"{ref}/{k}" for k in keys.split(","))
    compared, worst = 0, (0.0, "")
    for key, want in results.items():
        if not key.startswith(prefixes) or want.dtype.kind not in "fiub":
            continue
        got = other[run + key[len(ref):]]
        assert got.shape == want.shape, key
        if want.dtype.kind in "iub" and key.startswith(f"{ref}/state"):
            np.testing.assert_array_equal(got, want, err_msg=key)
        worst = max(worst, (rel_error(got, want), key))
        compared += 1
    assert compared > 20, f"nothing to compare for {run} vs {ref}"
    assert worst[0] <= tol, f"{run} vs {ref}: relative error {worst[0]:.3g} > {tol:g} at {worst[1]}"


def bn_stats(results: dict, run: str) -> dict:
    return {k[len(run):]: v for k, v in results.items()
            if k.startswith(f"{run}/state.model_state") and k.endswith(("['mean'].value", "['var'].value"))}


# ------------------------------------------------------------------------------------------ tests: in process
def test_validate_batch_sizes_rule_and_suggestions():
    parallel.validate_batch_sizes(50000, 128, 8)  # 390 batches of 128, last of 80: all split by 8
    parallel.validate_batch_sizes(144, 32, 8)  # short last batch of 16 splits too
    parallel.validate_batch_sizes(50001, 7, 1)  # one device takes anything
    with pytest.raises(ValueError, match=r"batch size 100 does not split evenly across 8 devices.*96 or 104"):
        parallel.validate_batch_sizes(50000, 100, 8)
    with pytest.raises(ValueError, match=r"50000 samples do not divide by 3.*short last batch"):
        parallel.validate_batch_sizes(50000, 129, 3)
    with pytest.raises(ValueError, match="num_devices"):
        parallel.validate_batch_sizes(10, 2, 0)


def test_make_runner_rejects_unknown_kind():
    with pytest.raises(ValueError, match="unknown parallel kind 'ddp'.*shard_map"):
        parallel.make_runner("ddp", None, None, None)  # type: ignore[arg-type]


@pytest.mark.parametrize("kind,bn_sync,axis", [("shard_map", True, parallel.AXIS), ("pmap", False, None),
                                               ("jit", True, None)])
def test_the_runner_sets_the_bn_axis_once_on_its_own_graph(kind, bn_sync, axis, tiny_dataset, make_recipe,
                                                           monkeypatch):
    """The graph a data-parallel runner compiles, made by ``put_state``, names ``AXIS`` on every BatchNorm (None
    per device, and for jit, whose statistics span the sharded global batch) and keeps the CPU's conv-input
    buffers; the caller's model keeps its own. The traced steps take that graph as it is: with the set-up made to
    fail, they still trace (here on one device, in process)."""
    recipe = make_recipe("plain-vs-residual", batch_size=16)
    tx = engine.make_optimizer(recipe, steps_per_epoch=4)
    model = builders.build_flax("SimpleResNet", {"n_blocks": 1}, seed=0)
    graphdef, state = engine.init_train_state(model, tx)
    runner = parallel.make_runner(kind, graphdef, tx, recipe, bn_sync=bn_sync, devices=jax.devices("cpu")[:1])
    held = runner.put_state(state)
    built = engine.merge_model(runner.step_graphdef, state)
    norms = [m for _, m in nnx.iter_modules(built) if isinstance(m, nnx.BatchNorm)]
    assert norms and {m.axis_name for m in norms} == {axis}
    assert {type(m) for _, m in nnx.iter_modules(built) if isinstance(m, layers.Conv2d)} == {
        cpu.MaterializedInputConv2d}
    assert {m.axis_name for _, m in nnx.iter_modules(model) if isinstance(m, nnx.BatchNorm)} == {None}

    def rebuilt(*args):
        raise AssertionError("the traced step edits the model")

    monkeypatch.setattr(runner, "_set_up", rebuilt)
    data = runner.put_data(tiny_dataset.train_images, tiny_dataset.train_labels)
    device_plan = runner.put_plan(plan.epoch_plan(0, 0, len(tiny_dataset.train_labels)))
    runner.lower_train_step(held, runner.zero_metrics(), data, device_plan, 0, 4)
    runner.lower_eval_step(held, runner.zero_metrics(), data, 0, 4)


def test_jit_refuses_bn_sync_off_naming_the_paths_that_have_it():
    for make in (lambda: ParallelConfig(kind="jit", bn_sync=False),
                 lambda: parallel.make_runner("jit", None, None, None, bn_sync=False),  # type: ignore[arg-type]
                 lambda: parallel.JitRunner(None, None, None, bn_sync=False)):  # type: ignore[arg-type]
        with pytest.raises(ConfigError, match=r"--bn-sync off.*shard_map or pmap"):
            make()
    assert ParallelConfig(kind="auto", bn_sync=False).kind == "auto"  # auto picks a path that has it
    assert [parallel.auto_kind(n, sync) for n, sync in ((1, True), (1, False), (8, True), (8, False))] == [
        "single", "single", "jit", "shard_map"]


def test_parallel_arguments_parse():
    parser = options.add(argparse.ArgumentParser(), *options.PARALLEL)
    assert options.run_config(parser.parse_args([])).parallel == ParallelConfig(
        kind="auto", bn_sync=True, coordinator=None, num_processes=None, process_id=None, timeout_s=300.0)
    args = parser.parse_args("--parallel pmap --bn-sync off --coordinator 10.0.0.1:1234 --num-processes 2 "
                             "--process-id 1 --distributed-timeout 30".split())
    assert options.run_config(args).parallel == ParallelConfig("pmap", False, "10.0.0.1:1234", 2, 1, 30.0)
    with pytest.raises(SystemExit):
        parser.parse_args(["--parallel", "ddp"])


def test_distributed_flags_checked_before_jax(monkeypatch):
    for var in ("SLURM_JOB_ID", "OMPI_MCA_orte_hnp_uri", "JAX_COORDINATOR_ADDRESS"):
        monkeypatch.delenv(var, raising=False)
    assert distributed.detect_cluster() is None
    assert distributed.initialize() is False  # a plain single process: nothing to join
    assert distributed.initialize("127.0.0.1:1234", 1, 0) is False
    with pytest.raises(distributed.DistributedInitError, match="missing --num-processes, --process-id"):
        distributed.initialize("127.0.0.1:1234")
    with pytest.raises(distributed.DistributedInitError, match="HOST:PORT"):
        distributed.initialize("127.0.0.1", 2, 0)
    with pytest.raises(distributed.DistributedInitError, match=r"--process-id must be in \[0, 2\)"):
        distributed.initialize("127.0.0.1:1234", 2, 2)
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
    assert distributed.detect_cluster() == "JAX_COORDINATOR_ADDRESS"


def test_unreachable_coordinator_fails_in_bounded_time(tmp_path):
    procs, address = Procs(), f"127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    (out,) = procs.finish([procs.start(["unreachable", "--coordinator", address, "--num-processes", "2",
                                        "--process-id", "1", "--timeout", "5"], 1)], 120)
    assert time.monotonic() - t0 < 60
    assert "ERROR after" in out and address in out and "within 5 s" in out and "process 0" in out, out


# ------------------------------------------------------------------------------------------ tests: 8 devices
@pytest.mark.parametrize("run", ["jit", "shard_map", "pmap"])
def test_matches_single_device_float64(compare64, run):
    assert int(compare64["num_devices"]) == 8
    assert_runs_agree(compare64, run, "single", 1e-10)


@pytest.mark.parametrize("run", ["shard_map", "pmap"])
def test_matches_single_device_float32(compare32, run):
    assert_runs_agree(compare32, run, "single", 1e-5)


def test_eval_is_sharded_padded_and_masked(compare64):
    """Eval batches of 20 on 8 devices are padded to 24; the padding is masked, so each sample counts once."""
    for run in ("single", "jit", "shard_map", "pmap"):
        assert compare64[f"{run}/eval_sums"][3] == NUM_TEST
    for run in ("jit", "shard_map"):
        assert rel_error(compare64[f"{run}/eval_sums"], compare64["single/eval_sums"]) <= 1e-10


def test_bn_sync_off_is_per_device_and_keeps_device0_statistics(compare64):
    """bn_sync=False equals the hand-made reference (each device's 4 samples on their own, gradients averaged,
    device 0's running statistics kept) and differs from synchronised BatchNorm."""
    assert_runs_agree(compare64, "shard_map-off", "reference-off", 1e-10, keys="state,train_sums")
    off, single = bn_stats(compare64, "shard_map-off"), bn_stats(compare64, "single")
    assert len(off) >= 10
    assert max(rel_error(off[k], single[k]) for k in off) > 1e-2


def test_step_with_indivisible_batch_is_refused(compare64):
    for run in ("jit", "shard_map", "pmap", "shard_map-off"):
        message = str(compare64[f"{run}/odd_batch_error"])
        assert "9 samples does not split evenly across 8 devices" in message


def test_auto_picks_jit_on_several_devices_and_shard_map_for_bn_sync_off(compare64):
    assert (str(compare64["auto_runner"]), str(compare64["auto_runner_off"])) == ("JitRunner", "ShardMapRunner")


def test_jit_step_gathers_each_devices_share_and_all_reduces(compare64):
    """The compiled jit step (8 devices, batch 32) gathers 4 images per device from the resident split, never the
    whole batch, has the all-reduces the compiler inserted (BatchNorm statistics, loss, gradients, metrics) and
    no all-gather (the CPU's conv-input buffers are kept per device: cpu.MaterializedInputConv2d)."""
    gathers = compare64["jit/hlo_image_gathers"]
    assert len(gathers) and set(gathers.tolist()) == {32 // 8}, gathers
    assert int(compare64["jit/hlo_all_reduces"]) > 0
    assert int(compare64["jit/hlo_all_gathers"]) == 0


# ------------------------------------------------------------------------------------------ tests: 2 hosts
def test_two_processes_match_one_process_with_four_devices(multihost, four_devices):
    for rank, result in enumerate(multihost):
        assert (int(result["num_devices"]), int(result["local_devices"])) == (4, 2)
        assert bool(result["is_main"]) == (rank == 0)
        for run in ("jit", "shard_map", "pmap"):
            assert_runs_agree(four_devices, run, run, 1e-10, other=result)
            assert float(result[f"{run}/checkpoint_error"]) == 0.0  # saved once, restored by both
