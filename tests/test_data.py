"""The data layer: CIFAR-10 through our TFDS builder (no TensorFlow, no network) and the synthetic data set."""

from __future__ import annotations

import dataclasses
import io
import os
import pickle
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import cifar_archives as ca
import numpy as np
import pytest

from flax_resnet import data
from flax_resnet.config import DataConfig
from flax_resnet.data import DataError, Dataset, cifar10

REPO = Path(__file__).resolve().parents[1]


def closed_port() -> int:
    """A local TCP port nobody listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests never touch the network: the source is a closed local port and urlopen fails loudly."""
    monkeypatch.setattr(cifar10, "SOURCE_HOST", "127.0.0.1")
    monkeypatch.setattr(cifar10, "SOURCE_PORT", closed_port())

    def no_urlopen(*args: object, **kwargs: object) -> None:
        raise AssertionError("a test tried to download")

    monkeypatch.setattr(urllib.request, "urlopen", no_urlopen)


@pytest.fixture
def batches() -> dict[str, ca.Split]:
    return ca.random_batches(per_batch=7, num_test=5, seed=0)


def assert_matches(ds: Dataset, batches: dict[str, ca.Split]) -> None:
    """Every pixel and label, in the archive's order (data_batch_1..5, then test_batch)."""
    expected = ca.expected_splits(batches)
    assert ds.train_images.dtype == np.uint8 and ds.test_images.dtype == np.uint8
    assert ds.train_labels.dtype == np.int32 and ds.test_labels.dtype == np.int32
    assert ds.num_classes == 10
    np.testing.assert_array_equal(ds.train_images, expected["train"][0])
    np.testing.assert_array_equal(ds.train_labels, expected["train"][1])
    np.testing.assert_array_equal(ds.test_images, expected["test"][0])
    np.testing.assert_array_equal(ds.test_labels, expected["test"][1])


def nothing_prepared(data_dir: Path) -> bool:
    """No dataset, no incomplete directory, no temporary download left in `data_dir`."""
    return not data_dir.exists() or not [p for p in data_dir.rglob("*") if p.is_file() or "cifar10" in p.name]


# ------------------------------------------------------------------------------------------ archive -> Dataset


@pytest.mark.parametrize("kind", ["binary", "python"])
def test_archive_end_to_end(tmp_path: Path, batches: dict[str, ca.Split], kind: str) -> None:
    archive = ca.write_archive(tmp_path / f"{kind}.tar.gz", kind, batches)
    ds = data.load_cifar10(tmp_path / "data", archive=archive, skip_checksum=True)
    assert ds.train_images.shape == (35, 32, 32, 3) and ds.test_images.shape == (5, 32, 32, 3)
    assert_matches(ds, batches)
    assert "tensorflow" not in sys.modules


def test_prepared_data_is_reused(tmp_path: Path, batches: dict[str, ca.Split]) -> None:
    archive = ca.write_archive(tmp_path / "a.tar.gz", "binary", batches)
    data.load_cifar10(tmp_path / "data", archive=archive, skip_checksum=True)
    assert_matches(data.load_cifar10(tmp_path / "data", archive=archive), batches)  # the same archive again
    archive.unlink()
    # Neither the archive nor the network is needed now; an archive given must exist (see the test below).
    assert_matches(data.load_cifar10(tmp_path / "data", download=False), batches)
    with pytest.raises(DataError, match="gone.tar.gz: no such file"):
        data.load_cifar10(tmp_path / "data", archive=tmp_path / "gone.tar.gz")
    assert_matches(data.load_dataset("cifar10", data_dir=tmp_path / "data"), batches)


def test_another_archive_for_prepared_data_is_refused_naming_the_prepared_data(
    tmp_path: Path, batches: dict[str, ca.Split], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Training on the old data while the user named another archive went unnoticed. Two official archives (the
    binary and the python one) hold the same images, so either one fits data prepared from the other."""
    from flax_resnet.data import cifar10_builder as cb

    first = ca.write_archive(tmp_path / "first.tar.gz", "binary", batches)
    other = ca.write_archive(tmp_path / "other.tar.gz", "python", ca.random_batches(per_batch=7, num_test=5, seed=1))
    data.load_cifar10(tmp_path / "data", archive=first, skip_checksum=True)
    with pytest.raises(DataError) as caught:
        data.load_cifar10(tmp_path / "data", archive=other, skip_checksum=True)
    message = " ".join(str(caught.value).split())
    assert f"already prepared in {tmp_path / 'data' / 'cifar10'}" in message and "Remove" in message
    assert str(other) in message
    official = (cb.ArchiveSpec(**{**cb.BINARY.__dict__, "md5": cb.md5sum(first)}),
                cb.ArchiveSpec(**{**cb.PYTHON.__dict__, "md5": cb.md5sum(other)}))
    monkeypatch.setattr(cb, "ARCHIVES", official)
    assert_matches(data.load_cifar10(tmp_path / "data", archive=other), batches)


@pytest.mark.parametrize(("option", "field", "have"), [("--train-samples", "train_samples", 35),
                                                       ("--test-samples", "test_samples", 5)])
def test_more_samples_than_prepared_are_refused_naming_the_size(
    tmp_path: Path, batches: dict[str, ca.Split], option: str, field: str, have: int
) -> None:
    archive = ca.write_archive(tmp_path / "a.tar.gz", "binary", batches)
    config = DataConfig(data_dir=tmp_path / "data", archive=archive, skip_checksum=True)
    assert len(data.load(dataclasses.replace(config, **{field: have})).train_labels) == 35  # all of them: fine
    with pytest.raises(DataError, match=f"{option} {have + 1} is more than the {have} "):
        data.load(dataclasses.replace(config, **{field: have + 1}))


def test_checksum_mismatch_raises(tmp_path: Path, batches: dict[str, ca.Split]) -> None:
    archive = ca.write_archive(tmp_path / "a.tar.gz", "python", batches)
    with pytest.raises(DataError, match="md5"):
        data.load_cifar10(tmp_path / "data", archive=archive)
    assert nothing_prepared(tmp_path / "data")


def test_matching_checksum_is_accepted(
    tmp_path: Path, batches: dict[str, ca.Split], monkeypatch: pytest.MonkeyPatch
) -> None:
    from flax_resnet.data import cifar10_builder as cb

    archive = ca.write_archive(tmp_path / "a.tar.gz", "binary", batches)
    ours = cb.ArchiveSpec(**{**cb.BINARY.__dict__, "md5": cb.md5sum(archive)})
    monkeypatch.setattr(cb, "ARCHIVES", (ours, cb.PYTHON))
    assert_matches(data.load_cifar10(tmp_path / "data", archive=archive), batches)


def bad_archives(batches: dict[str, ca.Split]) -> dict[str, dict[str, bytes] | str]:
    binary = ca.batch_files("binary", batches)
    python = ca.batch_files("python", batches)
    short_record = dict(binary)
    batch_3 = "cifar-10-batches-bin/data_batch_3.bin"
    short_record[batch_3] = binary[batch_3][:-1]
    bad_label = dict(binary)
    raw = bytearray(binary["cifar-10-batches-bin/test_batch.bin"])
    raw[0] = 10
    bad_label["cifar-10-batches-bin/test_batch.bin"] = bytes(raw)
    missing_file = {k: v for k, v in binary.items() if not k.endswith("data_batch_5.bin")}
    missing_key = dict(python)
    missing_key["cifar-10-batches-py/data_batch_2"] = pickle.dumps({b"data": batches["data_batch_2"][0]})
    evil = dict(python)
    evil["cifar-10-batches-py/test_batch"] = pickle.dumps(os.system, protocol=2)
    garbage = dict(python)
    garbage["cifar-10-batches-py/data_batch_1"] = b"\x80\x02not a pickle"
    return {
        "truncated": "truncate",
        "other tar": {"mnist/train-images": b"\x00" * 100},
        "record length": short_record,
        "label 10": bad_label,
        "missing batch": missing_file,
        "pickle missing key": missing_key,
        "pickle with a foreign global": evil,
        "pickle garbage": garbage,
    }


@pytest.mark.parametrize("case", list(bad_archives(ca.random_batches(1, 1))))
def test_bad_archive_leaves_nothing_and_retry_works(tmp_path: Path, batches: dict[str, ca.Split], case: str) -> None:
    bad = tmp_path / "bad.tar.gz"
    content = bad_archives(batches)[case]
    if content == "truncate":
        ca.truncate(ca.write_archive(bad, "binary", batches), 0.6)
    else:
        ca.write_tar(bad, content)
    data_dir = tmp_path / "data"
    with pytest.raises(DataError):
        data.load_cifar10(data_dir, archive=bad, skip_checksum=True)
    assert nothing_prepared(data_dir)
    with pytest.raises(DataError, match="downloading is off"):
        data.load_cifar10(data_dir, download=False)
    good = ca.write_archive(tmp_path / "good.tar.gz", "python", batches)
    assert_matches(data.load_cifar10(data_dir, archive=good, skip_checksum=True), batches)


def test_failure_while_writing_leaves_nothing(
    tmp_path: Path, batches: dict[str, ca.Split], monkeypatch: pytest.MonkeyPatch
) -> None:
    from flax_resnet.data import cifar10_builder as cb

    calls = {"n": 0}
    encode = cb.encode_png

    def failing_encode(image: np.ndarray) -> bytes:
        calls["n"] += 1
        if calls["n"] == 20:
            raise OSError("disk full (simulated)")
        return encode(image)

    monkeypatch.setattr(cb, "encode_png", failing_encode)
    archive = ca.write_archive(tmp_path / "a.tar.gz", "binary", batches)
    with pytest.raises(DataError, match="disk full"):
        data.load_cifar10(tmp_path / "data", archive=archive, skip_checksum=True)
    assert nothing_prepared(tmp_path / "data")
    monkeypatch.setattr(cb, "encode_png", encode)
    assert_matches(data.load_cifar10(tmp_path / "data", archive=archive, skip_checksum=True), batches)


def test_missing_archive_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        data.load_cifar10(tmp_path / "data", archive=tmp_path / "nope.tar.gz")


# ------------------------------------------------------------------------------------------ download / offline


def test_offline_fails_fast_naming_the_fix(tmp_path: Path) -> None:
    start = time.monotonic()
    with pytest.raises(DataError, match="--archive") as err:
        data.load_cifar10(tmp_path / "data", connect_timeout=2.0)
    assert time.monotonic() - start < 10
    assert "cifar-10-binary.tar.gz" in str(err.value) and "--data-dir" in str(err.value)
    assert nothing_prepared(tmp_path / "data")


def test_offline_with_a_damaged_cached_download_says_so(tmp_path: Path) -> None:
    """A cached archive with a wrong md5 is not used; offline, the error names it (it would be fetched again)."""
    cached = tmp_path / "data" / "downloads" / "cifar-10-binary.tar.gz"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"cut short")
    with pytest.raises(DataError, match="md5 is wrong") as err:
        data.load_cifar10(tmp_path / "data", connect_timeout=2.0)
    assert str(cached) in str(err.value) and "--archive" in str(err.value)


def test_connect_check_is_bounded_even_if_resolution_hangs(monkeypatch: pytest.MonkeyPatch) -> None:
    release = threading.Event()

    def hang(*args: object, **kwargs: object) -> None:
        release.wait(30)  # a resolver that never answers; released at the end so the thread ends cleanly
        raise OSError("resolution abandoned by the test")

    monkeypatch.setattr(socket, "create_connection", hang)
    start = time.monotonic()
    try:
        assert not cifar10.source_answers("www.example.invalid", 443, timeout=0.1)
        assert time.monotonic() - start < 2
    finally:
        release.set()


def test_download_false_without_data_raises(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="--archive"):
        data.load_cifar10(tmp_path / "data", download=False)


class FakeResponse(io.BytesIO):
    def __init__(self, payload: bytes) -> None:
        super().__init__(payload)
        self.headers = {"Content-Length": str(len(payload))}


@pytest.fixture
def fake_source(tmp_path: Path, batches: dict[str, ca.Split], monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The source 'answers' and serves a tiny binary archive; returns the list of fetched URLs."""
    payload = ca.write_archive(tmp_path / "served.tar.gz", "binary", batches).read_bytes()
    fetched: list[str] = []

    def urlopen(url: str, timeout: float) -> FakeResponse:
        fetched.append(url)
        return FakeResponse(payload)

    monkeypatch.setattr(cifar10, "source_answers", lambda host, port, timeout: True)
    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    return fetched


def test_download_prepares_and_keeps_archive(
    tmp_path: Path, batches: dict[str, ca.Split], fake_source: list[str]
) -> None:
    ds = data.load_cifar10(tmp_path / "data", skip_checksum=True)
    assert_matches(ds, batches)
    assert fake_source == ["https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"]
    downloads = tmp_path / "data" / "downloads"
    assert [p.name for p in downloads.iterdir()] == ["cifar-10-binary.tar.gz"]


def test_download_with_wrong_md5_is_discarded(tmp_path: Path, fake_source: list[str]) -> None:
    with pytest.raises(DataError, match="md5"):
        data.load_cifar10(tmp_path / "data")
    assert len(fake_source) == 1
    assert nothing_prepared(tmp_path / "data")


# ------------------------------------------------------------------------------------------ TFDS plumbing


def test_reading_path_under_tfds_mock_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import tensorflow_datasets as tfds
    from tensorflow_datasets.core.data_sources import base

    # TFDS 4.9.10's mock sets `__getitems__` on a MagicMock as a plain attribute, so it is called without
    # `self` and fails; batched reads are covered by the archive tests, so read one by one here.
    monkeypatch.setattr(base.BaseDataSource, "__getitems__", lambda self, keys: [self[k] for k in keys])
    with tfds.testing.mock_data(num_examples=6):
        ds = cifar10._read_prepared(tmp_path / "never-prepared")
    assert ds.train_images.shape == ds.test_images.shape == (6, 32, 32, 3)
    assert ds.train_labels.dtype == np.int32
    assert ((0 <= ds.train_labels) & (ds.train_labels < 10)).all()


def test_reading_does_not_go_through_tfds_registry(tmp_path: Path, batches: dict[str, ca.Split]) -> None:
    """Our builder stays unregistered: TFDS's name "cifar10" is TFDS's own builder (whose lookup imports all of
    TFDS's builders), and prepared data is still read, through our builder instance."""
    import tensorflow_datasets as tfds

    from flax_resnet.data.cifar10_builder import Cifar10

    archive = ca.write_archive(tmp_path / "a.tar.gz", "binary", batches)
    data.load_cifar10(tmp_path / "data", archive=archive, skip_checksum=True)
    assert (tmp_path / "data" / "cifar10" / "1.0.0").is_dir()
    assert Cifar10.name == "cifar10" and tfds.builder_cls("cifar10") is not Cifar10
    assert_matches(data.load_cifar10(tmp_path / "data", download=False), batches)


def test_import_does_not_import_tfds() -> None:
    code = ("import sys, flax_resnet.data; assert 'tensorflow_datasets' not in sys.modules, 'tfds imported'; "
            "assert 'flax_resnet.data.cifar10_builder' not in sys.modules, 'builder imported'")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, env=env)


# ------------------------------------------------------------------------------------------ synthetic


def nearest_class_mean_accuracy(ds: Dataset) -> float:
    x = ds.train_images.reshape(len(ds.train_images), -1).astype(np.float32)
    means = np.stack([x[ds.train_labels == c].mean(0) for c in range(ds.num_classes)])
    t = ds.test_images.reshape(len(ds.test_images), -1).astype(np.float32)
    distances = (t**2).sum(1)[:, None] - 2 * t @ means.T + (means**2).sum(1)[None]
    return float((distances.argmin(1) == ds.test_labels).mean())


def test_synthetic_shapes_and_determinism() -> None:
    ds = data.synthetic_dataset(num_train=200, num_test=50, seed=3)
    assert ds.train_images.shape == (200, 32, 32, 3) and ds.train_images.dtype == np.uint8
    assert ds.test_images.shape == (50, 32, 32, 3) and ds.test_labels.dtype == np.int32
    assert np.bincount(ds.train_labels, minlength=10).tolist() == [20] * 10
    again = data.synthetic_dataset(num_train=200, num_test=50, seed=3)
    other = data.synthetic_dataset(num_train=200, num_test=50, seed=4)
    np.testing.assert_array_equal(ds.train_images, again.train_images)
    np.testing.assert_array_equal(ds.test_labels, again.test_labels)
    assert not np.array_equal(ds.train_images, other.train_images)
    small = data.load_dataset("synthetic", num_train=20, num_test=10, image_size=16)
    assert small.train_images.shape == (20, 16, 16, 3)


def test_synthetic_is_learnable_but_not_from_mean_colour() -> None:
    ds = data.synthetic_dataset(num_train=1000, num_test=500, seed=0)
    assert nearest_class_mean_accuracy(ds) > 0.5  # chance is 0.1
    # The class is in the spatial pattern: the mean colour alone is about chance.
    colour = Dataset(
        ds.train_images.mean((1, 2), keepdims=True).astype(np.uint8),
        ds.train_labels,
        ds.test_images.mean((1, 2), keepdims=True).astype(np.uint8),
        ds.test_labels,
    )
    assert nearest_class_mean_accuracy(colour) < 0.25


def test_load_dataset_rejects_unknown_name() -> None:
    with pytest.raises(ValueError, match="cifar10"):
        data.load_dataset("imagenet")
