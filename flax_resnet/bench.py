"""Speed benchmark: the Flax train step against three PyTorch variants, in one process, on one device, through the
public pieces that train (``FlaxBackend``; the ``torch_ref`` model, optimizer and ``PlannedBatches``), as a
``config.BenchConfig`` says. What each row and column measures: BENCHMARKS.md, "What bench measures". torch, an
optional extra, is imported where the torch rows are measured.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import functools
import itertools
import math
import os
import platform
import time
from collections.abc import Callable, Iterator, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.extend import core

from flax_resnet import builders, registry, tables
from flax_resnet.config import BenchConfig, ModelConfig, RunConfig
from flax_resnet.data import plan as plans
from flax_resnet.precision import apply_precision, torch_fp32_precision
from flax_resnet.recipes import Precision, get_recipe
from flax_resnet.training import cpu
from flax_resnet.training.flax_backend import FlaxBackend

# Dense (no sparsity) bf16 peak TFLOP/s, first matching substring of jax's ``device_kind`` wins. fp32's is half of
# it: the TF32 tensor-core peak, since XLA and cuDNN run float32 convolutions in TF32 by default on Hopper.
PEAK_TFLOPS = {"H200 NVL": 835.0, "H100 NVL": 835.0, "H100 PCIe": 756.0, "H200": 989.4, "H100": 989.4}

IMPLS = ("flax", "torch eager", "torch channels_last", "torch.compile channels_last")
PHASES = ("train step", "eval step", "epoch")
# key: header of the printed table; the JSON rows hold these and more (see ``_row`` and ``run_benchmark``)
COLUMNS = {"phase": "phase", "impl": "implementation", "images_per_s": "img/s", "ms_median": "ms/step", "ms_p10": "p10",
           "ms_p90": "p90", "compile_s": "compile s", "peak_mem_mb": "peak MB", "gflop": "GFLOP/step",
           "xla_gflop": "XLA GFLOP", "mfu": "MFU", "flax_speedup": "Flax/this", "status": "status"}
# what ``peak_mem_mb`` reads: each framework's allocator on a GPU (jax's cannot be reset), else the process's RSS
PEAK_MEMORY_KINDS = {"torch": "torch.cuda.max_memory_allocated", "flax": "jax peak_bytes_in_use (process peak so far)",
                     "rss": "process peak RSS (VmHWM, reset per row)"}
# (key, /proc/cpuinfo flag, label) of the vector extensions XLA:CPU and torch's kernels make use of
CPU_FEATURES = (("avx2", "avx2", "AVX2"), ("fma", "fma", "FMA"), ("avx512", "avx512f", "AVX-512"))


@dataclasses.dataclass
class _Setup:
    """What both frameworks share: the model, batch, data, recipe and device."""

    model: str
    model_kwargs: dict[str, Any]
    batch_size: int
    precision: Precision
    warmup: int
    steps: int
    phases: tuple[str, ...]  # PHASES, without the epoch with epoch_images=0
    seed: int
    recipe: Any  # flax_resnet.recipes.Recipe
    images: Any  # uint8 NHWC numpy, at least one batch of them
    labels: Any  # int32 numpy
    platform: str  # jax's default backend: 'cpu' / 'gpu'
    log: Callable[[str], None]


def _with_peak_mb(source: str, measure: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``measure()``'s fields and ``peak_mem_mb``, the peak memory of ``source`` (a key of ``PEAK_MEMORY_KINDS``)
    while it ran: None where jax has no allocator statistics or the process may not reset its peak RSS (no /proc)."""
    if source == "torch":
        import torch

        torch.cuda.reset_peak_memory_stats()
        return {**measure(), "peak_mem_mb": torch.cuda.max_memory_allocated() / 2**20}
    if source == "flax":
        fields = measure()
        peak = (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use")
        return {**fields, "peak_mem_mb": None if peak is None else peak / 2**20}
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return {**measure(), "peak_mem_mb": None}
    fields = measure()
    kib = next(int(line.split()[1]) for line in Path("/proc/self/status").read_text().splitlines()
               if line.startswith("VmHWM:"))
    return {**fields, "peak_mem_mb": kib / 2**10}


def _measure(setup: _Setup, impl: str, source: str, phases: dict[str, Callable[[], dict[str, Any]]],
             rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Append one row per phase of ``setup.phases`` to ``rows`` (so that a failure keeps the rows before it): the
    fields that ``phases[phase]()`` measures, with the peak memory of ``source`` while it ran."""
    for phase in setup.phases:
        setup.log(f"{impl}: {phase}")
        fields = _with_peak_mb(source, phases[phase])
        kind = PEAK_MEMORY_KINDS[source] if fields["peak_mem_mb"] is not None else None  # n/a: no kind to name
        rows.append(_row(impl, phase, peak_mem_kind=kind, **fields))
    return rows


def _step_fields(setup: _Setup, step: Callable[[], Any], sync: Callable[[], Any], *, time_first: bool = False,
                 **fields: Any) -> dict[str, Any]:
    """A step row's figures: warm-up, then the timed steps (median, p10, p90), each synchronised (so the time is the
    device's, not the dispatch's). With ``time_first`` (torch.compile) the first call compiles, and its time beyond
    a median step is reported as ``compile_s``."""
    times = []
    for _ in range(time_first + setup.warmup + setup.steps):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    ms = np.asarray(times[-setup.steps:]) * 1e3
    median = float(np.median(ms))
    if time_first:
        fields["compile_s"] = max(times[0] - median / 1e3, 0.0)
    return {"images_per_s": setup.batch_size / (median / 1e3), "ms_median": median,
            "ms_p10": float(np.percentile(ms, 10)), "ms_p90": float(np.percentile(ms, 90)), **fields}


def _epoch_fields(setup: _Setup, epoch: Callable[[], Any], sync: Callable[[], Any]) -> dict[str, Any]:
    """An epoch row's figures: ``epoch`` runs every batch and reads its metrics; synchronised once, at its end."""
    sync()
    t0 = time.perf_counter()
    epoch()
    sync()
    seconds = time.perf_counter() - t0
    return {"images_per_s": len(setup.labels) / seconds, "epoch_s": seconds,
            "ms_median": seconds / plans.steps_per_epoch(len(setup.labels), setup.batch_size) * 1e3}


def _row(impl: str, phase: str, **fields: Any) -> dict[str, Any]:
    return {**dict.fromkeys([*COLUMNS, "epoch_s", "peak_mem_kind"]), "phase": phase, "impl": impl, "status": "ok",
            "load_avg_1m": (load_average() or [None])[0], **fields}


def _peak_tflops(device_kind: str, precision: str) -> float | None:
    bf16 = next((peak for name, peak in PEAK_TFLOPS.items() if name.lower() in device_kind.lower()), None)
    return bf16 / 2 if bf16 and precision == "fp32" else bf16


def xla_gflop(cost: Any) -> float | None:
    """GFLOP of XLA's cost analysis of a compiled step, or None. jax leaves its structure open ("may be inconsistent
    across versions"): a dict on jax 0.10 (CPU), a list of one dict per computation in older releases; anything else
    is no figure rather than a crash after the rows were measured."""
    if isinstance(cost, list | tuple):
        cost = cost[0] if cost else None
    flops = cost.get("flops") if isinstance(cost, dict) else None
    return flops / 1e9 if isinstance(flops, int | float) and flops > 0 else None


def count_forward_macs(model: Any, batch_size: int) -> int:
    """Multiply-adds of every convolution and matmul in one forward pass of the Flax ``model`` (eval mode) on CIFAR
    images, read from the traced jaxpr (nothing is computed), so it follows the model's actual layers."""
    forward = nnx.clone(model)  # eval mode, the model itself left as it is
    forward.eval()
    total = 0
    for eqn in iter_eqns(jax.make_jaxpr(forward)(jax.ShapeDtypeStruct((batch_size, 32, 32, 3), jnp.float32)).jaxpr):
        name, out = eqn.primitive.name, math.prod(eqn.outvars[0].aval.shape)
        if name == "conv_general_dilated":  # per output: the kernel of one output feature
            rhs = eqn.invars[1].aval.shape
            total += out * math.prod(rhs) // rhs[eqn.params["dimension_numbers"].rhs_spec[0]]
        elif name == "dot_general":  # per output: the contracted dimensions
            (contract, _), _ = eqn.params["dimension_numbers"]
            total += out * math.prod(eqn.invars[0].aval.shape[d] for d in contract)
    return total


def iter_eqns(jaxpr: Any) -> Iterator[Any]:
    """Every equation of a jaxpr, nested ones (jit, custom_vjp, cond branches) included."""
    for eqn in jaxpr.eqns:
        yield eqn
        for param in eqn.params.values():
            for sub in param if isinstance(param, list | tuple) else (param,):
                if isinstance(sub, core.ClosedJaxpr):
                    yield from iter_eqns(sub.jaxpr)
                elif isinstance(sub, core.Jaxpr):
                    yield from iter_eqns(sub)


def _flax_rows(setup: _Setup) -> tuple[list[dict[str, Any]], int]:
    """The Flax rows, through the training loop's backend (its default runner: one device); and the forward MACs."""
    b, n = setup.batch_size, len(setup.labels)
    model = apply_precision(builders.build_flax(setup.model, setup.model_kwargs, seed=setup.seed), setup.precision)
    macs = count_forward_macs(model, b)
    backend = FlaxBackend(model, RunConfig(recipe=setup.recipe, model=ModelConfig(setup.model, setup.model_kwargs),
                                           seed=setup.seed, precision=setup.precision))
    # the test split is the training split's first batch: the eval rows time the eval step on it (as torch's do)
    backend.prepare(setup.images, setup.labels, setup.images[:b], setup.labels[:b])
    plan = backend.put_plan(plans.epoch_plan(setup.seed, 0, n))
    # The steps advance the backend's state, and the epoch row continues from it.
    metrics, order = [None, None], itertools.count()

    def train() -> None:
        metrics[0] = backend.train_step(plan, next(order) % (n // b) * b, b, metrics[0])  # n >= b (run_benchmark)

    def evaluate() -> None:
        metrics[1] = backend.eval_step(0, b, metrics[1])

    def step_row(step: Callable[[], Any], lowered: Callable[[], Any]) -> dict[str, Any]:
        """``step``'s figures, with XLA's compile time and cost analysis of the step (``lowered``)."""
        t0 = time.perf_counter()
        compiled = lowered().compile()
        compile_s = time.perf_counter() - t0
        return _step_fields(setup, step, lambda: jax.block_until_ready(metrics), compile_s=compile_s,
                            xla_gflop=xla_gflop(compiled.cost_analysis()))

    def epoch_row() -> dict[str, Any]:
        if n % b:  # compile the short last batch outside the timed epoch
            backend.train_step(plan, n - n % b, n % b)
        epoch_plan = plans.epoch_plan(setup.seed, 1, n)  # NumPy, drawn before the clock
        # no progress bar, the loss never read; the end waits for the last step's update
        return _epoch_fields(setup, lambda: backend.train_epoch(1, epoch_plan, lambda step, loss: None),
                             backend.block_until_ready)

    phases = {"train step": lambda: step_row(train, lambda: backend.lower_train_step(plan, 0, b)),
              "eval step": lambda: step_row(evaluate, lambda: backend.lower_eval_step(0, b)), "epoch": epoch_row}
    return _measure(setup, "flax", "flax" if setup.platform == "gpu" else "rss", phases, []), macs


def _torch_rows(setup: _Setup, compile_torch: bool) -> list[dict[str, Any]]:
    """The torch variants' rows; a variant skipped or failed has rows with status ``n/a: why``."""
    import torch

    device = torch.device("cuda" if setup.platform == "gpu" and torch.cuda.is_available() else "cpu")
    rows: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack:
        if device.type == "cuda":  # both restored afterwards
            stack.callback(setattr, torch.backends.cudnn, "benchmark", torch.backends.cudnn.benchmark)
            torch.backends.cudnn.benchmark = True
            stack.enter_context(torch_fp32_precision("tf32"))  # as XLA's default precision does
        for impl in IMPLS[1:]:
            if impl.startswith("torch.compile") and not compile_torch:
                skipped = ("n/a: skipped (--no-torch-compile, selftest --skip torch.compile, or --quick: it compiles "
                           "for about a minute on a CPU)")
                rows += [_row(impl, phase, status=skipped) for phase in setup.phases]
                continue
            try:
                _torch_variant(setup, device, impl, rows)
            except Exception as e:  # noqa: BLE001 - report any failure of a variant as its rows, keep the others
                reason = f"n/a: {type(e).__name__}: {' '.join(str(e).split())[:160]}"
                setup.log(f"{impl}: {reason}")
                done = {r["phase"] for r in rows if r["impl"] == impl}
                rows += [_row(impl, phase, status=reason) for phase in setup.phases if phase not in done]
    return rows


def _torch_variant(setup: _Setup, device: Any, impl: str, rows: list[dict[str, Any]]) -> None:
    """Append ``impl``'s rows to ``rows``. The step is the notebooks' without their per-step ``.item()`` reads,
    which wait for the device every step (the Flax step never does); so the epoch row loops over the batches with
    it, not ``torch_ref.train.train_epoch``."""
    import torch
    import torch.nn.functional as F  # noqa: N812

    from flax_resnet import builders
    from torch_ref.data import PlannedBatches
    from torch_ref.train import make_optimizer

    b, n, r = setup.batch_size, len(setup.labels), setup.recipe
    compiled = impl.startswith("torch.compile")
    layout = torch.channels_last if "channels_last" in impl else torch.contiguous_format
    model = builders.build_torch(setup.model, setup.model_kwargs, seed=setup.seed).to(device, memory_format=layout)
    opt = make_optimizer(model, r.lr, r.momentum, r.weight_decay)
    net = torch.compile(model) if compiled else model
    # torch_ref's batches with the split resident on the device: gathered, augmented and normalised there, as the
    # Flax runner does inside its step, in the variant's memory format
    batches = PlannedBatches(setup.images, setup.labels, b, r.mean, r.std, device=device, resident=True,
                             memory_format=layout)
    correct = torch.zeros((), dtype=torch.int64, device=device)

    autocast = functools.partial(torch.autocast, device.type, dtype=torch.bfloat16, enabled=setup.precision == "bf16")
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None

    def train_on(x: Any, y: Any) -> None:
        opt.zero_grad(set_to_none=True)
        with autocast():
            logits = net(x)
        loss = F.cross_entropy(logits.float(), y)
        loss.backward()
        opt.step()
        correct.add_((logits.argmax(1) == y).sum())

    def train_row() -> dict[str, Any]:
        order = itertools.count()
        batches.set_plan(*plans.epoch_plan(setup.seed, 0, n))  # the plan of the Flax step rows: the same batches
        model.train()
        return _step_fields(setup, lambda: train_on(*batches.batch(next(order) % (n // b))), sync,
                            time_first=compiled)

    def evaluate() -> Any:
        with torch.inference_mode(), autocast():
            x, y = batches.batch(0)
            return (net(x).argmax(1) == y).sum()

    def eval_row() -> dict[str, Any]:
        batches.set_plan(np.arange(n))  # in order, not augmented: the test loader's (runners.gather_eval_batch)
        model.eval()
        return _step_fields(setup, evaluate, sync, time_first=compiled)

    epoch_plan = plans.epoch_plan(setup.seed, 1, n)  # the Flax epoch's plan, drawn before the clock

    def epoch() -> None:
        batches.set_plan(*epoch_plan)  # as train_epoch's put_plan
        for x, y in batches:  # every batch, the last one short, as the notebooks' loops iterate their loader
            train_on(x, y)
        correct.item()  # read the epoch's metrics once, at its end

    def epoch_row() -> dict[str, Any]:
        model.train()
        if n % b:  # the short last batch: a new shape (torch.compile recompiles) outside the timed epoch
            train_on(*batches.batch(len(batches) - 1))
        return _epoch_fields(setup, epoch, sync)

    _measure(setup, impl, "torch" if device.type == "cuda" else "rss",
             {"train step": train_row, "eval step": eval_row, "epoch": epoch_row}, rows)


def run_benchmark(config: BenchConfig, log: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Benchmark the Flax step against the torch variants as ``config`` says; one dict per (implementation, phase),
    phase by phase (``PHASES``), then implementation (``IMPLS``); ``format_table`` prints them. A model argument the
    model does not take is a ``ValueError`` (``registry.model_kwargs``), before anything is drawn."""
    model_name, batch_size, precision, seed = config.model, config.batch_size, config.precision, config.seed
    # before jax first touches a device, which would otherwise take 75% of a GPU's memory, leaving torch little
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    kwargs = registry.model_kwargs(model_name, dict(config.model_kwargs))
    # the model's notebook recipe, with augmentation on: the benchmark includes the on-device crop + flip
    recipe = dataclasses.replace(get_recipe(registry.get_spec(model_name).recipe), batch_size=batch_size,
                                 eval_batch_size=batch_size, augment=True)
    rng = np.random.default_rng(seed)
    n = max(config.epoch_images, batch_size)  # at least one batch
    images, labels = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, n).astype(np.int32)
    device = jax.devices()[0]
    setup = _Setup(model_name, kwargs, batch_size, precision, config.warmup, config.steps,
                   PHASES if config.epoch_images else PHASES[:2], seed, recipe, images, labels, device.platform,
                   log or (lambda _: None))
    rows, macs = _flax_rows(setup)
    rows += _torch_rows(setup, config.torch_compile)
    flax = {r["phase"]: r["images_per_s"] for r in rows if r["impl"] == "flax"}
    peak = _peak_tflops(device.device_kind, precision) if device.platform == "gpu" else None
    for r in rows:
        r.update(model=model_name, model_kwargs=kwargs, batch_size=batch_size, precision=precision,
                 platform=device.platform, device_kind=device.device_kind)
        if r["images_per_s"]:
            r["gflop"] = (2 if r["phase"] == "eval step" else 6) * macs / 1e9  # 2 per MAC; training: x 3
            r["flax_speedup"] = flax[r["phase"]] / r["images_per_s"]
            # gflop per batch x batches per second / the peak
            r["mfu"] = r["gflop"] * r["images_per_s"] / batch_size / (peak * 1e3) if peak else None
    return sorted(rows, key=lambda r: (PHASES.index(r["phase"]), IMPLS.index(r["impl"])))


def environment() -> dict[str, Any]:
    """Where a run ran: date, versions, device, CPU and load, for report headers and JSON files."""
    import torch

    device = jax.devices()[0]
    return {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            **{name: metadata.version(name) for name in ("jax", "jaxlib", "flax", "optax", "torch")},
            "python": platform.python_version(), "machine": platform.machine(),
            "device": str(device), "device_count": jax.device_count(), "platform": device.platform,
            "device_kind": device.device_kind, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "xla_flags": os.environ.get("XLA_FLAGS", ""), "malloc_tuned": cpu.tuned_allocator(),
            "load_avg": load_average(), "cpu": describe_cpu()}


def describe_cpu(cpuinfo: str | None = None) -> dict[str, Any]:
    """The CPU's model and whether it has AVX2, FMA and AVX-512 (None where unknown), with ``text``, one line: XLA:CPU
    and torch pick their kernels by these, so CPU speeds compare only with them known. ``cpuinfo``: the text of
    ``/proc/cpuinfo`` (default: read it; without one, ``platform.processor()`` and unknown extensions)."""
    if cpuinfo is None:
        path = Path("/proc/cpuinfo")
        cpuinfo = path.read_text(errors="replace") if path.exists() else ""
    first = cpuinfo.split("\n\n")[0].splitlines()  # the first processor's block
    fields = {key.strip().lower(): value.strip() for key, sep, value in (line.partition(":") for line in first) if sep}
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
    if isinstance(value, float):
        fmt = {"mfu": "{:.1%}", "flax_speedup": "{:.2f}x"}.get(key, "{:.3g}" if value < 100 else "{:,.0f}")
        return fmt.format(value)
    return str(value)


def format_table(rows: Sequence[dict[str, Any]], cpu_text: str) -> str:
    """The rows as an aligned text table, under a header naming the run, the CPU (``describe_cpu``'s text: the
    host's CPU matters on GPUs too, it feeds them) and what the columns measure."""
    lines = [tables.format_table(list(COLUMNS.values()), [[_fmt(key, row[key]) for key in COLUMNS] for row in rows],
                                 align="".join("l" if key in ("phase", "impl", "status") else "r" for key in COLUMNS),
                                 rule=True)]
    if rows:
        r, epoch = rows[0], next((x for x in rows if x["epoch_s"]), None)
        kinds = "; ".join(sorted({x["peak_mem_kind"] for x in rows if x["peak_mem_kind"]}))
        lines[:0] = [
            f"{registry.constructor_call(r['model'], r['model_kwargs'])}, batch {r['batch_size']}, {r['precision']}, "
            f"{r['platform']} ({r['device_kind']}), load avg at start {r['load_avg_1m']}", f"CPU: {cpu_text}",
            *([f"epoch rows: {epoch['images_per_s'] * epoch['epoch_s']:.0f} images; ms/step is the epoch's mean"]
              if epoch else []),
            "GFLOP/step: analytic (conv + matmul MACs x 2, x 3 for training); XLA GFLOP: XLA cost analysis of the "
            f"compiled Flax step; peak MB: {kinds or 'n/a'}"]
    return "\n".join(lines)
