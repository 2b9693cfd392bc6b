"""One checkpoint store for every framework: NumPy arrays in a safetensors file plus JSON metadata, per step (step 0:
``port``'s weights-only checkpoints).

    epoch_0003/arrays.safetensors   every array of the state, by name (``flax_resnet._codecs`` names them)
    epoch_0003/meta.json            {"format": ..., "version": 1, "step": 3,
                                     "arrays": {"sha256": ..., "bytes": ...}, "meta": <the caller's metadata>}

Not orbax: on a full disk it printed hundreds of lines and left partial temporary directories; here a failed save is
one ``CheckpointError``, nothing printed, nothing left, and saving is faster (0.20 s against 0.50 s; docs/design.md,
Training). The writer (process 0) writes both files into a hidden temporary directory, ``fsync``s them and renames it
into place, then every process meets at ``barrier``: a crash leaves a whole checkpoint or a hidden temporary
directory (swept by the next save). Reading checks the SHA-256 and size ``meta.json`` records. Importing this module
changes nothing global (no logging filters, hooks or warning filters).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import secrets
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.numpy

from flax_resnet import files
from flax_resnet.errors import FlaxResnetError

__all__ = ["ARRAYS_FILE", "CHECKPOINT_SUBDIR", "CheckpointError", "CheckpointStore", "FORMAT", "FORMAT_VERSION",
           "META_FILE", "UNREADABLE_SUFFIX", "UnreadableCheckpoint", "resolve"]

CHECKPOINT_SUBDIR = "checkpoints"  # a run's output directory keeps its checkpoints here
UNREADABLE_SUFFIX = ".unreadable"  # unreadable checkpoints are moved to <directory>.unreadable/
ARRAYS_FILE = "arrays.safetensors"
META_FILE = "meta.json"
FORMAT = "flax-resnet-checkpoint"  # the marker that tells this store's checkpoints from anything else
FORMAT_VERSION = 1

_STEP_DIR = re.compile(r"^epoch_(\d{4}|[1-9]\d{4,})$")  # exactly the names ``CheckpointStore.path`` gives
# the temporaries of ``files.temporary_name(..., unique=True)`` (saves) and of ``_remove_checkpoint``
_TMP_DIR = re.compile(r"^\.epoch_\d{4,}\.(tmp|old)-[0-9]+-[0-9a-f]+$")
# The dtypes safetensors' NumPy loader knows. ml_dtypes' of 1, 2, 4 or 8 bytes (bfloat16, the float8 types) are
# stored as unsigned integers of the same size and viewed back on reading (``_VIEWS``).
_LOADABLE = {np.dtype(t) for t in (np.float64, np.float32, np.float16, np.int64, np.uint64, np.int32, np.uint32,
                                   np.int16, np.uint16, np.int8, np.uint8, np.bool_, np.complex64)}
_VIEWS = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
_NO_ROOM = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # the disk, a quota, a file size limit: the same advice


class CheckpointError(FlaxResnetError, RuntimeError):
    """No checkpoint where one was expected, one that cannot be written or read, or one that does not fit."""


class UnreadableCheckpoint(CheckpointError):
    """A checkpoint that exists but does not read back whole (``problem`` says how, on one line): the one error
    ``restore_latest_good`` sets a checkpoint aside for."""

    def __init__(self, step: int, directory: Path, problem: str) -> None:
        self.step, self.directory, self.problem = step, directory, problem
        super().__init__(f"checkpoint {step} in {directory} is unreadable: {problem}")


def resolve(path: str | Path) -> Path:
    """The checkpoint directory for ``path``: a run's output directory (its ``checkpoints/``), or ``path``."""
    path = Path(path).expanduser()
    return path / CHECKPOINT_SUBDIR if (path / CHECKPOINT_SUBDIR).is_dir() else path


def _os_words(e: OSError) -> str:
    """An OSError as the OS says it, e.g. 'No space left on device' (not Python's '[Errno 28] ...: path')."""
    return e.strerror or (os.strerror(e.errno) if e.errno else str(e))


def _write_file(path: Path, data: bytes) -> None:
    """Write a new file and ``fsync`` it (a full disk may show only at the flush or the fsync: an OSError here)."""
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _storable(name: str, value: Any) -> tuple[np.ndarray, str | None]:
    """``value`` as a C-contiguous array safetensors can store, and the dtype to view it back as (or None)."""
    array = np.asarray(value, order="C")  # (np.ascontiguousarray would make a 0-d array 1-d)
    if not array.dtype.isnative:  # stored, and read back, in this machine's byte order
        array = array.astype(array.dtype.newbyteorder("="))
    if array.dtype in _LOADABLE:
        return array, None
    if array.dtype.kind != "V" or array.dtype.fields is not None or array.dtype.itemsize not in _VIEWS:
        raise TypeError(f"array {name!r} has dtype {array.dtype}, which a checkpoint cannot hold")
    return array.view(_VIEWS[array.dtype.itemsize]), array.dtype.name


def _dtype_named(name: str) -> np.dtype:
    """The NumPy dtype called ``name``; bfloat16 and the float8 types are ml_dtypes', registered on its import."""
    try:
        return np.dtype(name)
    except TypeError:
        import ml_dtypes  # JAX's own dtype package: present wherever such an array could have been made

        return np.dtype(getattr(ml_dtypes, name))


def _is_ours(path: Path) -> bool:
    """Whether the format marker opens ``path``'s meta.json or its arrays file's header (either suffices, so that a
    checkpoint with one damaged file is still recognised)."""
    for name in (META_FILE, ARRAYS_FILE):
        with contextlib.suppress(OSError), open(path / name, "rb") as f:
            if f'"{FORMAT}"'.encode() in f.read(4096):
                return True
    return False


class CheckpointStore:
    """The checkpoints of one directory. In a multi-process run every process makes one on the same (shared) directory,
    only one with ``is_writer=True``, all with the same ``barrier(name)`` (which returns once every process has
    called it with that name). Arrays are NumPy arrays keyed by any string; metadata is anything JSON can hold."""

    def __init__(self, directory: str | Path, *, max_to_keep: int | None = 3, is_writer: bool = True,
                 barrier: Callable[[str], None] | None = None) -> None:
        if max_to_keep is not None and max_to_keep < 1:  # 0 would prune every checkpoint but the newest, silently
            raise ValueError(f"max_to_keep must be at least 1 (or None to keep all), not {max_to_keep}")
        # absolute but not resolved: remove_all must see whether the directory itself is a symbolic link
        self.directory = Path(directory).expanduser().absolute()
        self.max_to_keep, self.is_writer = max_to_keep, is_writer
        self._barrier = barrier or (lambda name: None)

    # ------------------------------------------------------------------------------------------ listing
    def path(self, step: int) -> Path:
        """Where checkpoint ``step`` is (or would be)."""
        return self.directory / f"epoch_{step:04d}"

    def _entries(self) -> list[Path]:
        try:
            return sorted(self.directory.iterdir())
        except (FileNotFoundError, NotADirectoryError):  # no directory, so no checkpoints
            return []
        except OSError as e:
            raise CheckpointError(f"cannot list the checkpoints in {self.directory} ({_os_words(e)})") from e

    @property
    def steps(self) -> list[int]:
        """The steps of the checkpoints here, ascending (damaged ones included: ``read`` tells)."""
        return sorted(int(m.group(1)) for e in self._entries() if (m := _STEP_DIR.match(e.name)) and e.is_dir())

    @property
    def latest(self) -> int | None:
        return max(self.steps, default=None)

    def _step(self, step: int | None) -> int:
        steps = self.steps
        if step is None:
            if not steps:
                raise CheckpointError(f"there is no checkpoint in {self.directory}")
            return steps[-1]
        if step not in steps:
            there = ", ".join(map(str, steps)) or "none"
            raise CheckpointError(f"there is no checkpoint {step} in {self.directory} (steps there: {there})")
        return step

    # ------------------------------------------------------------------------------------------ writing
    def save(self, step: int, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> Path:
        """Write checkpoint ``step`` (``arrays`` and the JSON metadata ``meta``), then keep the newest
        ``max_to_keep`` (never pruning ``step``); returns its path. Every process calls this and meets at the
        barrier, also when the writer fails (the others cannot know: its error ends the run)."""
        if isinstance(step, bool) or not isinstance(step, int | np.integer) or step < 0:
            raise ValueError(f"a checkpoint step is an integer >= 0, not {step!r}")  # -1 would never be listed
        step = int(step)  # a NumPy integer is not JSON
        try:
            if self.is_writer:
                self._sweep()  # before the write: a stale temporary holds space the new checkpoint may need
                self._write(step, arrays, meta)
                self._prune(keep=step)
        finally:
            self._barrier(f"checkpoint-{step}")
        return self.path(step)

    def _write(self, step: int, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> None:
        # both files are made in memory first: a bad array or a value JSON cannot hold is a TypeError that leaves
        # nothing behind
        stored, views = {}, {}
        for name, value in arrays.items():
            if not isinstance(name, str) or name == "__metadata__":  # the one name safetensors' header reserves
                raise TypeError(f"an array name is a string other than '__metadata__', not {name!r}")
            stored[name], view = _storable(name, value)
            if view is not None:
                views[name] = view
        payload = safetensors.numpy.save(stored, metadata={"format": FORMAT})
        doc = {"format": FORMAT, "version": FORMAT_VERSION, "step": step,
               "arrays": {"file": ARRAYS_FILE, "sha256": hashlib.sha256(payload).hexdigest(), "bytes": len(payload),
                          "count": len(stored), "views": views},
               "meta": dict(meta)}
        meta_bytes = (json.dumps(doc, indent=1) + "\n").encode()
        target = self.path(step)
        if target.exists():
            raise CheckpointError(f"checkpoint {step} already exists at {target}; a checkpoint is never overwritten: "
                                  "move it away, or start over with --overwrite")
        tmp: Path | None = None
        try:
            if not self.directory.is_dir():
                self.directory.mkdir(parents=True, exist_ok=True)
                files.fsync_path(self.directory.parent)
            # a hidden directory, fsynced, renamed into place (never over a checkpoint that appeared meanwhile: a
            # non-empty directory), then the store's directory fsynced; on any failure or interrupt it is removed
            with files.atomic_path(target, directory=True, unique=True, fsync=True) as tmp:
                _write_file(tmp / ARRAYS_FILE, payload)
                _write_file(tmp / META_FILE, meta_bytes)
        except OSError as e:
            # the partial files are removed (the next save sweeps what could not be): named only when some are left
            left = f"; partial files left in {tmp}" if tmp is not None and tmp.exists() else ""
            kept = ", ".join(str(s) for s in self.steps if s != step) or "none"
            fix = ("Free some space or choose another --out" if e.errno in _NO_ROOM else "Fix the cause")
            raise CheckpointError(f"could not write checkpoint {step} to {self.directory} ({_os_words(e)}{left}), "
                                  f"leaving the checkpoints already there (steps: {kept}) unchanged. {fix}, then "
                                  "continue with --resume.") from e

    def _sweep(self) -> None:
        """Remove the temporary directories of interrupted saves (one run writes here: the --out lock); best
        effort, as ``_prune``."""
        for entry in self._entries():
            if _TMP_DIR.match(entry.name) and entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)

    def _prune(self, keep: int) -> None:
        """Remove the oldest checkpoints beyond ``max_to_keep``, never ``keep``. Best effort: what cannot be removed
        stays and the next save tries again; that is no reason to fail a save that succeeded."""
        steps = self.steps
        if self.max_to_keep is not None:
            for step in [s for s in steps if s != keep][:max(0, len(steps) - self.max_to_keep)]:
                with contextlib.suppress(OSError):
                    self._remove_checkpoint(self.path(step))

    def _remove_checkpoint(self, path: Path) -> None:
        """Rename ``path`` to a hidden temporary name, then delete it: a checkpoint half deleted by a crash never
        looks whole (the next save sweeps it)."""
        doomed = path.with_name(f".{path.name}.old-{os.getpid()}-{secrets.token_hex(4)}")
        os.rename(path, doomed)
        shutil.rmtree(doomed)

    # ------------------------------------------------------------------------------------------ reading
    def read_meta(self, step: int | None = None) -> dict[str, Any]:
        """The metadata of checkpoint ``step`` (default: the latest), without reading its arrays."""
        return self._read(step, with_arrays=False)[1]

    def read(self, step: int | None = None) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """The arrays and metadata of checkpoint ``step`` (default: the latest), verified against the digest
        written with them; ``UnreadableCheckpoint`` (a ``CheckpointError``) names the file and the problem."""
        return self._read(step, with_arrays=True)

    def _read(self, step: int | None, with_arrays: bool) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        step = self._step(step)

        def unreadable(problem: str) -> UnreadableCheckpoint:
            return UnreadableCheckpoint(step, self.directory, problem)

        try:
            doc = json.loads((self.path(step) / META_FILE).read_bytes())
            if not isinstance(doc, dict) or doc.get("format") != FORMAT:
                raise unreadable(f"{META_FILE} is not the metadata of a flax-resnet checkpoint")
            if not isinstance(doc.get("version"), int) or doc["version"] > FORMAT_VERSION:
                raise unreadable(f"{META_FILE} is of format version {doc.get('version')!r}, newer than this "
                                 f"flax-resnet reads ({FORMAT_VERSION}): upgrade flax-resnet")
            info = doc.get("arrays")
            if (not isinstance(info, dict) or not isinstance(info.get("sha256"), str)
                    or not isinstance(info.get("bytes"), int) or not isinstance(doc.get("meta"), dict)):
                raise unreadable(f"{META_FILE} lacks the digest of {ARRAYS_FILE} or the metadata (garbled)")
            if doc.get("step") != step:
                raise unreadable(f"{META_FILE} is that of checkpoint {doc.get('step')!r} (a renamed directory)")
            data = (self.path(step) / ARRAYS_FILE).read_bytes() if with_arrays else b""
        except ValueError as e:  # json.JSONDecodeError, or UnicodeDecodeError for bytes that are not text
            raise unreadable(f"{META_FILE} is not valid JSON ({e}; garbled or cut short)") from None
        except OSError as e:
            name = Path(e.filename).name
            raise unreadable(f"{name} is missing" if isinstance(e, FileNotFoundError)
                             else f"{name} cannot be read ({_os_words(e)})") from None
        if not with_arrays:
            return {}, doc["meta"]
        if len(data) != info["bytes"]:
            raise unreadable(f"{ARRAYS_FILE} has {len(data)} bytes where {info['bytes']} were written "
                             f"({'cut short' if len(data) < info['bytes'] else 'grown'})")
        if hashlib.sha256(data).hexdigest() != info["sha256"]:
            raise unreadable(f"{ARRAYS_FILE} does not match the SHA-256 recorded when it was written (corrupted)")
        try:
            arrays = safetensors.numpy.load(data)
            for name, dtype in (info.get("views") or {}).items():
                arrays[name] = arrays[name].view(_dtype_named(dtype))
        except Exception as e:  # noqa: BLE001 - the digest matched, so the writer wrote it so: report, never crash
            raise unreadable(f"{ARRAYS_FILE} cannot be parsed ({type(e).__name__}: "
                             f"{' '.join(str(e).split())[:200]})") from e
        return arrays, doc["meta"]

    # ------------------------------------------------------------------------------------------ recovery
    def set_aside(self, step: int) -> Path:
        """Move checkpoint ``step`` to ``<directory>.unreadable/`` (kept for inspection, never deleted; an earlier
        set-aside of the same step neither: ``epoch_NNNN-1``, ...), so that the run can write that step again;
        returns where it went (the same in every process)."""
        source = self.path(self._step(step))
        aside = self.directory.with_name(self.directory.name + UNREADABLE_SUFFIX)
        target, n = aside / source.name, 0
        while target.exists():
            n += 1
            target = aside / f"{source.name}-{n}"
        self._barrier(f"checkpoint-set-aside-{step}")  # every process is done reading it
        try:
            if self.is_writer:
                aside.mkdir(parents=True, exist_ok=True)
                os.rename(source, target)
                files.fsync_path(aside)
                files.fsync_path(self.directory)
        except OSError as e:
            raise CheckpointError(f"could not move the unreadable checkpoint {source} to {target} ({_os_words(e)}); "
                                  "move it away yourself, then run again with --resume") from e
        finally:
            self._barrier(f"checkpoint-set-aside-{step}-done")
        return target

    def restore_latest_good(self, check_meta: Callable[[dict[str, Any]], None] | None = None,
                            report: Callable[[str], None] | None = None
                            ) -> tuple[int, dict[str, np.ndarray], dict[str, Any]]:
        """``(step, arrays, meta)`` of the newest checkpoint that reads back whole, each newer one set aside and
        ``report`` told. ``check_meta(meta)`` may refuse a checkpoint by raising; that error propagates (another
        run's checkpoint is no reason to fall back). ``CheckpointError`` when none is readable, listing why."""
        problems = []
        for step in reversed(self.steps):
            try:
                meta = self.read_meta(step)
                if check_meta is not None:
                    check_meta(meta)
                arrays, meta = self.read(step)
            except UnreadableCheckpoint as e:
                problems.append(f"checkpoint {step}: {e.problem}")
                aside = self.set_aside(step)
                older = [s for s in self.steps if s < step]
                then = f"trying checkpoint {older[-1]}" if older else "no older checkpoint is left"
                if report is not None:
                    report(f"checkpoint {step} in {self.directory} is unreadable ({e.problem}); moved it to {aside}; "
                           f"{then}")
            else:
                return step, arrays, meta
        if not problems:
            raise CheckpointError(f"there is no checkpoint in {self.directory} to resume from; start without "
                                  "--resume")
        raise CheckpointError(f"no checkpoint in {self.directory} can be resumed from (the unreadable ones were "
                              f"moved to {self.directory.name}{UNREADABLE_SUFFIX}/):\n  " + "\n  ".join(problems)
                              + "\nStart over with --overwrite, or restore a backup of the checkpoints.")

    # ------------------------------------------------------------------------------------------ removal
    def remove_all(self) -> list[Path]:
        """Remove every checkpoint this store wrote, and its stale temporary directories (for --overwrite); returns
        what was removed. Anything else (another tool's files, an ``epoch_0005`` without the format marker, a
        symbolic link) stays where it is."""
        if self.directory.is_symlink():
            raise CheckpointError(f"{self.directory} is a symbolic link; --overwrite removes checkpoints only from a "
                                  "real directory: point --out at the link's target, or remove the link")
        removed: list[Path] = []
        try:
            for entry in self._entries() if self.is_writer else []:
                if entry.is_symlink() or not entry.is_dir():
                    continue
                if _TMP_DIR.match(entry.name):
                    shutil.rmtree(entry)
                elif _STEP_DIR.match(entry.name) and _is_ours(entry):
                    self._remove_checkpoint(entry)
                else:
                    continue
                removed.append(entry)
            if removed:
                files.fsync_path(self.directory)
        except OSError as e:
            raise CheckpointError(f"could not remove the checkpoints in {self.directory} ({_os_words(e)}: "
                                  f"{e.filename}); remove them yourself, then run again") from e
        finally:
            self._barrier("checkpoint-remove-all")
        return removed
