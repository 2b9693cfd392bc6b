"""Multi-host start-up: ``jax.distributed.initialize`` with explicit flags or the cluster's own environment, called by
every process before anything touches a JAX device. Only the main process writes outputs.

Process 0 serves the coordinator at ``--coordinator HOST:PORT``; the others first probe that port themselves for
``timeout_s`` seconds, because XLA's coordination client does not raise on a timeout but terminates the process
("DEADLINE_EXCEEDED ... RegisterTask"): a ``DistributedInitError`` naming the address is only possible before.
"""

from __future__ import annotations

import math
import os
import socket
import threading
import time
from collections.abc import Callable

import jax

from flax_resnet.config import ParallelConfig
from flax_resnet.errors import FlaxResnetError


class DistributedInitError(FlaxResnetError, RuntimeError):
    """The processes of a multi-host run could not be connected (bad flags, unreachable coordinator)."""


# Environment variables by which JAX's own cluster detection (jax._src.clusters) recognises a launcher.
_CLUSTERS = {"SLURM": ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID"),
             "Open MPI": ("OMPI_MCA_orte_hnp_uri",), "JAX_COORDINATOR_ADDRESS": ("JAX_COORDINATOR_ADDRESS",)}


def detect_cluster() -> str | None:
    """The multi-process launcher this process runs under, or ``None`` (also for a SLURM step with one task)."""
    for name, variables in _CLUSTERS.items():
        if all(v in os.environ for v in variables) and not (name == "SLURM" and os.environ["SLURM_NTASKS"] == "1"):
            return name
    return None


def _split_address(coordinator: str) -> tuple[str, int]:
    host, sep, port = coordinator.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise DistributedInitError(f"--coordinator must be HOST:PORT (e.g. 10.0.0.1:12345), got {coordinator!r}")
    return host.strip("[]"), int(port)


def wait_for_coordinator(coordinator: str, timeout_s: float, process_id: int | None = None) -> None:
    """Return once ``coordinator`` accepts TCP connections; ``DistributedInitError`` after ``timeout_s`` seconds."""
    host, port = _split_address(coordinator)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, port), timeout=max(0.1, min(2.0, deadline - time.monotonic()))):
                return
        except socket.gaierror as e:
            raise DistributedInitError(f"cannot resolve the coordinator host {host!r} of --coordinator "
                                       f"{coordinator} ({e}); give process 0's hostname or IP address") from e
        except OSError as e:
            if (remaining := deadline - time.monotonic()) <= 0:
                raise _connect_error(coordinator, process_id, timeout_s, e) from e
            time.sleep(min(0.5, remaining))


ABORT_GRACE_S = 30  # JAX's own timeout (a C++ abort) comes this much after ``on_timeout``'s named error


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
               timeout_s: float = 300.0, on_timeout: Callable[[DistributedInitError], object] | None = None) -> bool:
    """Join a multi-process JAX run; returns whether one was joined (``False``: a plain single process).

    Give all three of ``coordinator``, ``num_processes`` and ``process_id``, or none: then a detected launcher
    (SLURM's ``srun``: one task per GPU, each pinned to its ``SLURM_LOCALID``; Open MPI's ``mpirun``;
    ``JAX_COORDINATOR_ADDRESS``) lets JAX fill them in. ``on_timeout(error)`` is called from a watchdog thread if
    joining takes longer than ``timeout_s`` (process 0 waiting for peers that never come), ahead of JAX's own abort
    with a C++ stack trace: a command line reports ``error`` and exits.
    """
    given = {"--coordinator": coordinator, "--num-processes": num_processes, "--process-id": process_id}
    cluster = detect_cluster()
    if all(v is None for v in given.values()) and cluster is None:
        return False
    if cluster is None and any(v is None for v in given.values()):
        missing = ", ".join(k for k, v in given.items() if v is None)
        raise DistributedInitError(
            f"a multi-process run needs --coordinator, --num-processes and --process-id together; missing {missing} "
            "(or launch under SLURM or Open MPI)")
    if num_processes is not None and num_processes < 1:
        raise DistributedInitError(f"--num-processes must be at least 1, got {num_processes}")
    if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
        raise DistributedInitError(f"--process-id must be in [0, {num_processes}), got {process_id}")
    if coordinator is not None:
        _split_address(coordinator)
    if num_processes == 1 and cluster is None:
        return False
    if jax.distributed.is_initialized():
        return True
    if coordinator is not None and process_id not in (None, 0):
        wait_for_coordinator(coordinator, timeout_s, process_id)
    where = coordinator or f"the address {cluster} provides"
    watchdog = None
    if on_timeout is not None:
        late = DistributedInitError(
            f"process {process_id if process_id is not None else '?'} waited {timeout_s:g} s at {where} and not all "
            f"{num_processes or 'the'} processes joined. Start every process with the same --coordinator and "
            "--num-processes and its own --process-id, or raise --distributed-timeout if they start far apart.")
        watchdog = threading.Timer(timeout_s, on_timeout, args=(late,))
        watchdog.daemon = True
        watchdog.start()
    grace = ABORT_GRACE_S if on_timeout is not None else 0
    try:
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id, initialization_timeout=max(1, math.ceil(timeout_s)) + grace)
    except Exception as e:  # XlaRuntimeError (DEADLINE_EXCEEDED, UNAVAILABLE, ...) and friends
        if "before any JAX calls" in str(e) or "should only be called once" in str(e):
            raise DistributedInitError(
                f"jax.distributed.initialize must run first, before anything uses a JAX device: {e}") from e
        raise _connect_error(where, process_id, timeout_s, e) from e
    finally:
        if watchdog is not None:
            watchdog.cancel()
    return True


def _connect_error(where: str, process_id: int | None, timeout_s: float, cause: Exception) -> DistributedInitError:
    first = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
    role = (f"could not start the coordinator service at {where}" if process_id == 0
            else f"got no answer from the coordinator at {where} within {timeout_s:g} s")
    return DistributedInitError(
        f"process {process_id if process_id is not None else '?'} {role} ({first}). Start process 0 with the same "
        "--coordinator and --num-processes, on a host and port every process can reach, or raise "
        "--distributed-timeout if the processes start far apart.")


def shutdown() -> None:
    """Leave the multi-process run (a no-op in a single process)."""
    if jax.distributed.is_initialized():
        jax.distributed.shutdown()


def is_main_process() -> bool:
    return jax.process_index() == 0


def initialize_from_config(config: ParallelConfig,
                           on_timeout: Callable[[DistributedInitError], object] | None = None) -> bool:
    """``initialize`` with ``config``'s coordinator, process count and rank, and timeout."""
    return initialize(config.coordinator, config.num_processes, config.process_id, timeout_s=config.timeout_s,
                      on_timeout=on_timeout)
