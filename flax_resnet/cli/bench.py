"""``bench``: the options as a ``config.BenchConfig`` (over ``BENCH_QUICK`` with --quick), timed by
``flax_resnet.bench``; the table printed, the rows written to --json."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from flax_resnet import bench, files
from flax_resnet.cli import options
from flax_resnet.config import BENCH_QUICK, BenchConfig, ConfigError
from flax_resnet.errors import FlaxResnetError, require


def bench_config(args: argparse.Namespace) -> BenchConfig:
    """The benchmark the options describe: the defaults (or --quick's), then the user's values."""
    base = BENCH_QUICK if args.quick else BenchConfig()
    model = args.model or base.model
    kwargs = options.model_kwargs(args, model, preset=base.model_kwargs if model == base.model else None)
    values = options.given(args, ("batch_size", "precision", "warmup", "steps", "epoch_images", "torch_compile",
                                  "seed"))
    return dataclasses.replace(base, model=model, model_kwargs=kwargs, **values)


def _check_json(path: Path | None) -> None:
    """--json must be writable as a file: checked before the run, not after minutes of it."""
    if path is not None and (path.is_dir() or (path.parent.exists() and not path.parent.is_dir())):
        raise ConfigError(f"--json {path}: give a file path in a directory.")


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    config = bench_config(args)
    _check_json(args.json)
    require("torch", "bench (it times Flax against PyTorch)")
    rows = bench.run_benchmark(config, log=lambda message: print(f"[bench] {message}", file=sys.stderr, flush=True))
    env = bench.environment()
    print(bench.format_table(rows, env["cpu"]["text"]))
    print(f"load average at end: {env['load_avg']}  (jax {env['jax']}, torch {env['torch']}, "
          f"{env['cpu_count']} CPUs, torch threads {env['torch_threads']})")
    if args.json:
        try:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            files.write_atomic(args.json, json.dumps({"environment": env, "rows": rows}, indent=2, default=str) + "\n")
        except OSError as e:
            raise FlaxResnetError(f"could not write --json {args.json} ({e.strerror or e}); the table above has every "
                                  "figure.") from e
    return 0
