"""A TFDS builder for CIFAR-10 that needs no TensorFlow.

TFDS's own ``cifar10`` builder cannot prepare data without TensorFlow (it reads through ``tf.io.gfile`` and
encodes PNGs with TF). This one reads the official archive -- the binary ``cifar-10-binary.tar.gz`` or the
python-pickle ``cifar-10-python.tar.gz`` -- with :mod:`tarfile`, encodes the images with Pillow, and writes
array_record files, which the instance's ``as_data_source()`` reads without TensorFlow. It is not registered
with TFDS (``skip_registration``): the name ``cifar10`` there stays TFDS's own builder, and nothing here looks
a builder up by name. Its data lives under ``data_dir/cifar10/1.0.0``.

It never downloads: ``flax_resnet.data.cifar10.load_cifar10`` fetches the archive (failing fast when offline)
and hands it over as ``archive_path``. Importing this module imports ``tensorflow_datasets`` (an optional
dependency), so only ``flax_resnet.data.cifar10`` imports it, inside the functions that need TFDS; it imports
nothing of the project but ``flax_resnet.data.dataset``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import pickle
import tarfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from flax_resnet.data.dataset import DataError

IMAGE_SHAPE = (32, 32, 3)
RECORD_PIXELS = 32 * 32 * 3
CLASS_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"


@dataclasses.dataclass(frozen=True)
class ArchiveSpec:
    """One official CIFAR-10 archive: where it lives, its md5, and the folder its batch files are in."""

    kind: str
    filename: str
    url: str
    md5: str
    folder: str
    suffix: str  # of the batch files inside `folder`


BINARY = ArchiveSpec(
    kind="binary",
    filename="cifar-10-binary.tar.gz",
    url="https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz",
    md5="c32a1d4ab5d03f1284b67883e8d87530",
    folder="cifar-10-batches-bin",
    suffix=".bin",
)
PYTHON = ArchiveSpec(
    kind="python",
    filename="cifar-10-python.tar.gz",
    url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    md5="c58f30108f718f92721af3b95e74349a",
    folder="cifar-10-batches-py",
    suffix="",
)
ARCHIVES = (BINARY, PYTHON)

Split = tuple[np.ndarray, np.ndarray]  # (uint8 NHWC images, int64 labels)


def md5sum(path: str | os.PathLike[str]) -> str:
    """The md5 hex digest of a file, read in chunks (the archives are ~170 MB)."""
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_md5(path: str | os.PathLike[str]) -> ArchiveSpec:
    """Checks that `path` is one of the official archives, byte for byte; returns which one.

    Raises DataError otherwise: a truncated download or a different file must not become "CIFAR-10".
    """
    actual = md5sum(path)
    for spec in ARCHIVES:
        if actual == spec.md5:
            return spec
    expected = ", ".join(f"{s.filename} {s.md5}" for s in ARCHIVES)
    raise DataError(
        f"{path}: md5 {actual} matches no official CIFAR-10 archive ({expected}). The file is truncated, "
        "corrupt or not CIFAR-10; download it again (or pass skip_checksum=True if it is a deliberate "
        "test archive)."
    )


def _records_to_nhwc(data: np.ndarray) -> np.ndarray:
    """(N, 3072) rows of R, G, B planes (each 32x32 row-major) -> (N, 32, 32, 3)."""
    return np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))


def _check_labels(labels: np.ndarray, where: str) -> np.ndarray:
    if labels.size and (labels.min() < 0 or labels.max() >= len(CLASS_NAMES)):
        raise DataError(f"{where}: labels outside 0..9 (min {labels.min()}, max {labels.max()})")
    return labels.astype(np.int64)


def _parse_binary(raw: bytes, where: str) -> Split:
    record = 1 + RECORD_PIXELS
    if not raw or len(raw) % record:
        raise DataError(f"{where}: {len(raw)} bytes is not a whole number of {record}-byte CIFAR-10 records")
    rows = np.frombuffer(raw, dtype=np.uint8).reshape(-1, record)
    return _records_to_nhwc(rows[:, 1:]), _check_labels(rows[:, 0].astype(np.int64), where)


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles a CIFAR-10 batch and nothing else: pickle can run code, so only the globals a batch file
    needs (numpy array reconstruction, and `_codecs.encode` for bytes pickled by Python 3) are allowed."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): ("numpy._core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"): ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"): ("numpy", "ndarray"),
        ("numpy", "dtype"): ("numpy", "dtype"),
        ("_codecs", "encode"): ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Any:
        target = self._ALLOWED.get((module, name))
        if target is None:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR-10 batch")
        return super().find_class(*target)


def _parse_pickle(raw: bytes, where: str) -> Split:
    try:
        # The official batches were pickled by Python 2: their str keys and data load as bytes.
        batch = _BatchUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as e:  # a damaged pickle can raise nearly anything
        raise DataError(f"{where}: not a readable CIFAR-10 pickle ({type(e).__name__}: {e})") from e
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        keys = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise DataError(f"{where}: expected a dict with keys b'data' and b'labels', got {keys}")
    data = np.asarray(batch[b"data"])
    labels = np.asarray(batch[b"labels"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != RECORD_PIXELS or not len(data):
        raise DataError(f"{where}: b'data' must be (N, {RECORD_PIXELS}) uint8, got {data.shape} {data.dtype}")
    if labels.shape != (len(data),) or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{where}: b'labels' must be {len(data)} integers, got {labels.shape} {labels.dtype}")
    return _records_to_nhwc(data), _check_labels(labels, where)


def read_archive(path: str | os.PathLike[str]) -> dict[str, Split]:
    """Reads an official CIFAR-10 archive (either format) into {"train": ..., "test": ...}.

    Train is data_batch_1..5 in that order, test is test_batch: the archive's own order, kept. Everything is
    read and checked before anything is written, so a bad archive fails here with DataError.
    """
    path = Path(path)
    try:
        with tarfile.open(path, "r:*") as tar:
            members = {m.name.removeprefix("./"): m for m in tar.getmembers() if m.isfile()}
            spec = next((s for s in ARCHIVES if any(n.startswith(s.folder + "/") for n in members)), None)
            if spec is None:
                raise DataError(
                    f"{path}: not a CIFAR-10 archive (no folder {BINARY.folder}/ or {PYTHON.folder}/ inside)"
                )
            parse = _parse_binary if spec.kind == "binary" else _parse_pickle
            batches: dict[str, Split] = {}
            for name in (*TRAIN_BATCHES, TEST_BATCH):
                member_name = f"{spec.folder}/{name}{spec.suffix}"
                member = members.get(member_name)
                if member is None:
                    raise DataError(f"{path}: {member_name} is missing from the {spec.kind} archive")
                f = tar.extractfile(member)
                assert f is not None  # a regular file
                batches[name] = parse(f.read(), f"{path}:{member_name}")
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        raise DataError(f"{path}: cannot read the archive, truncated or not a tar.gz ({e})") from e
    train = [batches[name] for name in TRAIN_BATCHES]
    return {
        "train": (np.concatenate([b[0] for b in train]), np.concatenate([b[1] for b in train])),
        "test": batches[TEST_BATCH],
    }


def encode_png(image: np.ndarray) -> bytes:
    """PNG bytes via Pillow: tfds.features.Image encodes numpy arrays with TensorFlow, but takes bytes as is."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


class Cifar10(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """CIFAR-10 from the official archive, prepared as array_record without TensorFlow.

    Same features as TFDS's builder (``id``, ``image``, ``label``), examples in the archive's order.
    Pass ``archive_path`` to prepare; reading prepared data needs nothing.
    """

    # Not TFDS's 3.0.2: data that TFDS's builder prepared (TFRecord, shuffled) lives in another directory.
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "flax-resnet: from the official archive, array_record, archive order."}

    def __init__(
        self,
        *,
        archive_path: str | os.PathLike[str] | None = None,
        skip_checksum: bool = False,
        file_format: str | None = "array_record",
        **kwargs: Any,
    ) -> None:
        self._archive_path = None if archive_path is None else Path(archive_path)
        self._skip_checksum = skip_checksum
        super().__init__(file_format=file_format, **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="CIFAR-10: 60,000 32x32 colour images in 10 classes (50,000 train, 10,000 test).",
            features=tfds.features.FeaturesDict(
                {
                    "id": tfds.features.Text(),
                    "image": tfds.features.Image(shape=IMAGE_SHAPE),
                    "label": tfds.features.ClassLabel(names=CLASS_NAMES),
                }
            ),
            supervised_keys=("image", "label"),
            # Keep the archive's order (data_batch_1..5, test_batch) instead of TFDS's hash shuffle.
            disable_shuffling=True,
            homepage="https://www.cs.toronto.edu/~kriz/cifar.html",
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Iterator[Any]]:
        del dl_manager  # we never download: TFDS's downloader retries for minutes when offline
        if self._archive_path is None:
            raise DataError(
                "the flax-resnet cifar10 builder prepares from a local archive: pass archive_path= "
                f"(the official {BINARY.filename} or {PYTHON.filename}), or use "
                "flax_resnet.data.load_cifar10, which can also download it"
            )
        if not self._archive_path.is_file():
            raise DataError(f"archive {self._archive_path} does not exist")
        if not self._skip_checksum:
            verify_md5(self._archive_path)
        splits = read_archive(self._archive_path)
        return {name: self._generate_examples(name, *split) for name, split in splits.items()}

    def _generate_examples(self, split: str, images: np.ndarray, labels: np.ndarray) -> Iterator[Any]:
        for index, (image, label) in enumerate(zip(images, labels, strict=True)):
            yield index, {"id": f"{split}_{index:05d}", "image": encode_png(image), "label": int(label)}
