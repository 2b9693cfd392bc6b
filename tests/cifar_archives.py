"""Tiny CIFAR-10 archives in both official formats, for tests that must not touch the network.

The layouts follow https://www.cs.toronto.edu/~kriz/cifar.html: cifar-10-binary.tar.gz holds
cifar-10-batches-bin/{data_batch_1..5,test_batch}.bin (records of 1 label byte + 3072 bytes: R, G, B planes
of 32x32, row-major); cifar-10-python.tar.gz holds cifar-10-batches-py/{data_batch_1..5,test_batch}, pickled
dicts with b'data' ((N, 3072) uint8, same plane layout) and b'labels' (list of int).
"""

from __future__ import annotations

import io
import pickle
import tarfile
from pathlib import Path

import numpy as np

CLASS_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
BATCH_NAMES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",)
FOLDERS = {"binary": "cifar-10-batches-bin", "python": "cifar-10-batches-py"}

Split = tuple[np.ndarray, np.ndarray]


def random_batches(per_batch: int = 7, num_test: int = 5, seed: int = 0) -> dict[str, Split]:
    """Random uint8 NHWC images and labels 0..9 for data_batch_1..5 and test_batch."""
    rng = np.random.default_rng(seed)
    sizes = [per_batch] * 5 + [num_test]
    return {
        name: (rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, n).astype(np.int32))
        for name, n in zip(BATCH_NAMES, sizes, strict=True)
    }


def expected_splits(batches: dict[str, Split]) -> dict[str, Split]:
    """What a loader must return for `batches`: train = data_batch_1..5 concatenated in order, test as is."""
    train = [batches[name] for name in BATCH_NAMES[:5]]
    return {
        "train": (np.concatenate([b[0] for b in train]), np.concatenate([b[1] for b in train])),
        "test": batches["test_batch"],
    }


def nhwc_to_rows(images: np.ndarray) -> np.ndarray:
    """(N, 32, 32, 3) -> (N, 3072) rows of R, G, B planes, as in the official files."""
    return images.transpose(0, 3, 1, 2).reshape(len(images), -1)


def binary_batch(images: np.ndarray, labels: np.ndarray) -> bytes:
    rows = np.concatenate([labels.astype(np.uint8)[:, None], nhwc_to_rows(images)], axis=1)
    return rows.tobytes()


def python_batch(images: np.ndarray, labels: np.ndarray, name: str = "batch") -> bytes:
    batch = {
        b"batch_label": name.encode(),
        b"labels": [int(label) for label in labels],
        b"data": nhwc_to_rows(images),
        b"filenames": [f"img_{i}.png".encode() for i in range(len(labels))],
    }
    # Like the official files (pickled by Python 2 with numpy 1): protocol 2, numpy.core module path.
    return pickle.dumps(batch, protocol=2).replace(b"numpy._core.multiarray", b"numpy.core.multiarray")


def batch_files(kind: str, batches: dict[str, Split]) -> dict[str, bytes]:
    """The archive's members (path -> content) for `batches` in format `kind` ("binary" or "python")."""
    folder = FOLDERS[kind]
    if kind == "binary":
        files = {f"{folder}/{name}.bin": binary_batch(*batches[name]) for name in BATCH_NAMES}
        files[f"{folder}/batches.meta.txt"] = ("\n".join(CLASS_NAMES) + "\n").encode()
    else:
        files = {f"{folder}/{name}": python_batch(*batches[name], name=name) for name in BATCH_NAMES}
        meta = {b"label_names": [n.encode() for n in CLASS_NAMES], b"num_vis": 3072}
        files[f"{folder}/batches.meta"] = pickle.dumps(meta, protocol=2)
    files[f"{folder}/readme.html"] = b"<html>test archive</html>"
    return files


def write_tar(path: str | Path, files: dict[str, bytes]) -> Path:
    """A .tar.gz holding `files` (path -> content), with the folder entries an official archive has."""
    path = Path(path)
    with tarfile.open(path, "w:gz") as tar:
        for folder in sorted({name.split("/", 1)[0] for name in files if "/" in name}):
            info = tarfile.TarInfo(folder)
            info.type = tarfile.DIRTYPE
            info.mode = 0o755
            tar.addfile(info)
        for name, content in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(content))
    return path


def write_archive(path: str | Path, kind: str, batches: dict[str, Split]) -> Path:
    """A tiny official-format archive: `kind` "binary" (cifar-10-binary.tar.gz) or "python"."""
    return write_tar(path, batch_files(kind, batches))


def truncate(path: str | Path, keep_fraction: float = 0.5) -> Path:
    """Cuts the file short, like an interrupted download."""
    path = Path(path)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep_fraction)])
    return path
