"""Train-step time of the data-parallel paths (``--parallel jit``, ``shard_map``, ``pmap``) on N simulated CPU
devices, the figures behind ``--parallel auto``'s choice (``flax_resnet.training.parallel.auto_kind``). Each device
count runs in its own subprocess with ``XLA_FLAGS=--xla_force_host_platform_device_count=N`` (set before JAX is
imported). Prints a Markdown table of median milliseconds per step.

    PYTHONPATH=$PWD python benchmarks/parallel_kinds.py [--devices 2 8] [--batch 64] [--rounds 7] [--steps 4]

SimpleResNet(n_blocks) at float32 on 32x32 generated images, the runners' own steps (gather and augmentation from
the resident split included), each kind compiled and warmed up first. Kinds are interleaved round by round (each
round times ``--steps`` steps of every kind), so a load change on a shared machine spoils all of them alike.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

KINDS = ("jit", "shard_map", "pmap")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def child(args: argparse.Namespace) -> None:
    """Times every kind on this process's devices; prints one JSON line of results."""
    import dataclasses

    import jax
    import jax.numpy as jnp
    import numpy as np

    from flax_resnet import builders
    from flax_resnet.data import plan as plan_lib
    from flax_resnet.recipes import RECIPES
    from flax_resnet.training import cpu, engine, parallel

    cpu.tune_allocator()  # what the command line does first
    recipe = dataclasses.replace(RECIPES["plain-vs-residual"], batch_size=args.batch)
    num = args.batch * args.steps
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (num, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, num).astype(np.int32)
    tx = engine.make_optimizer(recipe, args.steps)
    model = builders.build_flax("SimpleResNet", {"n_blocks": args.n_blocks}, seed=0)
    graphdef, state = engine.init_train_state(model, tx)
    state = jax.device_get(state)
    epoch = plan_lib.epoch_plan(0, 0, num)

    runs = {}
    for kind in KINDS:
        runner = parallel.make_runner(kind, graphdef, tx, recipe, dtype=jnp.float32)
        held = [runner.put_data(images, labels), runner.put_state(state), runner.put_plan(epoch),
                runner.zero_metrics()]
        t0 = time.perf_counter()
        held[1], held[3] = runner.train_step(held[1], held[3], held[0], held[2], 0, args.batch)
        jax.block_until_ready(held[1])
        runs[kind] = (runner, held, time.perf_counter() - t0)

    times: dict[str, list[float]] = {kind: [] for kind in KINDS}
    for _ in range(args.rounds):
        for kind, (runner, held, _) in runs.items():
            t0 = time.perf_counter()
            for step in range(args.steps):
                held[1], held[3] = runner.train_step(held[1], held[3], held[0], held[2], step * args.batch,
                                                     args.batch)
            jax.block_until_ready(held[1])
            times[kind].append((time.perf_counter() - t0) / args.steps * 1e3)
    print(json.dumps({"devices": jax.device_count(), "times": times,
                      "first_step_s": {kind: run[2] for kind, run in runs.items()}}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--devices", type=int, nargs="+", default=[2, 8])
    p.add_argument("--batch", type=int, default=64, help="global batch (a multiple of every device count)")
    p.add_argument("--n-blocks", type=int, default=1, help="SimpleResNet's blocks per stage (1: 8 layers)")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--steps", type=int, default=4, help="steps timed together per round")
    p.add_argument("--timeout", type=float, default=900, help="seconds per device count")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)

    print(f"SimpleResNet({args.n_blocks}), float32, global batch {args.batch} of 32x32, {args.rounds} rounds of "
          f"{args.steps} steps; {cpu_name()}\n")
    print("| devices | path | median ms/step | min | max | first step (compile) s |")
    print("|---|---|---|---|---|---|")
    for n in args.devices:
        env = {**os.environ, "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} "
               f"--xla_force_host_platform_device_count={n}".strip(), "JAX_PLATFORMS": "cpu"}
        argv = [sys.executable, __file__, "--child", "--batch", str(args.batch), "--n-blocks", str(args.n_blocks),
                "--rounds", str(args.rounds), "--steps", str(args.steps)]
        out = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=args.timeout)
        if out.returncode:
            sys.exit(f"{n} devices failed:\n{out.stderr[-3000:]}")
        result = json.loads(out.stdout.strip().splitlines()[-1])
        for kind, times in result["times"].items():
            print(f"| {result['devices']} | {kind} | {statistics.median(times):.1f} | {min(times):.1f} | "
                  f"{max(times):.1f} | {result['first_step_s'][kind]:.1f} |", flush=True)


if __name__ == "__main__":
    main()
