"""``port``: weights read from --from (any form ``weights`` reads) and written in the form --to names."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax

from flax_resnet import weights
from flax_resnet.cli import options
from flax_resnet.config import ConfigError
from flax_resnet.errors import FlaxResnetError


def _check_target(source: Path, target: Path, overwrite: bool) -> bool:
    """Whether --to names a file (else a checkpoint directory); a target that would lose data is a usage error."""
    if not source.exists():
        raise ConfigError(f"--from {source}: no such file or directory.")
    is_file = target.suffix in (weights.SAFETENSORS_SUFFIX, *weights.TORCH_SUFFIXES)
    if is_file and target.is_dir():
        raise ConfigError(f"--to {target} is a directory; give the file to write.")
    if is_file and target.exists() and not overwrite:
        raise ConfigError(f"--to {target} exists; pass --overwrite to replace it.")
    if not is_file and target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise ConfigError(f"--to {target} exists and is not an empty directory; choose a new checkpoint directory "
                          "or a .safetensors or .pt file.")
    return is_file


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    model = options.chosen_model(args)
    source, target = args.source, args.target
    to_file = _check_target(source, target, bool(args.overwrite))
    dtype = weights.read_meta(source, args.step).get("dtype", "float32")
    if dtype == "float64":  # the checkpoint's own dtype, kept in what is written
        jax.config.update("jax_enable_x64", True)
    net, name, kwargs = weights.load_model(source, "jax", model=model, step=args.step)
    meta = {"model": name, "model_kwargs": kwargs, "dtype": dtype, "source": str(source)}
    _written(target, lambda: weights.save(net, target, meta))
    print(f"wrote {name} {kwargs or ''} to {target} ({'a state_dict file' if to_file else 'a checkpoint directory'})")
    return 0


def _written(target: Path, write: Callable[[], Any]) -> None:
    """Run ``write``; a failed write (read-only file system, full disk; torch reports one as a RuntimeError) is one
    error naming the cause. ``weights.save`` writes atomically, so nothing is left at --to."""
    try:
        write()
    except (OSError, RuntimeError) as e:
        cause = e.strerror if isinstance(e, OSError) and e.strerror else " ".join(str(e).split())[:200]
        raise FlaxResnetError(f"could not write {target} ({cause}); free space or choose another --to.") from e
