"""Settings for the PyTorch <-> Flax parity tests.

- float64 in JAX (``jax_enable_x64``) for the exact comparisons. It is switched on for each parity test and
  restored afterwards, so tests elsewhere in the same process keep JAX's defaults.
- On a GPU (JAX on 'gpu' and CUDA in torch) both frameworks compute float32 matmuls and convolutions in full
  float32: ``jax_default_matmul_precision='highest'`` and TF32 off in torch, also per test. Without a GPU
  everything runs on the CPU; no test needs a GPU.
- ``slow`` marks the tests of the big models (ResNet-34/50): they run by default, ``-m 'not slow'``
  leaves them out for a quick pass.
- JAX's persistent compilation cache, in pytest's cache folder (``.pytest_cache/d/jax-compilation-cache/<worker>``),
  unless one is configured already (``JAX_COMPILATION_CACHE_DIR``). The tests run the models eagerly, and
  compiling every operation for every shape is most of their CPU time: a second run starts warm and takes
  less than half as long (``pytest --cache-clear`` empties the cache; a cold run, as in CI, gains little).
  Being a process-wide JAX setting, it also serves any other tests of the same run.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import pytest

# The tests import ``parity_tests.helpers``: make the repository root importable however pytest is started.
_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import jax  # noqa: E402
import torch  # noqa: E402

from flax_resnet.precision import torch_fp32_precision  # noqa: E402
from parity_tests.helpers import GPU  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):  # xdist workers share the cores: don't oversubscribe them
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: parity tests of the big models (ResNet-34/50); run by default")
    _share_compilations(config)


def _share_compilations(config) -> None:
    if jax.config.jax_compilation_cache_dir or os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return  # the user's own cache
    cache = getattr(config, "cache", None)
    if cache is None:  # -p no:cacheprovider
        return
    # One folder per xdist worker: two workers sharing one read entries the other was still writing ("Error reading
    # persistent compilation cache entry ... truncated stream" in CI, then a recompile).
    folder = cache.mkdir("jax-compilation-cache") / os.environ.get("PYTEST_XDIST_WORKER", "main")
    folder.mkdir(exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)  # eager ops compile in milliseconds


@pytest.fixture(autouse=True)
def _parity_numerics():
    """float64 available in JAX; full-precision float32 on GPUs (no TF32). Restored after the test.

    JAX's own scoped forms of ``jax.config.update('jax_enable_x64', True)`` and
    ``jax.config.update('jax_default_matmul_precision', 'highest')`` are used, so that they end with the test.
    """
    with contextlib.ExitStack() as stack:
        stack.enter_context(jax.enable_x64(True))
        if GPU:
            stack.enter_context(jax.default_matmul_precision("highest"))
            stack.enter_context(torch_fp32_precision("ieee"))
        yield
