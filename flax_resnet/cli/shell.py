"""What every command of the command line shares: help layout, error reporting, progress, the data options.
Only the standard library is imported at import time, so ``--help`` stays quick."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from flax_resnet.cli.options import expanded_path, finite_float, number, program_name, seed
from flax_resnet.recipes import PARALLEL_KINDS

__all__ = ["RUNS_DIR", "HelpFormatter", "add_data_arguments", "add_parallel_arguments", "check_data_arguments",
           "expanded_path", "fail", "finite_float", "load_data", "number", "program_name", "progress_factory", "seed",
           "write_line"]

RUNS_DIR = "runs"
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a process stopped by Ctrl-C


def exit_now(code: int) -> NoReturn:
    """End the process at once, from any thread, with no interpreter teardown (see ``cli.main``)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Wraps prose, keeps text laid out in lines as it is (the epilogs' tables and examples); wider option column."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=34, width=110)

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        fill = super()._fill_text if "\n" in text else functools.partial(argparse.HelpFormatter._fill_text, self)
        return fill(text, width, indent)


def fail(message: str) -> int:
    """An expected failure: the message on stderr, no traceback; exit code 1. Lines break at spaces only, so that
    paths (often with hyphens) stay whole; a message laid out in lines (a list of problems) keeps its lines."""
    lines = message.strip().split("\n")
    wrapped = [textwrap.fill(" ".join(line.split()), width=110, initial_indent="  " if i else "",
                             subsequent_indent="    " if i else "  ", break_on_hyphens=False,
                             break_long_words=False) for i, line in enumerate(lines)]
    sys.stdout.flush()
    print("error: " + "\n".join(wrapped), file=sys.stderr)
    return 1


def write_line(line: str) -> None:
    """Epoch lines go to stdout, between progress-bar refreshes (tqdm.write keeps the bar intact)."""
    from tqdm import tqdm

    tqdm.write(line, file=sys.stdout)


def progress_factory(enabled: bool) -> Callable[..., Any] | None:
    """tqdm bars on stderr, one per epoch (``factory(total=..., desc=...)``), or none (tqdm is then not imported)."""
    if not enabled:
        return None
    from tqdm import tqdm

    return functools.partial(tqdm, unit="step", leave=False, file=sys.stderr, dynamic_ncols=True)


def add_data_arguments(parser: argparse.ArgumentParser, *, dataset_default: str | None = "cifar10",
                       image_size: bool = False) -> None:
    """The data options (``train`` and the experiments share them; ``load_data`` reads them)."""
    g = parser.add_argument_group("data")
    default = f" (default: {dataset_default})" if dataset_default else " (default: cifar10; synthetic with --quick)"
    g.add_argument("--dataset", choices=("cifar10", "synthetic"), default=dataset_default,
                   help=f"CIFAR-10, or a small generated set that needs no download{default}")
    g.add_argument("--data-dir", type=expanded_path, default=Path("data"), metavar="DIR",
                   help="where CIFAR-10 is (or gets) prepared (default: %(default)s)")
    g.add_argument("--archive", type=expanded_path, metavar="PATH",
                   help="prepare CIFAR-10 from this official archive (cifar-10-binary.tar.gz or "
                        "cifar-10-python.tar.gz) instead of downloading it")
    g.add_argument("--no-download", action="store_true", help="never download: use prepared data or --archive only")
    g.add_argument("--skip-checksum", action="store_true", help="do not check the archive's md5")
    g.add_argument("--train-samples", type=number(int, minimum=1), metavar="N",
                   help="use only the first N training images (synthetic: generate N; default 2048 there, all "
                        "50000 for CIFAR-10)")
    g.add_argument("--test-samples", type=number(int, minimum=0), metavar="N",
                   help="use only the first N test images (synthetic: generate N; default 512 there)")
    if image_size:
        g.add_argument("--image-size", type=int, metavar="PX",
                       help="side of the synthetic images (default 32); smaller is faster (synthetic only)")


def check_data_arguments(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Usage errors of the data options, and CIFAR-10's optional dependencies, before anything is read or
    written."""
    if args.dataset == "cifar10":
        from flax_resnet.data import cifar10

        cifar10.require_dependencies()
    if args.data_dir.exists() and not args.data_dir.is_dir():
        parser.error(f"--data-dir {args.data_dir} is a file; give a directory (it is created if missing)")
    if args.archive is not None:
        if args.archive.is_dir():
            parser.error(f"--archive {args.archive} is a directory; give the archive file itself "
                         "(cifar-10-python.tar.gz or cifar-10-binary.tar.gz)")
        if not args.archive.exists():
            parser.error(f"--archive {args.archive}: no such file")


def load_data(args: argparse.Namespace) -> Any:
    """The data set that ``add_data_arguments``' options name."""
    from flax_resnet import data
    from flax_resnet.data import cifar10

    if args.dataset == "synthetic":
        return data.synthetic_dataset(num_train=args.train_samples or 2048,
                                      num_test=512 if args.test_samples is None else args.test_samples,
                                      seed=0, image_size=getattr(args, "image_size", None) or 32)
    if args.archive is not None and cifar10.is_prepared(args.data_dir):
        print(f"note: CIFAR-10 is already prepared in {args.data_dir}, so --archive {args.archive} is not read "
              f"(remove {args.data_dir / 'cifar10'} to prepare it again)", file=sys.stderr)
    ds = data.load_dataset("cifar10", data_dir=args.data_dir, archive=args.archive, download=not args.no_download,
                           skip_checksum=args.skip_checksum)
    n_train, n_test = args.train_samples, args.test_samples  # None: all of them
    return dataclasses.replace(ds, train_images=ds.train_images[:n_train], train_labels=ds.train_labels[:n_train],
                               test_images=ds.test_images[:n_test], test_labels=ds.test_labels[:n_test])


def add_parallel_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The flags of data-parallel and multi-host training, in their own help group."""
    g = parser.add_argument_group(
        "devices and hosts",
        "Data parallelism: each global batch is split evenly across all devices (of all processes); results "
        "equal a one-device run with the same --batch-size.")
    g.add_argument("--parallel", choices=PARALLEL_KINDS, default="auto",
                   help="how steps run: 'single' one device with jax.jit; 'shard_map' jax.jit + jax.shard_map over "
                        "a mesh of all devices (JAX's recommended path); 'pmap' the same step with jax.pmap; "
                        "'auto' (default) shard_map when more than one device is visible, else single")
    g.add_argument("--bn-sync", choices=("on", "off"), default="on",
                   help="'on' (default): BatchNorm statistics over the whole global batch (synchronised across "
                        "devices, as one device would compute them); 'off': per-device statistics, like torch DDP "
                        "without SyncBatchNorm, keeping device 0's running statistics as DDP keeps rank 0's")
    g.add_argument("--coordinator", metavar="HOST:PORT",
                   help="multi-host: address of process 0, where it serves the JAX coordinator (a free port on its "
                        "host, reachable from all processes); give it, --num-processes and --process-id to every "
                        "process, or none of them under SLURM/Open MPI, whose environment JAX reads itself")
    g.add_argument("--num-processes", type=int, metavar="N", help="multi-host: number of processes in the run")
    g.add_argument("--process-id", type=int, metavar="I",
                   help="multi-host: this process's rank in [0, N); rank 0 runs the coordinator and writes history, "
                        "plots and logs")
    g.add_argument("--distributed-timeout", type=finite_float(minimum=0, exclusive_min=True), default=300.0,
                   metavar="SECONDS", help="multi-host: how long to wait for the coordinator and the other "
                                           "processes before failing (default: %(default)s)")
    return parser
