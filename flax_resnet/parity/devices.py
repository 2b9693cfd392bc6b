"""N devices against one device and against PyTorch DDP: ``train.py verify --devices N --steps K``.

In float64, K SGD steps of a registered model (the recipe of its notebook, the global batch ``batch``) are taken

- by the Flax runners of ``flax_resnet.training.parallel``: one device (``single``) and every ``--parallel`` kind on
  N devices (simulated CPU devices where fewer are present: JAX fixes its device count when it starts, so this part
  runs in a subprocess started with ``--xla_force_host_platform_device_count=N``);
- by PyTorch ``DistributedDataParallel`` on N processes over gloo on 127.0.0.1 (``torch_ref.ddp``), each rank fed
  its contiguous share of the same global batches (the same epoch plans, ``flax_resnet.data.plan``);

from the same weights (torch's initialisation from ``seed``, ported), and the losses of every step, the final
parameters and the BatchNorm statistics are compared with DDP's (rank 0's), one row per path.

``bn_sync=True`` (``--bn-sync on``): BatchNorm over the global batch, against DDP with a synchronised BatchNorm
(``torch_ref.ddp.SyncBatchNorm``); one device computes the same. ``bn_sync=False``: per-device statistics with
device 0's running statistics kept, against DDP with plain BatchNorm (rank 0's buffers, which DDP broadcasts); one
device cannot compute that (its BatchNorm sees the whole batch), so its row is a control that must differ (it
shows the comparison can tell the two BatchNorms apart). A kind that refuses ``bn_sync=False`` is left out with
its reason as a note.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from flax_resnet import builders, registry
from flax_resnet.config import with_recipe
from flax_resnet.errors import FlaxResnetError
from flax_resnet.parity.forward import TOLERANCES
from flax_resnet.recipes import RECIPES

__all__ = ["TOLERANCE", "DeviceReport", "DeviceRunError", "DeviceSettingsError", "PathRow", "Run", "compare",
           "compare_devices", "run_ddp", "run_flax"]

# After a step, parameters and statistics carry the gradients' rounding: parity.TOLERANCES' float64 gradient
# tolerance. The paths sum in different orders (convolution algorithms, the all-reduce of N gradients, BatchNorm's
# reductions), each within float64 rounding (unit roundoff 1.1e-16; measured up to 3e-13 after 3 steps of
# ResNet-18 on 4 devices, docs/multi-device.md), while per-device against global BatchNorm statistics, a sample
# on the wrong device or a lost weight decay is off by 1e-4 or more (the control row: 5e-1).
TOLERANCE = TOLERANCES["float64"].gradients
NUM_CLASSES = 10  # every registered model ends in CIFAR-10's 10 classes
# XLA's CPU backend spends most of a short run in LLVM's optimisation passes (model set-up 15-20 s at the default
# level on two busy cores, 2 s without); it changes no float64 result beyond rounding
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


class DeviceSettingsError(FlaxResnetError, ValueError):
    """Settings the comparison cannot run with (a batch the devices cannot share, a model with dropout)."""


class DeviceRunError(FlaxResnetError):
    """A part of the comparison (the Flax subprocess, the DDP processes) failed or did not finish in time."""


# ------------------------------------------------------------------------------------------------ report
@dataclasses.dataclass(frozen=True)
class Run:
    """What one path computed: the loss of every step (of the global batch) and the final state_dict, in torch's
    names and layout."""

    name: str
    losses: np.ndarray
    state_dict: Mapping[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class PathRow:
    """One path against the reference: the worst relative error per kind of tensor (inf: a tensor missing)."""

    path: str
    loss: float
    parameters: float
    statistics: float
    tolerance: float
    control: bool = False  # expected to differ: one device under bn_sync=False

    @property
    def worst(self) -> float:
        errors = (self.loss, self.parameters, self.statistics)
        return math.inf if any(math.isnan(e) for e in errors) else max(errors)

    @property
    def ok(self) -> bool:
        """Equal within the tolerance; for a control row, different beyond it."""
        return (self.worst > self.tolerance) if self.control else (self.worst <= self.tolerance)


@dataclasses.dataclass
class DeviceReport:
    """What ``compare_devices`` found; ``table()`` is what ``verify --devices`` prints."""

    model: str
    devices: int
    steps: int
    bn_sync: bool
    batch: int
    image_size: int
    reference: str
    rows: list[PathRow]
    tolerance: float = TOLERANCE
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Every path equal to the reference (and every control row different); at least one path compared."""
        return any(not r.control for r in self.rows) and all(r.ok for r in self.rows)

    def table(self) -> str:
        bn = ("on: BatchNorm over the global batch; DDP with a synchronised BatchNorm" if self.bn_sync else
              "off: per-device BatchNorm, device 0's running statistics kept; DDP with plain BatchNorm")
        reference = f"{self.reference} (rank 0)"
        width = max([len(r.path) for r in self.rows] + [len(reference)])
        lines = [f"{self.model} on {self.devices} devices, {self.steps} steps, global batch {self.batch} at "
                 f"{self.image_size}x{self.image_size}, float64",
                 f"--bn-sync {bn}",
                 f"each path against DDP's rank 0: relative error max|path - DDP| / max|DDP| of the worst tensor of "
                 f"each kind (the loss: of every step); equal within {self.tolerance:g}",
                 "",
                 f"{'path':<{width}}  {'loss':>8}  {'parameters':>10}  {'BN statistics':>13}  verdict",
                 f"{reference:<{width}}  {'-':>8}  {'-':>10}  {'-':>13}  the reference"]
        for r in self.rows:
            if r.control:
                verdict = "differs, as it must (one device's BatchNorm sees the whole batch)" if r.ok else \
                    "EQUAL, but must differ: the comparison cannot tell the BatchNorms apart"
            else:
                verdict = "equal" if r.ok else "DIFFERENT"
            lines.append(f"{r.path:<{width}}  {_number(r.loss):>8}  {_number(r.parameters):>10}  "
                         f"{_number(r.statistics):>13}  {verdict}")
        lines += [f"note: {note}" for note in self.notes]
        compared = [r for r in self.rows if not r.control]
        if self.ok:
            lines.append(f"OK: {len(compared)} paths equal to DDP within {self.tolerance:g}")
        else:
            bad = [r.path for r in self.rows if not r.ok]
            lines.append(f"DIFFERENT: {', '.join(bad) or 'no path compared'}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _number(value: float) -> str:
    return "0" if value == 0 else f"{value:.1e}"


def _rel(got: np.ndarray, want: np.ndarray) -> float:
    """max|got - want| / max|want| (the absolute difference where ``want`` is all zeros); inf on a shape
    mismatch."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if got.shape != want.shape:
        return math.inf
    diff = float(np.max(np.abs(got - want), initial=0.0))
    scale = float(np.max(np.abs(want), initial=0.0))
    return diff / scale if diff and scale else diff


def compare(reference: Run, runs: list[Run], parameters: list[str], *, control: str | None = None,
            tolerance: float = TOLERANCE) -> list[PathRow]:
    """Each run against ``reference``: the worst relative error of the per-step losses, of the ``parameters``
    (state_dict keys) and of the other state_dict entries (BatchNorm statistics and counters). ``control``: the
    name of a run that must differ."""
    rows = []
    for run in runs:
        def worst(keys: list[str], run: Run = run) -> float:
            return max((_rel(run.state_dict[k], reference.state_dict[k]) if k in run.state_dict else math.inf
                        for k in keys), default=0.0)

        statistics = [k for k in reference.state_dict if k not in parameters]
        rows.append(PathRow(run.name, _rel(run.losses, reference.losses), worst(parameters), worst(statistics),
                            tolerance, control=run.name == control))
    return rows


# ------------------------------------------------------------------------------------------------ inputs
def _inputs(batch: int, image_size: int, steps_per_epoch: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded training split of ``steps_per_epoch`` batches: uint8 NHWC images and labels."""
    rng = np.random.default_rng(seed)
    n = batch * steps_per_epoch
    return (rng.integers(0, 256, (n, image_size, image_size, 3), dtype=np.uint8),
            rng.integers(0, NUM_CLASSES, n).astype(np.int64))


# -------------------------------------------------------------------------------------------- the Flax side
_WORKER = "import sys; from flax_resnet.parity.devices import _flax_worker; _flax_worker(sys.argv[1])"


def _subprocess_env(devices: int) -> dict[str, str]:
    """This environment with N simulated CPU devices (an existing device-count flag replaced; the flag only
    concerns the CPU platform) and this checkout's ``flax_resnet`` first on the path."""
    env = dict(os.environ)
    flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", env.get("XLA_FLAGS", ""))
    env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={devices} {FAST_COMPILE}".strip()
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # an accelerator it may not use keeps its memory
    return env


def run_flax(model: str, kwargs: Mapping[str, Any], state_dict: Mapping[str, np.ndarray], images: np.ndarray,
             labels: np.ndarray, *, recipe: str, batch: int, devices: int, steps: int, bn_sync: bool, seed: int,
             timeout_s: float = 600) -> tuple[list[Run], list[str]]:
    """K steps of the Flax model (from ``state_dict``, torch layout) with one device and with every parallel kind
    on ``devices`` devices, in a fresh process (see the module docstring); the runs and the notes of kinds left
    out."""
    with tempfile.TemporaryDirectory(prefix="verify-devices-") as tmp:
        folder = Path(tmp)
        np.savez(folder / "inputs.npz", images=images, labels=labels,
                 **{f"sd/{k}": np.asarray(v) for k, v in state_dict.items()})
        spec = {"model": model, "kwargs": dict(kwargs), "recipe": recipe, "batch": batch, "devices": devices,
                "steps": steps, "bn_sync": bn_sync, "seed": seed}
        (folder / "spec.json").write_text(json.dumps(spec))
        try:
            done = subprocess.run([sys.executable, "-c", _WORKER, tmp], env=_subprocess_env(devices),
                                  capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise DeviceRunError(f"the Flax runs on {devices} devices did not finish within {timeout_s:g} s; "
                                 "try fewer --steps or a smaller model") from None
        if done.returncode != 0:
            raise DeviceRunError(f"the Flax runs on {devices} devices failed (exit {done.returncode}):\n"
                                 f"{(done.stdout + done.stderr)[-3000:]}")
        result = json.loads((folder / "result.json").read_text())
        with np.load(folder / "flax.npz") as arrays:
            runs = [Run(name, arrays[f"{kind}/losses"],
                        {k[len(kind) + 4:]: arrays[k] for k in arrays.files if k.startswith(f"{kind}/sd/")})
                    for kind, name in result["runs"]]
    return runs, result["notes"]


def _flax_worker(directory: str) -> None:
    """The Flax side, in the subprocess: every kind's K steps; writes flax.npz and result.json to ``directory``."""
    import jax
    import jax.numpy as jnp

    from flax_resnet import port
    from flax_resnet.data import plan as plan_lib
    from flax_resnet.dtypes import cast_floating
    from flax_resnet.training import engine, parallel

    folder = Path(directory)
    spec = json.loads((folder / "spec.json").read_text())
    jax.config.update("jax_enable_x64", True)  # a process of its own, float64 throughout
    wanted = spec["devices"]
    devices = jax.devices()
    if len(devices) < wanted:  # fewer accelerators than asked for: the simulated CPU devices
        devices = jax.devices("cpu")
        jax.config.update("jax_default_device", devices[0])
    devices = sorted(devices, key=lambda d: (d.process_index, d.id))[:wanted]
    with np.load(folder / "inputs.npz") as inputs:
        images, labels = inputs["images"], inputs["labels"]
        state_dict = {k[3:]: inputs[k] for k in inputs.files if k.startswith("sd/")}
    model = cast_floating(builders.build_flax_to_fill(spec["model"], spec["kwargs"]), jnp.float64)
    port.load_torch_state_dict(model, state_dict)
    recipe = with_recipe(RECIPES[spec["recipe"]], batch_size=spec["batch"])
    num, batch = len(labels), spec["batch"]
    per_epoch = plan_lib.steps_per_epoch(num, batch)
    tx = engine.make_optimizer(recipe, per_epoch)
    graphdef, state = engine.init_train_state(model, tx)
    state = jax.device_get(state)  # host copies: each runner puts (and donates) its own
    arrays: dict[str, np.ndarray] = {}
    runs, notes = [], []
    for kind in (k for k in parallel.PARALLEL_KINDS if k != "auto"):
        try:
            runner = parallel.make_runner(kind, graphdef, tx, recipe, dtype=jnp.float64, bn_sync=spec["bn_sync"],
                                          devices=devices)
        except (ValueError, FlaxResnetError) as e:  # e.g. a kind without per-device BatchNorm
            notes.append(f"--parallel {kind} left out: {e}")
            continue
        runner.check_batch_sizes(num, batch)
        data, state_now = runner.put_data(images, labels), runner.put_state(state)
        losses, plan = [], None
        for step in range(spec["steps"]):
            epoch, index = divmod(step, per_epoch)
            if index == 0:
                plan = runner.put_plan(plan_lib.epoch_plan(spec["seed"], epoch, num))
            start, stop = plan_lib.batch_bounds(index, num, batch)
            state_now, metrics = runner.train_step(state_now, runner.zero_metrics(), data, plan, start, stop - start)
            losses.append(float(jax.device_get(metrics.loss_of_batches)))
        final = jax.device_get(runner.get_state(state_now))
        arrays[f"{kind}/losses"] = np.array(losses)
        for key, value in port.to_numpy_state_dict(engine.merge_model(graphdef, final)).items():
            arrays[f"{kind}/sd/{key}"] = value
        n = runner.num_devices
        runs.append((kind, f"Flax, 1 device ({kind})" if kind == "single" else f"Flax, {n} devices, {kind}"))
    np.savez(folder / "flax.npz", **arrays)
    (folder / "result.json").write_text(json.dumps({"runs": runs, "notes": notes}))


# --------------------------------------------------------------------------------------------- the torch side
def run_ddp(torch_model: Any, images: np.ndarray, labels: np.ndarray, *, recipe: str, batch: int, devices: int,
            steps: int, bn_sync: bool, seed: int, timeout_s: float = 600) -> Run:
    """K steps of ``torch_model`` (a copy) under DDP on ``devices`` processes (``torch_ref.ddp.train_ddp``): rank
    0's losses and state_dict."""
    import torch

    from flax_resnet.data import plan as plan_lib
    from torch_ref import ddp

    r = with_recipe(RECIPES[recipe], batch_size=batch)
    num = len(labels)
    per_epoch = plan_lib.steps_per_epoch(num, batch)
    plans = []
    for epoch in range(-(-steps // per_epoch)):
        p = plan_lib.epoch_plan(seed, epoch, num)
        plans.append((p.permutation, p.offsets, p.flips) if r.augment else (p.permutation, None, None))
    try:
        result = ddp.train_ddp(torch_model, images, labels, plans, world_size=devices, steps=steps, batch_size=batch,
                               lr=r.lr, momentum=r.momentum, weight_decay=r.weight_decay, schedule=r.schedule,
                               epochs=r.epochs, milestones=r.milestones, gamma=r.gamma, mean=r.mean, std=r.std,
                               sync_bn=bn_sync, dtype=torch.float64, timeout_s=timeout_s)
    except TimeoutError as e:
        raise DeviceRunError(str(e)) from None
    kind = "synchronised BatchNorm" if bn_sync else "plain BatchNorm"
    return Run(f"torch DDP, {devices} processes, {kind}", np.array(result.losses), result.state_dict)


# ------------------------------------------------------------------------------------------------ the whole
def compare_devices(model: str, kwargs: Mapping[str, Any] | None = None, *, devices: int = 2, steps: int = 2,
                    bn_sync: bool = True, seed: int = 0, batch: int = 4, image_size: int = 16,
                    steps_per_epoch: int = 1, torch_model: Any = None, timeout_s: float = 600) -> DeviceReport:
    """K steps of ``model`` on one device, on ``devices`` devices with every parallel kind, and with torch DDP on
    ``devices`` processes, in float64, from the same weights (``torch_model``'s, default torch's initialisation
    from ``seed``) and the same global batches of ``batch`` generated images (``steps_per_epoch`` batches an
    epoch, each epoch's order and augmentation from ``flax_resnet.data.plan``); see the module docstring."""
    if devices < 2:
        raise DeviceSettingsError(f"devices must be at least 2 (one device is the single row), got {devices}")
    if batch % devices:
        raise DeviceSettingsError(f"a global batch of {batch} does not split evenly across {devices} devices; "
                                  f"give a multiple of {devices}")
    import torch

    kwargs = registry.model_kwargs(model, kwargs or {})
    recipe = registry.get_spec(model).recipe
    if torch_model is None:
        torch_model = builders.build_torch(model, kwargs, seed=seed)
    if any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in torch_model.modules()):
        raise DeviceSettingsError("dropout draws its masks from each framework's own generator, so runs with it "
                                  "cannot be compared: give the model p=0 (--dropout-p 0)")
    images, labels = _inputs(batch, image_size, steps_per_epoch, seed)
    state_dict = {k: (v.detach().cpu().double() if v.is_floating_point() else v.detach().cpu()).numpy().copy()
                  for k, v in torch_model.state_dict().items()}  # copies, not views of torch's memory
    common = {"recipe": recipe, "batch": batch, "devices": devices, "steps": steps, "bn_sync": bn_sync,
              "seed": seed, "timeout_s": timeout_s}
    # the two sides overlap: the Flax subprocess compiles while the DDP processes start and run
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        flax_side = pool.submit(run_flax, model, kwargs, state_dict, images, labels, **common)
        reference = run_ddp(torch_model, images, labels, **common)
        runs, notes = flax_side.result()
    parameters = [name for name, _ in torch_model.named_parameters()]
    has_batchnorm = any(k.endswith("running_mean") for k in reference.state_dict)
    control = None
    if not bn_sync and has_batchnorm:
        control = next((run.name for run in runs if run.name.endswith("(single)")), None)
    if not has_batchnorm:
        notes.append("the model has no BatchNorm: --bn-sync changes nothing")
    rows = compare(reference, runs, parameters, control=control)
    return DeviceReport(registry.constructor_call(model, kwargs), devices, steps, bn_sync, batch, image_size,
                        reference.name, rows, notes=notes)
