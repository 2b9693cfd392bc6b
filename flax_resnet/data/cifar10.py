"""CIFAR-10 as a :class:`~flax_resnet.data.dataset.Dataset`: prepared data, a local archive or a download, through
TFDS without TensorFlow (``cifar10_builder``). TFDS is an optional dependency, imported by the functions that need
it, so machines without it can still use the synthetic data."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import socket
import tempfile
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from flax_resnet import files
from flax_resnet.data.dataset import DataError, Dataset
from flax_resnet.errors import require

__all__ = ["SOURCE_FILE", "is_prepared", "load_cifar10", "require_dependencies", "source_answers"]

log = logging.getLogger(__name__)

# Where the official archives live; tests point this at a closed local port.
SOURCE_HOST = "www.cs.toronto.edu"
SOURCE_PORT = 443
SOURCE_FILE = "source.json"  # in data_dir/cifar10: the archive the data was prepared from, by its md5


def load_cifar10(data_dir: str | Path, *, archive: str | Path | None = None, download: bool = True,
                 skip_checksum: bool = False, connect_timeout: float = 5.0) -> Dataset:
    """CIFAR-10 from `data_dir`, prepared there first if needed from `archive` (the official binary or python
    archive, checked against its md5 unless `skip_checksum`) or, if `download`, from the official binary archive --
    after checking within `connect_timeout` seconds that the site answers, so an offline machine fails at once
    instead of in TFDS's minutes-long retry loop. Preparing is all or nothing: a bad archive raises DataError.
    An `archive` given for data already prepared must hold what it was prepared from (the same md5, or both official
    archives: the binary and the python one hold the same images); another one raises DataError, as training on
    the old data instead would go unnoticed.
    """
    data_dir = Path(data_dir).expanduser()
    if is_prepared(data_dir):
        if archive is not None:
            _check_prepared_from(data_dir, Path(archive).expanduser())
    else:
        if archive is None and not download:
            raise DataError(f"no prepared CIFAR-10 in {data_dir} and downloading is off. Pass --archive PATH (the "
                            "official cifar-10-binary.tar.gz or cifar-10-python.tar.gz), allow the download, or "
                            "point --data-dir at CIFAR-10 prepared before.")
        path = (Path(archive).expanduser() if archive is not None
                else _download(data_dir, skip_checksum=skip_checksum, connect_timeout=connect_timeout))
        _prepare(data_dir, path, skip_checksum=skip_checksum)
    return _read_prepared(data_dir)


def is_prepared(data_dir: str | Path) -> bool:
    """Whether CIFAR-10 is prepared in ``data_dir`` (then ``load_cifar10`` reads it and looks at no archive)."""
    builder = _builder(Path(data_dir).expanduser())
    return Path(builder.data_dir).is_dir() and builder.is_prepared()


def _check_prepared_from(data_dir: Path, archive: Path) -> None:
    """DataError unless the CIFAR-10 prepared in ``data_dir`` came from ``archive`` (by its md5: 0.3 s for the
    163 MB official archive). Data prepared before the source was recorded counts as official CIFAR-10."""
    from flax_resnet.data.cifar10_builder import ARCHIVES, md5sum  # tensorflow_datasets, the [data] extra

    dataset_dir = data_dir / "cifar10"
    if not archive.is_file():
        raise DataError(f"--archive {archive}: no such file (CIFAR-10 is already prepared in {dataset_dir}; leave "
                        "out --archive to use it).")
    official = {spec.md5 for spec in ARCHIVES}
    recorded = next(iter(official))  # what unrecorded data counts as
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        recorded = json.loads((dataset_dir / SOURCE_FILE).read_text())["md5"]
    given = md5sum(archive)
    if given != recorded and not {given, recorded} <= official:
        raise DataError(f"CIFAR-10 is already prepared in {dataset_dir} from another archive than --archive "
                        f"{archive}. Remove {dataset_dir} to prepare it from {archive}, or leave out --archive to "
                        "train on the prepared data.")


def require_dependencies() -> None:
    """Stop with the ``pip install`` to run where the [data] extra (TFDS, Pillow) is missing: before any work."""
    for module in ("tensorflow_datasets", "PIL"):
        require(module, "CIFAR-10")


def _builder(data_dir: Path, **kwargs: Any) -> Any:
    require_dependencies()
    from flax_resnet.data.cifar10_builder import Cifar10  # imports tensorflow_datasets

    return Cifar10(data_dir=os.fspath(data_dir), **kwargs)


def _prepare(data_dir: Path, archive: Path, *, skip_checksum: bool) -> None:
    """Verifies and converts `archive` into array_record data under `data_dir`, all or nothing (TFDS removes its
    `incomplete.*` directory on an exception; we remove the dataset directory if we created it). TFDS's stdout is
    silenced: its "Downloading and preparing dataset" would be wrong, and stdout is the caller's."""
    if not archive.is_file():
        raise DataError(f"archive {archive} does not exist")
    builder = _builder(data_dir, archive_path=archive, skip_checksum=skip_checksum)
    dataset_dir = Path(builder.data_dir).parent  # data_dir/cifar10
    created = not dataset_dir.exists()
    log.info("preparing CIFAR-10 in %s from %s", builder.data_dir, archive)
    data_dir.mkdir(parents=True, exist_ok=True)
    tfds_downloads = tempfile.mkdtemp(dir=data_dir, prefix=".tfds-downloads-")  # TFDS's, unused
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            builder.download_and_prepare(download_dir=tfds_downloads)
    except Exception as e:
        if created:  # TFDS removed its incomplete.* directory already; remove the then empty parent
            with contextlib.suppress(OSError):
                dataset_dir.rmdir()
        if isinstance(e, DataError):
            raise
        raise DataError(f"preparing CIFAR-10 from {archive} failed: {type(e).__name__}: {e}") from e
    finally:
        shutil.rmtree(tfds_downloads, ignore_errors=True)
    from flax_resnet.data.cifar10_builder import md5sum

    with contextlib.suppress(OSError):  # without it, the data counts as prepared from an official archive
        files.write_atomic(dataset_dir / SOURCE_FILE, json.dumps({"archive": str(archive), "md5": md5sum(archive)}))


def _read_prepared(data_dir: Path) -> Dataset:
    """Prepared CIFAR-10 through our builder instance's ``as_data_source`` (random access, no TensorFlow), not
    ``tfds.data_source("cifar10")``: in TFDS's registry that name is TFDS's own builder (TFRecord)."""
    splits = []  # train images and labels, then test's
    chunk = 4096  # batched reads are ~1.7x faster than one by one
    for source in _builder(data_dir).as_data_source(split=["train", "test"]):
        n = len(source)
        images, labels = np.empty((n, 32, 32, 3), np.uint8), np.empty(n, np.int32)  # filled chunk by chunk: one copy
        for i in range(0, n, chunk):
            for j, example in enumerate(source.__getitems__(list(range(i, min(i + chunk, n)))), start=i):
                images[j], labels[j] = example["image"], example["label"]
        splits += [images, labels]
    return Dataset(*splits, name="cifar10")


def source_answers(host: str, port: int, timeout: float) -> bool:
    """Whether a TCP connection to host:port opens within `timeout` seconds (DNS included: it runs in a daemon
    thread, because a socket timeout does not bound name resolution)."""
    answered = threading.Event()

    def connect() -> None:
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=timeout):
            answered.set()

    thread = threading.Thread(target=connect, daemon=True, name="cifar10-connect-check")
    thread.start()
    thread.join(timeout + 0.5)
    return answered.is_set()


def _download(data_dir: Path, *, skip_checksum: bool, connect_timeout: float) -> Path:
    """The official binary archive in data_dir/downloads, fetched (a progress bar on a terminal's stderr) unless a
    verified copy is already there."""
    from flax_resnet.data.cifar10_builder import BINARY, md5sum, verify_md5  # tensorflow_datasets, the [data] extra

    target = data_dir / "downloads" / BINARY.filename
    damaged = ""
    if target.is_file():
        if skip_checksum or md5sum(target) == BINARY.md5:
            return target
        damaged = f" ({target} is there, but its md5 is wrong)"  # fetched again, and replaced, when online
    if not source_answers(SOURCE_HOST, SOURCE_PORT, connect_timeout):
        raise DataError(f"CIFAR-10 is not prepared in {data_dir}{damaged} and {SOURCE_HOST}:{SOURCE_PORT} does not "
                        f"answer within {connect_timeout:g} s. Pass --archive PATH to the official {BINARY.filename} "
                        "or cifar-10-python.tar.gz, or --data-dir to CIFAR-10 prepared on a machine with network.")
    target.parent.mkdir(parents=True, exist_ok=True)
    url = f"https://www.cs.toronto.edu/~kriz/{BINARY.filename}"
    try:  # a temporary of its own per process (two may download into one --data-dir), removed on any failure
        with files.atomic_path(target, unique=True) as tmp:
            with (open(tmp, "wb") as out,
                  urllib.request.urlopen(url, timeout=max(connect_timeout, 30.0)) as response,
                  tqdm(total=int(response.headers.get("Content-Length") or 0) or None, unit="B", unit_scale=True,
                       desc=BINARY.filename, disable=None) as bar):
                for chunk in iter(lambda: response.read(1 << 20), b""):
                    out.write(chunk)
                    bar.update(len(chunk))
            if not skip_checksum:
                verify_md5(tmp)
    except (urllib.error.URLError, OSError) as e:
        raise DataError(f"downloading {url} failed ({e}). Retry, or pass --archive PATH to a copy of "
                        f"{BINARY.filename} fetched another way.") from e
    return target
