"""Data sets as uint8 NHWC numpy arrays: CIFAR-10 (through TFDS, without TensorFlow) and a synthetic stand-in.

The rest of the project only sees :class:`Dataset`. This module imports neither TensorFlow nor
tensorflow_datasets at import time: TFDS is imported inside the functions that prepare or read CIFAR-10, so
machines without it (the GPU machine) can still use the synthetic data and everything else.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import socket
import sys
import tempfile
import threading
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from flax_resnet.errors import FlaxResnetError

log = logging.getLogger(__name__)

NUM_CLASSES = 10
DATASETS = ("cifar10", "synthetic")

# Where the official archives live; tests point this at a closed local port.
SOURCE_HOST = "www.cs.toronto.edu"
SOURCE_PORT = 443
DOWNLOAD_SUBDIR = "downloads"


class DataError(FlaxResnetError, RuntimeError):
    """A data set cannot be provided: offline, missing, corrupt or wrong archive. The message names the fix."""


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """A whole data set in host memory: uint8 NHWC images and int32 labels, train and test.

    Kept as uint8 (150 MB for CIFAR-10) so it can be put on the device whole; normalisation and
    augmentation happen there.
    """

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    num_classes: int = NUM_CLASSES

    def __post_init__(self) -> None:
        for split in ("train", "test"):
            images = getattr(self, f"{split}_images")
            labels = getattr(self, f"{split}_labels")
            if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
                raise ValueError(f"{split}_images must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
            if labels.dtype != np.int32 or labels.shape != images.shape[:1]:
                raise ValueError(f"{split}_labels must be int32 ({len(images)},), got {labels.dtype} {labels.shape}")


# --------------------------------------------------------------------------------------------------- CIFAR-10


def load_cifar10(
    data_dir: str | Path,
    *,
    archive: str | Path | None = None,
    download: bool = True,
    skip_checksum: bool = False,
    connect_timeout: float = 5.0,
) -> Dataset:
    """CIFAR-10 from `data_dir`, preparing it there first if needed.

    Prepared data in `data_dir` is read as is. Otherwise it is prepared from `archive` (the official
    cifar-10-binary.tar.gz or cifar-10-python.tar.gz, checked against its md5 unless `skip_checksum`), or,
    if `download`, from the official binary archive fetched from www.cs.toronto.edu -- after checking
    within `connect_timeout` seconds that the site answers, so an offline machine fails at once instead of
    in TFDS's minutes-long retry loop. Preparing is all or nothing: a bad archive raises DataError and
    leaves no dataset behind.
    """
    data_dir = Path(data_dir).expanduser()
    if not _is_prepared(data_dir):
        if archive is not None:
            _prepare(data_dir, Path(archive).expanduser(), skip_checksum=skip_checksum)
        elif download:
            path = _download(data_dir, skip_checksum=skip_checksum, connect_timeout=connect_timeout)
            _prepare(data_dir, path, skip_checksum=skip_checksum)
        else:
            raise DataError(
                f"no prepared CIFAR-10 in {data_dir} and downloading is off. Pass --archive PATH (the official "
                "cifar-10-binary.tar.gz or cifar-10-python.tar.gz), allow the download, or point --data-dir "
                "at a directory where CIFAR-10 was prepared before."
            )
    return _read_prepared(data_dir)


def _builder(data_dir: Path, **kwargs: Any) -> Any:
    from flax_resnet.cifar10_builder import Cifar10  # imports tensorflow_datasets

    return Cifar10(data_dir=os.fspath(data_dir), **kwargs)


def _is_prepared(data_dir: Path) -> bool:
    builder = _builder(data_dir)
    if not Path(builder.data_dir).is_dir() or not builder.is_prepared():
        return False
    file_format = getattr(builder.info.file_format, "value", builder.info.file_format)
    if file_format != "array_record":
        raise DataError(
            f"{builder.data_dir} holds CIFAR-10 in {file_format} format, not array_record; use another --data-dir"
        )
    return True


def _prepare(data_dir: Path, archive: Path, *, skip_checksum: bool) -> None:
    """Verifies and converts `archive` into array_record data under `data_dir`, all or nothing.

    TFDS writes into a temporary `incomplete.*` directory and renames it when complete (and removes it on an
    exception); we also remove the dataset directory if this call created it, and TFDS's (unused) download
    directory. TFDS's messages go to stderr, so that stdout stays the caller's.
    """
    if not archive.is_file():
        raise DataError(f"archive {archive} does not exist")
    builder = _builder(data_dir, archive_path=archive, skip_checksum=skip_checksum)
    dataset_dir = Path(builder.data_dir).parent  # data_dir/cifar10
    created = not dataset_dir.exists()
    log.info("preparing CIFAR-10 in %s from %s", builder.data_dir, archive)
    data_dir.mkdir(parents=True, exist_ok=True)
    tfds_downloads = tempfile.mkdtemp(dir=data_dir, prefix=".tfds-downloads-")
    try:
        with contextlib.redirect_stdout(sys.stderr):
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


_READ_CHUNK = 4096


def _read_prepared(data_dir: Path) -> Dataset:
    """Reads prepared CIFAR-10 through `tfds.data_source` (random access, no TensorFlow)."""
    import tensorflow_datasets as tfds

    import flax_resnet.cifar10_builder  # noqa: F401  (registers our "cifar10")

    names = ("train", "test")
    sources = tfds.data_source("cifar10", split=list(names), data_dir=os.fspath(data_dir), download=False)
    splits = {}
    for split, source in zip(names, sources, strict=True):
        n = len(source)
        images = np.empty((n, 32, 32, 3), np.uint8)
        labels = np.empty(n, np.int32)
        for start in range(0, n, _READ_CHUNK):  # batched reads are ~1.7x faster than one by one
            indices = list(range(start, min(start + _READ_CHUNK, n)))
            for i, example in zip(indices, source.__getitems__(indices), strict=True):
                images[i] = example["image"]
                labels[i] = example["label"]
        splits[split] = images, labels
    return Dataset(*splits["train"], *splits["test"])


def source_answers(host: str, port: int, timeout: float) -> bool:
    """Whether a TCP connection to host:port opens within `timeout` seconds (DNS included).

    Runs in a daemon thread because a socket timeout does not bound name resolution.
    """
    result: list[bool] = []

    def connect() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=connect, daemon=True, name="cifar10-connect-check")
    thread.start()
    thread.join(timeout + 0.5)
    return bool(result and result[0])


def _download(data_dir: Path, *, skip_checksum: bool, connect_timeout: float) -> Path:
    """The official binary archive in data_dir/downloads, fetched unless a verified copy is already there."""
    from flax_resnet.cifar10_builder import BINARY, verify_md5

    target = data_dir / DOWNLOAD_SUBDIR / BINARY.filename
    if target.is_file():
        if skip_checksum:
            return target
        try:
            verify_md5(target)
            return target
        except DataError:
            log.warning("discarding %s: wrong md5", target)
            target.unlink()
    if not source_answers(SOURCE_HOST, SOURCE_PORT, connect_timeout):
        raise DataError(
            f"CIFAR-10 is not prepared in {data_dir} and {SOURCE_HOST}:{SOURCE_PORT} does not answer within "
            f"{connect_timeout:g} s (offline?). Either pass --archive PATH to the official "
            f"{BINARY.filename} or cifar-10-python.tar.gz, or run once on a machine with network and reuse "
            "its prepared data with --data-dir."
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=BINARY.filename + ".", suffix=".part")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            _fetch(BINARY.url, out.write, timeout=max(connect_timeout, 30.0))
        if not skip_checksum:
            verify_md5(tmp)
        tmp.replace(target)
    except (urllib.error.URLError, OSError) as e:
        raise DataError(
            f"downloading {BINARY.url} failed ({e}). Retry, or pass --archive PATH to a copy of "
            f"{BINARY.filename} fetched another way."
        ) from e
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return target


def _fetch(url: str, write: Callable[[bytes], Any], *, timeout: float) -> None:
    """Streams `url` into `write`, with a tqdm bar on stderr when that is a terminal."""
    from tqdm import tqdm

    with urllib.request.urlopen(url, timeout=timeout) as response:
        total = int(response.headers.get("Content-Length") or 0) or None
        with tqdm(total=total, unit="B", unit_scale=True, desc=url.rsplit("/", 1)[-1], disable=None) as bar:
            for chunk in iter(lambda: response.read(1 << 20), b""):
                write(chunk)
                bar.update(len(chunk))


# -------------------------------------------------------------------------------------------------- synthetic


def synthetic_dataset(num_train: int = 2048, num_test: int = 512, *, seed: int = 0, image_size: int = 32) -> Dataset:
    """A small CIFAR-shaped data set that a small CNN can learn, for tests and offline runs.

    Each class has a fixed random smooth template (a few low-frequency colour waves); a sample is its
    class template shifted by up to 1/8 of the image, scaled in contrast and brightness, with pixel noise.
    So the class is in the spatial pattern, not in any single pixel. Deterministic for a seed.
    """
    if num_train < 0 or num_test < 0 or image_size < 4:
        raise ValueError("need num_train, num_test >= 0 and image_size >= 4")
    rng = np.random.default_rng(seed)
    s = image_size
    grid = np.arange(s, dtype=np.float64) * (2 * np.pi / s)
    yy, xx = np.meshgrid(grid, grid, indexing="ij")
    templates = np.zeros((NUM_CLASSES, s, s, 3))
    for c in range(NUM_CLASSES):
        for _ in range(3):  # three waves of frequency 1..2 per axis, each with its own colour
            fy, fx = rng.integers(-2, 3, size=2)
            if fy == 0 and fx == 0:
                fx = 1
            wave = np.cos(fy * yy + fx * xx + rng.uniform(0, 2 * np.pi))
            templates[c] += wave[..., None] * rng.normal(0.0, 1.0, size=3)
        templates[c] *= 45.0 / templates[c].std()

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        labels = rng.permutation(np.arange(n) % NUM_CLASSES).astype(np.int32)
        shift = max(1, s // 8)
        shifts = rng.integers(-shift, shift + 1, size=(n, 2))
        contrast = rng.uniform(0.6, 1.4, size=(n, 1, 1, 1))
        brightness = rng.normal(128.0, 20.0, size=(n, 1, 1, 3))
        noise = rng.normal(0.0, 30.0, size=(n, s, s, 3))
        images = np.empty((n, s, s, 3))
        for i in range(n):  # circular shifts keep the pattern smooth (the templates are periodic)
            images[i] = np.roll(templates[labels[i]], tuple(shifts[i]), axis=(0, 1))
        images = images * contrast + brightness + noise
        return np.clip(np.rint(images), 0, 255).astype(np.uint8), labels

    train = draw(num_train)
    test = draw(num_test)
    return Dataset(*train, *test)


def load_dataset(name: str, **kwargs: Any) -> Dataset:
    """The data set called `name` ("cifar10" or "synthetic"), with the keyword arguments of its loader."""
    loaders: dict[str, Callable[..., Dataset]] = {"cifar10": load_cifar10, "synthetic": synthetic_dataset}
    if name not in loaders:
        raise ValueError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}")
    return loaders[name](**kwargs)
