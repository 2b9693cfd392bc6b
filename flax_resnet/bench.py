"""Speed benchmark: the Flax train step against three PyTorch variants, in one process, on one device.

``flax-resnet bench --model NAME --batch-size B [--precision {fp32,bf16}] [--json FILE] [--quick]``

Both sides run the same model, batch, precision, optimizer and batches (epoch 0's plan of ``flax_resnet.data.plan``
for the step rows, epoch 1's for the epoch rows) on synthetic CIFAR-sized uint8 data resident on the device,
normalised and augmented (crop + flip) there, each through the public pieces that train:

- ``flax``: a ``FlaxBackend`` prepared as the training loop prepares it, over ``runners.SingleDeviceRunner``: its
  ``train_step`` / ``eval_step`` (compile time and XLA cost from ``lower_train_step`` / ``lower_eval_step``), and
  ``FlaxBackend.train_epoch`` for the epoch row.
- ``torch eager`` (NCHW), ``torch channels_last``, ``torch.compile + channels_last`` (its failure, or its absence
  in ``--quick``, is a row with status ``n/a: why``): the ``torch_ref`` model, optimizer and
  ``PlannedBatches(resident=True)``. The step is the notebooks' without their per-step ``loss.item()`` and
  accuracy ``.item()``: those wait for the device every step, and the Flax step never does; so the epoch row
  loops over the batches with that step, not ``torch_ref.train.train_epoch``.

Rows: ``train step`` and ``eval step`` (warm-up, then each step synchronised: median, p10, p90) and ``epoch``
(every batch, the last one short if need be, synchronised once at its end, including the read of its metrics;
no compilation inside). ``compile_s``: Flax's XLA compilation of the step, torch.compile's first call minus a
median step. ``peak_mem_mb``: the allocators' peaks on GPUs (jax's never reset: the process's so far), else the
process's peak RSS, reset per row (both frameworks' heaps and the data). ``gflop``: 2 x the multiply-adds of
every convolution and matmul of the forward pass, x 3 for a training step (forward, input and weight gradients);
``xla_gflop``: XLA's cost analysis of the Flax step; ``mfu``: ``gflop`` / time / the device's dense peak
(``PEAK_TFLOPS``, GPUs only); ``flax_speedup``: the Flax row's images/s over this row's.

JAX, Flax and torch are imported inside the functions that run, so that ``bench --help`` takes no 1.7 s for JAX.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from flax_resnet import registry
from flax_resnet.commands import expanded_path, seed
from flax_resnet.data import plan as plans
from flax_resnet.errors import FlaxResnetError, require
from flax_resnet.recipes import RunConfig, get_recipe

Precision = Literal["fp32", "bf16"]

# Dense (no sparsity) peak TFLOP/s, first matching substring of jax's ``device_kind`` wins. "fp32" is the TF32
# tensor-core peak: XLA and cuDNN run float32 convolutions in TF32 by default on Hopper.
PEAK_TFLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    ("H200 NVL", {"bf16": 835.0, "fp32": 417.5}),
    ("H100 NVL", {"bf16": 835.0, "fp32": 417.5}),
    ("H100 PCIe", {"bf16": 756.0, "fp32": 378.0}),
    ("H200", {"bf16": 989.4, "fp32": 494.7}),
    ("H100", {"bf16": 989.4, "fp32": 494.7}),
)

IMPLS = ("flax", "torch eager", "torch channels_last", "torch.compile channels_last")
PHASES = ("train step", "eval step", "epoch")
# (key, header) of the printed table; the JSON rows hold these and more (see ``_row``)
COLUMNS: tuple[tuple[str, str], ...] = (
    ("phase", "phase"), ("impl", "implementation"), ("images_per_s", "img/s"), ("ms_median", "ms/step"),
    ("ms_p10", "p10"), ("ms_p90", "p90"), ("compile_s", "compile s"), ("peak_mem_mb", "peak MB"),
    ("gflop", "GFLOP/step"), ("xla_gflop", "XLA GFLOP"), ("mfu", "MFU"), ("flax_speedup", "Flax/this"),
    ("status", "status"),
)
QUICK = {"model": "SimpleResNet", "model_kwargs": {"n_blocks": 1}, "batch_size": 16, "warmup": 2, "steps": 5,
         "epoch_images": 256}
DEFAULT_EPOCH_IMAGES = 50_000  # CIFAR-10's training split


@dataclasses.dataclass
class _Setup:
    """Everything both frameworks share: the model, batch, data, recipe and device."""

    model: str
    model_kwargs: dict[str, Any]
    batch_size: int
    precision: Precision
    warmup: int
    steps: int
    epoch_images: int
    seed: int
    recipe: Any  # flax_resnet.recipes.Recipe
    images: Any  # uint8 NHWC numpy, epoch_images (at least one batch) of them
    labels: Any  # int32 numpy
    platform: str  # jax's default backend: 'cpu' / 'gpu'
    device_kind: str
    log: Callable[[str], None]


# ------------------------------------------------------------------------------------------- measuring
def _time(step: Callable[[], Any], sync: Callable[[Any], Any], warmup: int, steps: int) -> list[float]:
    """Per-step wall times, each step synchronised (so the time is the device's, not the dispatch's)."""
    for _ in range(warmup):
        sync(step())
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        sync(step())
        times.append(time.perf_counter() - t0)
    return times


class _PeakMemory:
    """Peak memory of one row: torch's allocator on GPU, jax's allocator (never reset) on GPU, else peak RSS."""

    def __init__(self, framework: str, setup: _Setup):
        self.log, self.source = setup.log, framework if setup.platform == "gpu" else "rss"
        self.kind = {"torch": "torch.cuda.max_memory_allocated", "flax": "jax peak_bytes_in_use (process peak so far)",
                     "rss": "process peak RSS (VmHWM, reset per row)"}[self.source]
        if self.source == "rss" and not self.reset():
            self.kind = "process peak RSS (since start)"

    def start(self, message: str) -> None:
        """Log the row's start and reset its peak."""
        self.log(message)
        self.reset()

    def reset(self) -> bool:
        """Reset the peak; False where the kernel does not let the process reset its peak RSS."""
        if self.source == "torch":
            import torch

            torch.cuda.reset_peak_memory_stats()
        elif self.source == "rss":
            try:
                Path("/proc/self/clear_refs").write_text("5")
            except OSError:
                return False
        return True

    def fields(self) -> dict[str, Any]:
        """The row's ``peak_mem_mb`` and ``peak_mem_kind``."""
        if self.source == "torch":
            import torch

            peak = torch.cuda.max_memory_allocated()
        elif self.source == "flax":
            import jax

            peak = (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use")
        else:
            import resource

            status = Path("/proc/self/status")
            lines = status.read_text().splitlines() if status.exists() else []
            kib = next((int(line.split()[1]) for line in lines if line.startswith("VmHWM:")),
                       resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
            peak = kib * 1024
        return {"peak_mem_mb": None if peak is None else peak / 2**20, "peak_mem_kind": self.kind}


def _peak_tflops(device_kind: str, precision: str) -> float | None:
    for name, peaks in PEAK_TFLOPS:
        if name.lower() in device_kind.lower():
            return peaks[precision]
    return None


def count_forward_macs(model: Any, batch_size: int, image_size: int = 32) -> int:
    """Multiply-adds of every convolution and matmul in one forward pass of the Flax ``model`` (eval mode), read
    from the traced jaxpr (nothing is computed), so it follows the model's actual layers."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    graphdef, state = nnx.split(model)

    def forward(state, x):
        m = nnx.merge(graphdef, state)
        m.eval()
        return m(x)

    total = 0
    x = jax.ShapeDtypeStruct((batch_size, image_size, image_size, 3), jnp.float32)
    for eqn in iter_eqns(jax.make_jaxpr(forward)(state, x).jaxpr):
        if eqn.primitive.name == "conv_general_dilated":
            out, rhs = eqn.outvars[0].aval, eqn.invars[1].aval
            out_features = rhs.shape[eqn.params["dimension_numbers"].rhs_spec[0]]
            total += math.prod(out.shape) * (math.prod(rhs.shape) // out_features)
        elif eqn.primitive.name == "dot_general":
            (lhs_contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval
            total += math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs.shape[d] for d in lhs_contract)
    return total


def iter_eqns(jaxpr: Any) -> Iterator[Any]:
    """Every equation of a jaxpr, nested ones (jit, custom_vjp, cond branches) included."""
    from jax.extend import core

    for eqn in jaxpr.eqns:
        yield eqn
        for param in eqn.params.values():
            for sub in param if isinstance(param, list | tuple) else (param,):
                if isinstance(sub, core.ClosedJaxpr):
                    yield from iter_eqns(sub.jaxpr)
                elif isinstance(sub, core.Jaxpr):
                    yield from iter_eqns(sub)


def _compile(lowered: Any) -> tuple[float, float | None]:
    """(XLA compile seconds, XLA's GFLOP or None) of a lowered step."""
    t0 = time.perf_counter()
    compiled = lowered.compile()
    seconds = time.perf_counter() - t0
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - some backends have no cost analysis
        cost = None
    if isinstance(cost, list | tuple):
        cost = cost[0] if cost else None
    flops = (cost or {}).get("flops")
    return seconds, flops / 1e9 if flops and flops > 0 else None


# ------------------------------------------------------------------------------------------- rows
def _row(setup: _Setup, impl: str, phase: str, **fields: Any) -> dict[str, Any]:
    row = {"phase": phase, "impl": impl, "status": "ok",
           **dict.fromkeys(("images_per_s", "ms_median", "ms_p10", "ms_p90", "epoch_s", "compile_s", "peak_mem_mb",
                            "peak_mem_kind", "gflop", "xla_gflop", "mfu", "flax_speedup")),
           "model": setup.model, "model_kwargs": setup.model_kwargs, "batch_size": setup.batch_size,
           "precision": setup.precision, "platform": setup.platform, "device_kind": setup.device_kind,
           "load_avg_1m": (load_average() or [None])[0]}
    row.update(fields)
    return row


def _mfu(setup: _Setup, gflop: float | None, seconds: float | None) -> float | None:
    peak = _peak_tflops(setup.device_kind, setup.precision) if setup.platform == "gpu" else None
    if peak is None or not gflop or not seconds:
        return None
    return gflop * 1e9 / seconds / (peak * 1e12)


def _step_row(setup: _Setup, impl: str, phase: str, step: Callable[[], Any], sync: Callable[[Any], Any],
              gflop: float, memory: _PeakMemory, *, time_first: bool = False, **fields: Any) -> dict[str, Any]:
    """A step row: warm-up, then the timed steps (median, p10, p90). With ``time_first`` (torch.compile) the first
    call compiles, and its time beyond a median step is reported as ``compile_s``."""
    first = _time(step, sync, 0, 1)[0] if time_first else None
    ms = np.asarray(_time(step, sync, setup.warmup, setup.steps)) * 1e3
    median = float(np.median(ms))
    if first is not None:
        fields["compile_s"] = max(first - median / 1e3, 0.0)
    return _row(setup, impl, phase, images_per_s=setup.batch_size / (median / 1e3), ms_median=median,
                ms_p10=float(np.percentile(ms, 10)), ms_p90=float(np.percentile(ms, 90)), gflop=gflop,
                mfu=_mfu(setup, gflop, median / 1e3), **memory.fields(), **fields)


def _epoch_row(setup: _Setup, impl: str, epoch_s: float, steps: int, train_gflop: float,
               memory: _PeakMemory) -> dict[str, Any]:
    n = len(setup.labels)
    return _row(setup, impl, "epoch", images_per_s=n / epoch_s, ms_median=epoch_s / steps * 1e3, epoch_s=epoch_s,
                gflop=train_gflop, mfu=_mfu(setup, train_gflop * n / setup.batch_size, epoch_s), **memory.fields())


# ------------------------------------------------------------------------------------------- flax
def _flax_rows(setup: _Setup) -> tuple[list[dict[str, Any]], int]:
    """The three Flax rows (see the module docstring); also returns the forward MACs per batch."""
    import jax

    from flax_resnet.precision import apply_precision
    from flax_resnet.training import runners
    from flax_resnet.training.flax_backend import FlaxBackend

    b, n = setup.batch_size, len(setup.labels)
    model = apply_precision(registry.build_flax(setup.model, setup.model_kwargs, seed=setup.seed), setup.precision)
    macs = count_forward_macs(model, b)
    train_gflop, eval_gflop = 6 * macs / 1e9, 2 * macs / 1e9
    config = RunConfig(recipe=setup.recipe, model=setup.model, model_kwargs=setup.model_kwargs, framework="jax",
                       seed=setup.seed, precision=setup.precision)
    backend = FlaxBackend(model, config, runner=runners.SingleDeviceRunner)
    memory = _PeakMemory("flax", setup)
    memory.start("flax: compiling the train step")
    # no test split: the eval rows time the eval step on the training split's first batch (as torch's do)
    backend.prepare(setup.images, setup.labels, np.zeros((0, 32, 32, 3), np.uint8), np.zeros(0, np.int32))
    runner, data = backend.runner, backend.train_data
    assert isinstance(runner, runners.SingleDeviceRunner)
    plan = runner.put_plan(plans.epoch_plan(setup.seed, 0, n))

    # The steps advance the backend's own state (``state_value``), and the epoch row continues from it.
    compile_s, xla = _compile(runner.lower_train_step(backend.state_value, runner.zero_metrics(), data, plan, 0, b))
    metrics, order, full_batches = [runner.zero_metrics()], itertools.count(), n // b  # n >= b (run_benchmark)

    def train() -> Any:
        start = next(order) % full_batches * b
        backend.state_value, metrics[0] = runner.train_step(backend.state_value, metrics[0], data, plan, start, b)
        return metrics[0]

    rows = [_step_row(setup, "flax", "train step", train, jax.block_until_ready, train_gflop, memory,
                      compile_s=compile_s, xla_gflop=xla)]

    memory.start("flax: eval step")
    compile_s, xla = _compile(runner.lower_eval_step(backend.state_value, runner.zero_metrics(), data, 0, b))
    ebox = [runner.zero_metrics()]

    def evaluate() -> Any:
        ebox[0] = runner.eval_step(backend.state_value, ebox[0], data, 0, b)
        return ebox[0]

    rows.append(_step_row(setup, "flax", "eval step", evaluate, jax.block_until_ready, eval_gflop, memory,
                          compile_s=compile_s, xla_gflop=xla))

    if setup.epoch_images:
        memory.start(f"flax: epoch of {n} images")
        if n % b:  # compile the short last batch outside the timed epoch
            backend.state_value, _ = runner.train_step(backend.state_value, runner.zero_metrics(), data, plan,
                                                       n - n % b, n % b)
        epoch_plan = plans.epoch_plan(setup.seed, 1, n)  # NumPy, drawn before the clock
        jax.block_until_ready(backend.state_value)
        t0 = time.perf_counter()
        backend.train_epoch(1, epoch_plan, lambda step, loss: None)  # no progress bar; the loss is never read
        jax.block_until_ready(backend.state_value)  # the last step's update (its metrics were read already)
        rows.append(_epoch_row(setup, "flax", time.perf_counter() - t0, plans.steps_per_epoch(n, b), train_gflop,
                               memory))
    return rows, macs


# ------------------------------------------------------------------------------------------- torch
def _torch_rows(setup: _Setup, macs: int, compile_torch: bool, compile_torch_skipped: str) -> list[dict[str, Any]]:
    import torch

    from flax_resnet.precision import torch_fp32_precision

    device = torch.device("cuda" if setup.platform == "gpu" and torch.cuda.is_available() else "cpu")
    rows: list[dict[str, Any]] = []
    phases = PHASES if setup.epoch_images else PHASES[:2]
    with contextlib.ExitStack() as stack:
        if device.type == "cuda":  # both restored afterwards
            stack.callback(setattr, torch.backends.cudnn, "benchmark", torch.backends.cudnn.benchmark)
            torch.backends.cudnn.benchmark = True
            stack.enter_context(torch_fp32_precision("tf32"))  # as XLA's default precision does
        for impl in IMPLS[1:]:
            if impl.startswith("torch.compile") and not compile_torch:
                rows += [_row(setup, impl, phase, status=f"n/a: {compile_torch_skipped}") for phase in phases]
                continue
            try:
                _torch_variant(setup, device, impl, macs, rows)
            except Exception as e:  # noqa: BLE001 - report any failure of a variant as its rows, keep the others
                reason = f"n/a: {type(e).__name__}: {' '.join(str(e).split())[:160]}"
                setup.log(f"{impl}: {reason}")
                done = {r["phase"] for r in rows if r["impl"] == impl}
                rows += [_row(setup, impl, phase, status=reason) for phase in phases if phase not in done]
    return rows


def _torch_variant(setup: _Setup, device: Any, impl: str, macs: int, rows: list[dict[str, Any]]) -> None:
    """Append ``impl``'s rows to ``rows`` phase by phase, so that the rows done before a failure are kept."""
    import torch
    import torch.nn.functional as F  # noqa: N812

    from torch_ref.data import PlannedBatches
    from torch_ref.train import make_optimizer

    b, n = setup.batch_size, len(setup.labels)
    compiled = impl.startswith("torch.compile")
    train_gflop, eval_gflop = 6 * macs / 1e9, 2 * macs / 1e9
    channels_last = "channels_last" in impl
    model = registry.build_torch(setup.model, setup.model_kwargs, seed=setup.seed).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    r = setup.recipe
    opt = make_optimizer(model, r.lr, r.momentum, r.weight_decay)
    net = torch.compile(model) if compiled else model
    # torch_ref's batches with the split resident on the device: gathered, augmented and normalised there, as the
    # Flax runner does inside its step, in the variant's memory format
    batches = PlannedBatches(setup.images, setup.labels, b, r.mean, r.std, device=device, resident=True,
                             memory_format=torch.channels_last if channels_last else torch.contiguous_format)

    def autocast() -> Any:
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=setup.precision == "bf16")

    def sync(_: Any = None) -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    correct = torch.zeros((), dtype=torch.int64, device=device)

    # The notebooks' step without its per-step ``.item()`` reads: the metrics stay on the device, as Flax's do.
    def train_on(x: Any, y: Any) -> Any:
        opt.zero_grad(set_to_none=True)
        with autocast():
            logits = net(x)
        loss = F.cross_entropy(logits.float(), y)
        loss.backward()
        opt.step()
        correct.add_((logits.argmax(1) == y).sum())
        return loss

    order, full_batches = itertools.count(), n // b  # n >= b (run_benchmark)

    def train() -> Any:
        return train_on(*batches.batch(next(order) % full_batches))

    memory = _PeakMemory("torch", setup)
    memory.start(f"{impl}: train step")
    first = plans.epoch_plan(setup.seed, 0, n)  # the plan of the Flax step rows: the same batches
    batches.set_plan(first.permutation, first.offsets, first.flips)
    model.train()
    rows.append(_step_row(setup, impl, "train step", train, sync, train_gflop, memory, time_first=compiled))

    memory.start(f"{impl}: eval step")
    batches.set_plan(np.arange(n))  # in order, not augmented: the test loader's batches (runners.gather_eval_batch)
    model.eval()

    def evaluate() -> Any:
        with torch.inference_mode(), autocast():
            x, y = batches.batch(0)
            logits = net(x)
            return (logits.argmax(1) == y).sum()

    rows.append(_step_row(setup, impl, "eval step", evaluate, sync, eval_gflop, memory, time_first=compiled))
    model.train()

    if setup.epoch_images:
        memory.start(f"{impl}: epoch of {n} images")
        if n % b:  # the short last batch: a new shape (torch.compile recompiles) outside the timed epoch
            sync(train_on(*batches.batch(len(batches) - 1)))
        epoch_plan = plans.epoch_plan(setup.seed, 1, n)  # the Flax epoch's plan, drawn before the clock
        sync()
        t0 = time.perf_counter()
        batches.set_plan(epoch_plan.permutation, epoch_plan.offsets, epoch_plan.flips)  # as train_epoch's put_plan
        for x, y in batches:  # every batch, the last one short, as the notebooks' loops iterate their loader
            train_on(x, y)
        correct.item()  # read the epoch's metrics once, at its end
        sync()
        rows.append(_epoch_row(setup, impl, time.perf_counter() - t0, len(batches), train_gflop, memory))


# ------------------------------------------------------------------------------------------- API
def run_benchmark(model_name: str, batch_size: int, precision: Precision, *, warmup: int, steps: int,
                  quick: bool = False, model_kwargs: dict[str, Any] | None = None, epoch_images: int | None = None,
                  torch_compile: bool | None = None, seed: int = 0,
                  log: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Benchmark the Flax step against the torch variants; one dict per (implementation, phase), phase by phase
    (``PHASES``), then implementation (``IMPLS``); ``format_table`` prints them.

    ``quick``: ``QUICK``'s model, batch and epoch, at most its warm-up and steps, and no torch.compile, unless
    ``epoch_images`` (default 50,000; 0: no epoch rows) / ``torch_compile`` (default: not ``quick``) say otherwise.
    """
    import jax

    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be 'fp32' or 'bf16', got {precision!r}")
    if quick:
        model_name, model_kwargs, batch_size = QUICK["model"], dict(QUICK["model_kwargs"]), QUICK["batch_size"]
        warmup, steps = min(warmup, QUICK["warmup"]), min(steps, QUICK["steps"])
        epoch_images = QUICK["epoch_images"] if epoch_images is None else epoch_images
    if batch_size < 1 or steps < 1 or warmup < 0:
        raise ValueError(f"need batch_size >= 1, steps >= 1, warmup >= 0; got {batch_size}, {steps}, {warmup}")
    # Let torch and jax share a GPU: jax would otherwise take 75% of its memory up front. Read when jax first
    # touches a device, so it must be set before that.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    epoch_images = DEFAULT_EPOCH_IMAGES if epoch_images is None else epoch_images
    kwargs = registry.model_kwargs(model_name, dict(model_kwargs or {}))
    # the model's notebook recipe, with augmentation on: the benchmark includes the on-device crop + flip
    recipe = dataclasses.replace(get_recipe(registry.get_spec(model_name).recipe), batch_size=batch_size,
                                 eval_batch_size=batch_size, augment=True)
    rng = np.random.default_rng(seed)
    n = max(epoch_images, batch_size)  # at least one batch
    images, labels = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, n).astype(np.int32)
    device = jax.devices()[0]
    setup = _Setup(model_name, kwargs, batch_size, precision, warmup, steps, epoch_images, seed, recipe, images,
                   labels, device.platform, device.device_kind, log or (lambda _: None))
    rows, macs = _flax_rows(setup)
    skipped = ("skipped (--quick: torch.compile takes about a minute to compile on CPU)" if quick
               and torch_compile is None else "skipped (torch_compile=False / --no-torch-compile)")
    rows += _torch_rows(setup, macs, not quick if torch_compile is None else torch_compile, skipped)
    flax = {r["phase"]: r["images_per_s"] for r in rows if r["impl"] == "flax"}
    for r in rows:
        if r["images_per_s"] and flax.get(r["phase"]):
            r["flax_speedup"] = flax[r["phase"]] / r["images_per_s"]
    return sorted(rows, key=lambda r: (PHASES.index(r["phase"]), IMPLS.index(r["impl"])))


def environment() -> dict[str, Any]:
    """Versions, device and load, for the report's header and the JSON file."""
    import jax
    import torch

    from flax_resnet.training import cpu

    device = jax.devices()[0]
    return {"jax": jax.__version__, "torch": torch.__version__, "python": platform.python_version(),
            "platform": device.platform, "device_kind": device.device_kind, "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "malloc_tuned": cpu.tuned_allocator(), "load_avg": load_average(), "cpu": describe_cpu()}


# (key, /proc/cpuinfo flag, label) of the vector extensions XLA:CPU and torch's kernels make use of
CPU_FEATURES: tuple[tuple[str, str, str], ...] = (("avx2", "avx2", "AVX2"), ("fma", "fma", "FMA"),
                                                  ("avx512", "avx512f", "AVX-512"))


def describe_cpu(cpuinfo: str | None = None) -> dict[str, Any]:
    """The CPU's model and whether it has AVX2, FMA and AVX-512 (True/False; None where unknown), with ``text``, a
    one-line summary for headers. Why: XLA:CPU and torch pick their kernels by these extensions, so CPU speeds are
    comparable between machines only with them known (BENCHMARKS.md's CPU log was measured without AVX-512).

    ``cpuinfo``: the text of ``/proc/cpuinfo`` (default: read it; its first processor's ``model name`` and
    ``flags``). Where there is none (macOS, Windows), the model is ``platform.processor()`` and the extensions
    are unknown."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            cpuinfo = ""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            if fields:  # the blank line after the first processor's block
                break
            continue
        fields.setdefault(key.strip().lower(), value.strip())
    flags = set(fields["flags"].split()) if "flags" in fields else None
    model = fields.get("model name") or platform.processor() or platform.machine() or "unknown CPU"
    info: dict[str, Any] = {"model": model, "source": "/proc/cpuinfo" if fields else "platform.processor()"}
    info.update((key, None if flags is None else flag in flags) for key, flag, _ in CPU_FEATURES)
    yes_no = {True: "yes", False: "no", None: "unknown"}
    info["text"] = f"{model} ({', '.join(f'{label} {yes_no[info[key]]}' for key, _, label in CPU_FEATURES)})"
    return info


def load_average() -> list[float] | None:
    """The 1, 5 and 15-minute load averages (None where the OS has none): the first thing to spoil a timing."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _fmt(key: str, value: Any) -> str:
    if value is None:
        return "n/a"
    if key == "mfu":
        return f"{100 * value:.1f}%"
    if key == "flax_speedup":
        return f"{value:.2f}x"
    if key in ("images_per_s", "peak_mem_mb"):
        return f"{value:,.0f}"
    if key in ("ms_median", "ms_p10", "ms_p90", "compile_s", "gflop", "xla_gflop"):
        return f"{value:.3g}" if value < 100 else f"{value:,.0f}"
    return str(value)


def format_table(rows: Sequence[dict[str, Any]], cpu_text: str | None = None) -> str:
    """The rows as an aligned text table (one line per row), with a header naming the run, the CPU (``cpu_text``,
    default ``describe_cpu()``'s; the host's CPU matters on GPUs too: it feeds them) and the notes."""
    cells = [[header for _, header in COLUMNS]]
    cells += [[_fmt(key, row.get(key)) for key, _ in COLUMNS] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.ljust(w) if i in (0, 1, len(COLUMNS) - 1) else c.rjust(w)
                       for i, (c, w) in enumerate(zip(line, widths, strict=True))).rstrip() for line in cells]
    lines.insert(1, "-" * len(lines[0]))
    head = []
    if rows:
        r = rows[0]
        epoch = next((x for x in rows if x["phase"] == "epoch" and x["epoch_s"]), None)
        model = registry.constructor_call(r["model"], r["model_kwargs"])
        head.append(f"{model}, batch {r['batch_size']}, {r['precision']}, {r['platform']} "
                    f"({r['device_kind']}), load avg at start {r['load_avg_1m']}")
        head.append(f"CPU: {cpu_text or describe_cpu()['text']}")
        if epoch is not None:
            head.append(f"epoch rows: {epoch['images_per_s'] * epoch['epoch_s']:.0f} images; ms/step is the "
                        "epoch's mean")
        kinds = sorted({x["peak_mem_kind"] for x in rows if x["peak_mem_kind"]})
        head.append("GFLOP/step: analytic (conv + matmul MACs x 2, x 3 for training); XLA GFLOP: XLA cost "
                    "analysis of the compiled Flax step; peak MB: " + "; ".join(kinds))
    return "\n".join(head + lines)


# ------------------------------------------------------------------------------------------- command line
def add_bench_parser(subparsers: Any) -> argparse.ArgumentParser:
    """The ``bench`` command (``cli.SUBCOMMANDS`` registers it)."""
    p = subparsers.add_parser(
        "bench", help="speed: the Flax train step against torch eager / channels_last / torch.compile",
        description="Time the Flax training path (SingleDeviceRunner) against PyTorch eager, channels_last and "
                    "torch.compile + channels_last on the same device, model, batch and precision, with synthetic "
                    "CIFAR-sized data resident on the device: train step, eval step and a whole epoch. Prints a "
                    "table; --json writes the rows.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=registry.model_names(), default="SimpleResNet", metavar="NAME",
                   help=f"model class: {', '.join(registry.model_names())} (default: %(default)s)")
    registry.add_model_arguments(p)
    p.add_argument("--batch-size", type=int, default=128, metavar="B", help="batch size (default: %(default)s)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="fp32, or bf16 mixed precision (Flax: flax_resnet.precision; torch: autocast) "
                        "(default: %(default)s)")
    p.add_argument("--steps", type=int, default=20, metavar="N", help="timed steps per row (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=3, metavar="N",
                   help="untimed steps before them (default: %(default)s)")
    p.add_argument("--epoch-images", type=int, default=None, metavar="N",
                   help=f"images in the timed epoch (default: {DEFAULT_EPOCH_IMAGES:,}; {QUICK['epoch_images']} "
                        "with --quick; 0: no epoch rows)")
    p.add_argument("--torch-compile", action=argparse.BooleanOptionalAction, default=None,
                   help="include torch.compile (default: yes, except with --quick)")
    p.add_argument("--quick", action="store_true",
                   help=f"CI-sized run in well under a minute: SimpleResNet(n_blocks=1), batch "
                        f"{QUICK['batch_size']}, {QUICK['warmup']} + {QUICK['steps']} steps, a "
                        f"{QUICK['epoch_images']}-image epoch, no torch.compile (overrides --model, --batch-size "
                        "and larger --warmup/--steps; --epoch-images and --torch-compile still apply)")
    p.add_argument("--seed", type=seed, default=0, metavar="N", help="seed of weights and data (default: 0)")
    p.add_argument("--json", type=expanded_path, metavar="FILE",
                   help="also write the rows (and the environment) as JSON")
    p.set_defaults(handler=run_bench_command, parser=p)
    return p


def run_bench_command(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Handler of ``bench``: validate, run, print the table, write the JSON; returns the exit code."""
    given = {a.name: getattr(args, a.name) for a in registry.MODEL_ARGS.values()
             if getattr(args, a.name, None) is not None}
    if not args.quick:
        try:
            registry.model_kwargs(args.model, given)
        except ValueError as e:
            parser.error(str(e))
    if args.batch_size < 1 or args.steps < 1 or args.warmup < 0:
        parser.error("--batch-size and --steps must be at least 1, --warmup at least 0")
    if args.epoch_images is not None and args.epoch_images < 0:
        parser.error("--epoch-images must be >= 0")
    if args.json is not None and (args.json.is_dir() or (args.json.parent.exists() and not args.json.parent.is_dir())):
        parser.error(f"--json {args.json}: give a file path whose folder is a directory (checked before the run, "
                     "not after it)")

    require("torch", "bench (it times Flax against PyTorch)")
    rows = run_benchmark(args.model, args.batch_size, args.precision, warmup=args.warmup, steps=args.steps,
                         quick=args.quick, model_kwargs=given, epoch_images=args.epoch_images,
                         torch_compile=args.torch_compile, seed=args.seed,
                         log=lambda message: print(f"[bench] {message}", file=sys.stderr, flush=True))
    env = environment()
    print(format_table(rows, env["cpu"]["text"]))
    print(f"load average at end: {env['load_avg']}  (jax {env['jax']}, torch {env['torch']}, "
          f"{env['cpu_count']} CPUs, torch threads {env['torch_threads']})")
    if args.json:
        try:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({"environment": env, "rows": rows}, indent=2, default=str) + "\n")
        except OSError as e:
            raise FlaxResnetError(f"could not write --json {args.json} ({e.strerror or e}); the table above has every "
                                  "figure") from e
    return 0

