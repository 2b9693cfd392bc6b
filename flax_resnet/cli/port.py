"""``port``: weights read from --from (any form ``weights`` reads) and written in the form --to names."""

from __future__ import annotations

import argparse
import errno
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax

from flax_resnet import weights
from flax_resnet.cli import options
from flax_resnet.config import ConfigError
from flax_resnet.errors import FlaxResnetError
from flax_resnet.port import PortError


def _check_target(source: Path, target: Path, overwrite: bool) -> bool:
    """Whether --to names a file (else a checkpoint directory); a target that would lose data, or that cannot be
    written, is a usage error, found before the weights are read."""
    if not source.exists():
        raise ConfigError(f"--from {source}: no such file or directory.")
    try:
        is_file = weights.destination_form(target) != "checkpoint"
    except PortError as e:
        raise ConfigError(f"--to {e}") from e
    if is_file and target.is_dir():
        raise ConfigError(f"--to {target} is a directory; give the file to write.")
    if is_file and target.exists() and not overwrite:
        raise ConfigError(f"--to {target} exists; pass --overwrite to replace it.")
    if not is_file and target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise ConfigError(f"--to {target} exists and is not an empty directory; choose a new checkpoint directory "
                          "or a .safetensors or .pt file.")
    place = _directory_of(target.parent if is_file else target)
    if not os.access(place, os.W_OK):  # a read-only mount, or another user's directory
        raise ConfigError(f"--to {target}: {place} is not writable; choose another --to.")
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
        os_error = next((c for c in _causes(e) if isinstance(c, OSError)), None)
        if os_error is not None and os_error.errno in _NOT_WRITABLE:
            place = _directory_of(Path(os_error.filename) if os_error.filename else target)
            raise FlaxResnetError(f"could not write {target}: {place} is not writable ({os_error.strerror}); "
                                  "choose another --to.") from e
        if os_error is not None and os_error.errno in _NO_ROOM:
            raise FlaxResnetError(f"could not write {target}: {os_error.strerror}; free some space or choose "
                                  "another --to.") from e
        cause = os_error.strerror if os_error is not None and os_error.strerror else " ".join(str(e).split())
        raise FlaxResnetError(f"could not write {target} ({cause}); choose another --to.") from e


_NOT_WRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)
_NO_ROOM = (errno.ENOSPC, errno.EDQUOT)


def _directory_of(path: Path) -> Path:
    """The directory where ``path`` is or would be created: itself or its nearest existing ancestor."""
    return next((p for p in (path, *path.parents) if p.is_dir()), Path.cwd())


def _causes(error: BaseException) -> list[BaseException]:
    """``error`` and what it was raised from (a checkpoint store's error wraps the OSError)."""
    chain: list[BaseException] = []
    while error is not None and error not in chain:
        chain.append(error)
        error = error.__cause__ or error.__context__
    return chain
