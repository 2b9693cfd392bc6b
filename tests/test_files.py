"""flax_resnet.files: the one atomic write (a target old or new, never half; no temporary left; the umask's mode;
the checkpoint store's fsyncs)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from flax_resnet import files, store


@pytest.fixture
def umask_027() -> Iterator[int]:
    """A umask other than the usual 022, so that a mode that merely happens to be 0644 cannot pass."""
    old = os.umask(0o027)
    try:
        yield 0o027
    finally:
        os.umask(old)


def mode_of(path: Path) -> int:
    return path.stat().st_mode & 0o7777


def test_the_target_is_replaced_by_a_rename_not_rewritten_in_place(tmp_path):
    target = tmp_path / "history.json"
    target.write_text("old")
    with target.open() as reader:  # a reader that opened the old file keeps reading it whole
        with files.atomic_path(target) as tmp:
            tmp.write_text("new")
            assert target.read_text() == "old"  # nothing of the new data is visible before the rename
        assert reader.read() == "old"
    assert target.read_text() == "new"
    assert os.listdir(tmp_path) == ["history.json"]


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, error):
    target = tmp_path / "curves.png"
    target.write_bytes(b"old")
    with pytest.raises(type(error)), files.atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise error
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["curves.png"]

    new = tmp_path / "new.json"
    with pytest.raises(ValueError, match="not JSON"), files.atomic_path(new) as tmp:
        raise ValueError("not JSON")
    assert os.listdir(tmp_path) == ["curves.png"]


def test_the_mode_is_the_umasks_whatever_the_writer_made(tmp_path, umask_027):
    """safetensors 0.8's save_file writes its own temporary (0600) and renames it onto the path it is given: the
    port's .safetensors came out 0600 while its .pt followed the umask. Both follow it now."""
    import safetensors.numpy

    own = tmp_path / "w.safetensors"
    with files.atomic_path(own) as tmp:
        safetensors.numpy.save_file({"w": np.ones(2, np.float32)}, tmp)
    assert mode_of(own) == 0o666 & ~umask_027 == 0o640
    assert mode_of(files.write_atomic(tmp_path / "a.json", "{}")) == 0o640
    assert mode_of(files.write_atomic(tmp_path / "a.json", "{}", mode=0o600)) == 0o600  # when the caller asks


def test_port_writes_safetensors_and_pt_with_the_umasks_mode(tmp_path, umask_027):
    from flax_resnet import builders, weights

    model = builders.build_flax_to_fill("SimpleResNet", {"n_blocks": 1})
    assert mode_of(weights.save(model, tmp_path / "w.safetensors")) == 0o640
    pytest.importorskip("torch")
    assert mode_of(weights.save(model, tmp_path / "w.pt")) == 0o640
    assert sorted(os.listdir(tmp_path)) == ["w.pt", "w.safetensors"]


def test_a_stale_temporary_is_replaced_but_a_directory_in_the_way_is_left(tmp_path):
    target = tmp_path / "w.pt"
    (tmp_path / ".w.pt.tmp").write_bytes(b"from a crashed write")
    files.write_atomic(target, b"new")
    assert target.read_bytes() == b"new" and os.listdir(tmp_path) == ["w.pt"]

    (tmp_path / ".w.pt.tmp").mkdir()  # not a temporary this helper made: an error, and it stays
    with pytest.raises(IsADirectoryError):
        files.write_atomic(target, b"newer")
    assert target.read_bytes() == b"new" and (tmp_path / ".w.pt.tmp").is_dir()


def test_unique_temporaries_differ_and_are_those_the_store_sweeps():
    names = {files.temporary_name("epoch_0003", unique=True) for _ in range(3)}
    assert len(names) == 3 and all(store._TMP_DIR.match(name) for name in names)
    assert files.temporary_name("w.pt") == ".w.pt.tmp"


def test_a_directory_never_replaces_a_checkpoint_that_appeared_meanwhile(tmp_path):
    target = tmp_path / "epoch_0001"
    with files.atomic_path(target, directory=True, unique=True) as tmp:
        (tmp / "a").write_text("first")
    with pytest.raises(OSError), files.atomic_path(target, directory=True, unique=True) as tmp:
        (tmp / "a").write_text("second")
    assert (target / "a").read_text() == "first" and os.listdir(tmp_path) == ["epoch_0001"]


def test_fsync_flushes_the_temporary_before_and_the_directory_after_the_rename(tmp_path, monkeypatch):
    """What the checkpoint store relies on to survive a power cut: the files (its own fsyncs), the temporary
    directory, the rename, the store's directory, in that order."""
    synced: list[tuple[str, bool]] = []
    real = files.fsync_path

    def record(path: os.PathLike[str]) -> None:
        synced.append((Path(path).name, (tmp_path / "ckpt" / "epoch_0001").exists()))
        real(path)

    monkeypatch.setattr(files, "fsync_path", record)
    files.write_atomic(tmp_path / "plain.json", "{}")
    assert synced == []  # only where asked for (a history or a figure is rewritten every epoch)
    files.write_atomic(tmp_path / "synced.json", "{}", fsync=True)
    assert [name for name, _ in synced] == [".synced.json.tmp", tmp_path.name]

    synced.clear()
    store.CheckpointStore(tmp_path / "ckpt").save(1, {"w": np.ones(3, np.float32)}, {"epoch": 1})
    names = [name for name, _ in synced]
    assert names[0] == tmp_path.name  # the new store directory's entry in its parent
    assert store._TMP_DIR.match(names[1]) and not synced[1][1]  # the temporary, before the rename
    assert synced[2] == ("ckpt", True)  # the store's directory, after it
