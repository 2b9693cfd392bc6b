"""A TFDS builder for CIFAR-10 that needs no TensorFlow (TFDS's own ``cifar10`` needs TF to prepare its data).

It reads an official archive (binary or python-pickle) with :mod:`tarfile`, encodes the images with Pillow and
writes array_record files under ``data_dir/cifar10/1.0.0``, which the instance's ``as_data_source()`` reads. It is
unregistered, so TFDS's name ``cifar10`` stays TFDS's own builder. It never downloads: ``flax_resnet.data.cifar10``
hands it the archive, and is the only importer of this module (which imports the optional tensorflow_datasets).
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

RECORD_PIXELS = 32 * 32 * 3
CLASS_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"


@dataclasses.dataclass(frozen=True)
class ArchiveSpec:
    """One official CIFAR-10 archive: its format, name, md5, and the folder its batch files are in."""

    kind: str  # "binary" (data_batch_1.bin, ...: label byte + 3072 pixel bytes per record) or "python" (pickles)
    filename: str
    md5: str
    folder: str


BINARY = ArchiveSpec("binary", "cifar-10-binary.tar.gz", "c32a1d4ab5d03f1284b67883e8d87530", "cifar-10-batches-bin")
PYTHON = ArchiveSpec("python", "cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a", "cifar-10-batches-py")
ARCHIVES = (BINARY, PYTHON)

Split = tuple[np.ndarray, np.ndarray]  # (uint8 images or (N, 3072) records, integer labels)


def md5sum(path: str | os.PathLike[str]) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "md5").hexdigest()


def verify_md5(path: str | os.PathLike[str]) -> None:
    """DataError unless `path` is an official archive, byte for byte (a truncated download or another file must not
    become "CIFAR-10")."""
    actual = md5sum(path)
    if actual in {spec.md5 for spec in ARCHIVES}:
        return
    raise DataError(f"{path}: md5 {actual} matches no official CIFAR-10 archive (truncated, corrupt or not "
                    "CIFAR-10). Download it again, or pass --skip-checksum (skip_checksum=True in Python) for a "
                    "deliberate test archive.")


def _parse_binary(raw: bytes, where: str) -> Split:
    """(N, 3072) uint8 rows and N labels; both parsers return at least one record."""
    record = 1 + RECORD_PIXELS
    if not raw or len(raw) % record:
        raise DataError(f"{where}: {len(raw)} bytes is not a whole number of {record}-byte CIFAR-10 records")
    rows = np.frombuffer(raw, dtype=np.uint8).reshape(-1, record)
    return rows[:, 1:], rows[:, 0]


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles a CIFAR-10 batch and nothing else: pickle can run code, so only the globals a batch file
    needs (numpy array reconstruction, and `_codecs.encode` for bytes pickled by Python 3) are allowed."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR-10 batch")
        return super().find_class(module.replace("numpy.core.", "numpy._core."), name)  # numpy 2's name


def _parse_pickle(raw: bytes, where: str) -> Split:
    try:
        # The official batches were pickled by Python 2: their str keys and data load as bytes.
        batch = _BatchUnpickler(io.BytesIO(raw), encoding="bytes").load()
        data, labels = np.asarray(batch[b"data"]), np.asarray(batch[b"labels"])
    except Exception as e:  # a damaged pickle or a missing key can raise nearly anything
        raise DataError(f"{where}: not a CIFAR-10 batch, a dict with b'data' and b'labels' ({type(e).__name__}: "
                        f"{e})") from e
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != RECORD_PIXELS or not len(data):
        raise DataError(f"{where}: b'data' must be (N, {RECORD_PIXELS}) uint8, got {data.shape} {data.dtype}")
    if labels.shape != (len(data),) or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{where}: b'labels' must be {len(data)} integers, got {labels.shape} {labels.dtype}")
    return data, labels


def read_archive(path: str | os.PathLike[str]) -> dict[str, Split]:
    """An official CIFAR-10 archive (either format) as {"train": data_batch_1..5 in order, "test": test_batch},
    all read and checked before anything is written, so a bad archive fails here with DataError."""
    try:
        with tarfile.open(path, "r:*") as tar:
            members = {m.name.removeprefix("./"): m for m in tar.getmembers() if m.isfile()}
            spec = next((s for s in ARCHIVES if any(n.startswith(s.folder + "/") for n in members)), None)
            if spec is None:
                raise DataError(f"{path}: not a CIFAR-10 archive (no folder {BINARY.folder}/ or {PYTHON.folder}/ "
                                "inside)")
            parse, suffix = (_parse_binary, ".bin") if spec.kind == "binary" else (_parse_pickle, "")
            batches: list[Split] = []
            for name in (*TRAIN_BATCHES, TEST_BATCH):
                member_name = f"{spec.folder}/{name}{suffix}"
                where = f"{path}:{member_name}"
                member = members.get(member_name)
                if member is None:
                    raise DataError(f"{where} is missing from the {spec.kind} archive")
                data, labels = parse(tar.extractfile(member).read(), where)  # a regular file
                if labels.min() < 0 or labels.max() >= len(CLASS_NAMES):
                    raise DataError(f"{where}: labels outside 0..9 (min {labels.min()}, max {labels.max()})")
                batches.append((data, labels))
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        raise DataError(f"{path}: cannot read the archive, truncated or not a tar.gz ({e})") from e
    rows = np.concatenate([data for data, _ in batches])  # R, G, B planes, each 32x32 row-major
    images = np.ascontiguousarray(rows.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    labels = np.concatenate([y for _, y in batches]).astype(np.int64)
    n = len(batches[-1][1])  # test_batch comes last
    return {"train": (images[:-n], labels[:-n]), "test": (images[-n:], labels[-n:])}


def encode_png(image: np.ndarray) -> bytes:
    """PNG bytes via Pillow: tfds.features.Image encodes numpy arrays with TensorFlow, but takes bytes as is."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


class Cifar10(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """CIFAR-10 from the official ``archive_path`` (to prepare; reading needs none) as array_record: TFDS's
    features (``id``, ``image``, ``label``), examples in the archive's order."""

    # Not TFDS's 3.0.2: data that TFDS's builder prepared (TFRecord, shuffled) lives in another directory.
    VERSION = tfds.core.Version("1.0.0")

    def __init__(self, *, archive_path: str | os.PathLike[str] | None = None, skip_checksum: bool = False,
                 **kwargs: Any) -> None:
        self._archive_path = None if archive_path is None else Path(archive_path)
        self._skip_checksum = skip_checksum
        super().__init__(file_format="array_record", **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        features = {"id": tfds.features.Text(), "image": tfds.features.Image(shape=(32, 32, 3)),
                    "label": tfds.features.ClassLabel(names=CLASS_NAMES)}
        return tfds.core.DatasetInfo(
            builder=self, features=tfds.features.FeaturesDict(features), supervised_keys=("image", "label"),
            disable_shuffling=True)  # the archive's order (data_batch_1..5, test_batch), not TFDS's hash shuffle

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Iterator[Any]]:
        del dl_manager  # never used: TFDS's downloader retries for minutes when offline (cifar10._download fetches)
        if not self._skip_checksum:
            verify_md5(self._archive_path)
        return {name: self._generate_examples(name, *split) for name, split in read_archive(self._archive_path).items()}

    def _generate_examples(self, split: str, images: np.ndarray, labels: np.ndarray) -> Iterator[Any]:
        for index, (image, label) in enumerate(zip(images, labels, strict=True)):
            yield index, {"id": f"{split}_{index:05d}", "image": encode_png(image), "label": int(label)}
