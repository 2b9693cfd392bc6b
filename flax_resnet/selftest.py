"""Self-test on a new machine (``flax-resnet selftest``; docs/speed.md): in one process,
on whatever device JAX sees, whether the Flax port computes what the PyTorch reference computes there, and how fast
both are. The parts run in ``PARTS`` order, ``parity`` (which decides the exit code) first; ``selftest.json`` and
``selftest.md`` are rewritten after each part, so a run stopped early keeps what it measured. What each part
costs on a CPU and on a GPU: BENCHMARKS.md, "GPU".
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
import time
import traceback
from collections.abc import Callable, Collection, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from flax_resnet import bench, builders, files, parity, registry, tables, training
from flax_resnet.config import BENCH_QUICK, SELFTEST_PARTS, BenchConfig, ModelConfig, RunConfig
from flax_resnet.data import synthetic_dataset
from flax_resnet.errors import FlaxResnetError
from flax_resnet.port import torch_shapes
from flax_resnet.precision import apply_precision
from flax_resnet.recipes import get_recipe

__all__ = ["FULL", "PARTS", "QUICK", "RUN_PARTS", "Plan", "run", "to_markdown", "verdict_line"]

PARTS = SELFTEST_PARTS  # in the order they run; each can be left out with --skip
RUN_PARTS = tuple(p for p in PARTS if p != "torch.compile")  # torch.compile: rows of bench, not a part of its own
JSON_FILE, MARKDOWN_FILE = "selftest.json", "selftest.md"


@dataclasses.dataclass(frozen=True)
class Plan:
    """The sizes of one self-test: the full one for a GPU, or ``--quick``'s for a CPU."""

    name: str
    parity_models: tuple[tuple[str, dict[str, Any]], ...]  # (name, constructor arguments)
    parity_input: tuple[int, int]  # (batch, height = width) of the parity batch; SimpleNet's fc needs 32x32
    shape_models: tuple[str, ...]  # models only shape-checked (state_dict and output shapes, nothing computed)
    bench: BenchConfig  # run in bf16 and fp32; torch.compile only where selftest --skip leaves it
    epochs_model: str
    epochs_kwargs: dict[str, Any]
    epochs_batch: int
    num_train: int
    num_test: int
    epochs: int = 2
    estimate_epochs: int = 20  # the resnet18-cifar recipe's


def _every_model() -> tuple[tuple[str, dict[str, Any]], ...]:
    """Every model of the registry with one block per stage: the deeper ones repeat the same layers."""
    one_block = {"n_blocks": 1, "num_blocks": (1, 1, 1, 1)}
    return tuple((name, {arg: one_block[arg] for arg in spec.args if arg in one_block})
                 for name, spec in registry.MODELS.items())


# The bench's epoch rows are 97 full batches: a short last batch would be one more compilation per implementation.
FULL = Plan("full", _every_model(), (4, 32), (),
            BenchConfig("ResNet18", batch_size=512, warmup=3, steps=20, epoch_images=97 * 512),
            "ResNet18", {}, 512, 50_000, 10_000)
# bench --quick, with fewer steps and a two-batch epoch (torch's bf16 autocast takes seconds per step on a 2-core
# CPU); ResNet-18 only shape-checked
QUICK = Plan("quick", (("SimpleResNet", {"n_blocks": 1}), ("SimpleNet", {})), (2, 16), ("ResNet18",),
             dataclasses.replace(BENCH_QUICK, warmup=1, steps=2, epoch_images=2 * BENCH_QUICK.batch_size),
             "SimpleResNet", {"n_blocks": 1}, 32, 512, 128)

# (dtype, precision, gradients, counted): the comparisons of the parity parts; float32 gradients are left out for
# time (``verify`` checks them), and the default-precision rows (TF32 on NVIDIA GPUs) never fail the self-test
_PARITY_CHECKS = (("float64", "highest", True, True), ("float32", "highest", False, True))
_DEFAULT_CHECKS = (("float32", "default", False, False),)


# ------------------------------------------------------------------------------------------- parity
def _worst(rows: list[parity.Row], section: str) -> float | str | None:
    errors = [row.rel_err for row in rows if row.section == section]
    if not errors:
        return None
    worst = max(errors, key=lambda e: math.inf if math.isnan(e) else e)
    return worst if math.isfinite(worst) else str(worst)


def _parity_rows(plan: Plan, checks: tuple[tuple[str, str, bool, bool], ...],
                 say: Callable[[str], None]) -> list[dict[str, Any]]:
    """One row per (model, check): ``parity.compare``'s verdict and worst relative error per section."""
    import torch

    rows = []
    batch, size = plan.parity_input
    # torch on the GPU too when JAX has one, so that the default-precision rows show both frameworks' TF32
    device = "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"
    for name, kwargs in plan.parity_models:
        torch_model = builders.build_torch(name, kwargs, seed=0)
        parity.perturb_batchnorm(torch_model)
        torch_model.to(device)
        flax_model = builders.build_flax_to_fill(name, kwargs)  # port_weights=True fills it with torch's weights
        shape = (batch, 3, 32, 32) if name == "SimpleNet" else (batch, 3, size, size)
        for dtype, precision, gradients, counted in checks:
            t0 = time.perf_counter()
            # The informational rows (default precision: TF32 on GPUs) report the raw distance from the fixed
            # tolerance; the float32 verdict's float64 references would call TF32's rounding within parity.
            report = parity.compare(torch_model, flax_model, input_shape=shape, dtype=dtype, gradients=gradients,
                                    port_weights=True, precision=precision, references=counted)
            tol = report.tolerance
            if counted:
                status = "ok" if report.ok else "FAIL"
            else:
                status = "within tolerance" if report.ok else "exceeds tolerance"
            row = {"model": name, "kwargs": kwargs, "check": "parity", "dtype": dtype, "precision": precision,
                   "torch_device": device, "gradients": gradients, "counted": counted, "ok": report.ok,
                   "status": status, "input_shape": list(shape),
                   "comparisons": sum(r.compared for r in report.rows), "failures": len(report.failures),
                   "outputs_rel_err": _worst(report.rows, "outputs"),
                   "statistics_rel_err": _worst(report.rows, "running statistics"),
                   "gradients_rel_err": _worst(report.rows, "gradients"),
                   "weights_rel_err": _worst(report.rows, "weights"),
                   "tolerance": tol.values, "gradient_tolerance": tol.gradients if gradients else None,
                   "first_divergence": report.first_divergence, "seconds": time.perf_counter() - t0}
            if not report.ok:
                row["report"] = report.table()
            rows.append(row)
            say(f"{registry.constructor_call(name, kwargs)} {dtype} {precision}: {status} ({row['seconds']:.1f} s)")
    return rows


def _shape_rows(plan: Plan, say: Callable[[str], None]) -> list[dict[str, Any]]:
    """Models too big to compare on a small CPU: their state_dict keys and shapes and their output shape, with
    no arithmetic (``nnx.eval_shape`` and torch's meta device)."""
    import torch

    rows = []
    for name in plan.shape_models:
        t0 = time.perf_counter()
        kwargs = registry.model_kwargs(name)
        with torch.device("meta"):
            torch_model = builders.build_torch(name, kwargs).eval()
            out_t = tuple(torch_model(torch.empty(2, 3, 32, 32)).shape)
        want = {key: tuple(value.shape) for key, value in torch_model.state_dict().items()}
        abstract = nnx.eval_shape(lambda name=name, kwargs=kwargs: builders.build_flax(name, kwargs))
        have = torch_shapes(abstract)
        abstract.eval()
        graphdef, state = nnx.split(abstract)
        out_f = jax.eval_shape(lambda s, x, g=graphdef: nnx.merge(g, s)(x), state,
                               jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)).shape
        problems = [f"state_dict {key}: torch {want.get(key)}, Flax {have.get(key)}" for key in {*want, *have}
                    if want.get(key) != have.get(key)]
        if tuple(out_f) != out_t:
            problems.append(f"output: torch {out_t}, Flax {tuple(out_f)}")
        ok = not problems
        rows.append({"model": name, "kwargs": kwargs, "check": "shapes", "dtype": "float32", "precision": "n/a",
                     "gradients": False, "counted": True, "ok": ok, "status": "ok" if ok else "FAIL",
                     "input_shape": [2, 3, 32, 32], "comparisons": len(want) + 1, "failures": len(problems),
                     "first_divergence": None if ok else sorted(problems)[0], "problems": sorted(problems)[:20],
                     "seconds": time.perf_counter() - t0})
        say(f"{registry.constructor_call(name, kwargs)} shapes: {rows[-1]['status']} ({rows[-1]['seconds']:.1f} s)")
    return rows


# ------------------------------------------------------------------------------------------- bench, epochs
def _bench_rows(plan: Plan, torch_compile: bool, say: Callable[[str], None]) -> dict[str, list[dict[str, Any]]]:
    """``bench.run_benchmark`` in bf16 and fp32 (torch.compile where both the plan and ``torch_compile`` say so)."""
    return {precision: bench.run_benchmark(
        dataclasses.replace(plan.bench, precision=precision, torch_compile=plan.bench.torch_compile and torch_compile),
        log=lambda message, p=precision: say(f"{p}: {message}")) for precision in ("bf16", "fp32")}


def _epoch_rows(plan: Plan, say: Callable[[str], None]) -> dict[str, Any]:
    """Two epochs through ``training.train`` (as ``train.py train --precision bf16 --dataset synthetic``)."""
    t0 = time.perf_counter()
    data = synthetic_dataset(plan.num_train, plan.num_test, seed=0)
    data_s = time.perf_counter() - t0
    say(f"synthetic data: {plan.num_train:,} + {plan.num_test:,} images ({data_s:.1f} s)")
    recipe = dataclasses.replace(get_recipe("resnet18-cifar"), epochs=plan.epochs, batch_size=plan.epochs_batch)
    config = RunConfig(recipe=recipe, model=ModelConfig(plan.epochs_model, plan.epochs_kwargs), precision="bf16")
    model = apply_precision(builders.build_flax(plan.epochs_model, plan.epochs_kwargs, seed=0), "bf16")
    result = training.train(config, model=model, dataset=data, log=say, title="selftest")
    times, rates = result.history["epoch_time"], result.history["images_per_sec"]
    first, second = times[0], times[-1]
    return {"model": plan.epochs_model, "kwargs": plan.epochs_kwargs, "recipe": recipe.name, "precision": "bf16",
            "batch_size": plan.epochs_batch, "eval_batch_size": recipe.eval_batch_size, "num_train": plan.num_train,
            "num_test": plan.num_test, "data_s": data_s, "epoch_times_s": times,
            "first_epoch_s": first, "epoch_s": second, "train_images_per_s": rates[-1],
            "test_acc": result.history["test_acc"], "estimate_epochs": plan.estimate_epochs,
            "estimate_s": first + (plan.estimate_epochs - 1) * second}


# ------------------------------------------------------------------------------------------- run
def run(out_dir: str | Path, *, quick: bool = False, skip: Collection[str] = (),
        log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the self-test, writing ``selftest.json`` and ``selftest.md`` to ``out_dir`` after each part; returns the
    JSON document. ``doc['verdict']``: PASS (every part not skipped ran, every parity row held), FAIL (a parity row
    or a part failed: ``doc['failed']``) or INCOMPLETE (a part was interrupted or is still to run, or ``skip`` left
    nothing to run: ``doc['not_run']``); ``doc['ok']``: PASS. A Ctrl-C (or SIGTERM in the command line) ends the run
    after the report says so, and propagates."""
    unknown = sorted(set(skip) - set(PARTS))
    if unknown:
        raise ValueError(f"unknown part(s) {', '.join(unknown)} to skip; the parts are {', '.join(PARTS)}")
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        files.write_atomic(out_dir / JSON_FILE, "{}\n")  # fails now, not after minutes of measuring
    except OSError as e:
        raise FlaxResnetError(f"cannot write to --out {out_dir} ({e.strerror or e}); choose another --out") from e
    # Let torch and jax share a GPU (as bench does): read when jax first touches a device, which is below.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    started = time.perf_counter()

    def say(message: str) -> None:
        line = f"[selftest {time.perf_counter() - started:6.1f}s] {message}"
        (log or (lambda text: print(text, file=sys.stderr, flush=True)))(line)

    plan = QUICK if quick else FULL
    env = bench.environment()
    planned = [name for name in RUN_PARTS if name not in skip]
    doc: dict[str, Any] = {"mode": plan.name, "skipped": sorted(skip), "environment": env, "parts": {},
                           "parity": [], "bench": {}, "epochs": None, "plan": dataclasses.asdict(plan)}
    say(f"{plan.name} self-test on {env['device']} ({env['device_kind']}); CPU {env['cpu']['text']}; writing to "
        f"{out_dir}")

    def save() -> None:
        failed = [f"{registry.constructor_call(r['model'], r['kwargs'])} {r['check']} {r['dtype']}: first "
                  f"divergence {r['first_divergence']}" for r in doc["parity"] if r["counted"] and not r["ok"]]
        failed += [f"part {name}: {part['status']}" for name, part in doc["parts"].items()
                   if part["status"] not in ("ok", "interrupted")]
        # a part interrupted or not reached did not run; a run whose --skip left nothing measured nothing
        not_run = [name for name in planned if doc["parts"].get(name, {}).get("status") in (None, "interrupted")]
        verdict = "FAIL" if failed else "INCOMPLETE" if not_run or not planned else "PASS"
        doc.update(ok=verdict == "PASS", verdict=verdict, failed=failed, not_run=not_run,
                   total_s=time.perf_counter() - started)
        try:
            # rewritten after every part: a reader (or a Ctrl-C) never finds half a report
            files.write_atomic(out_dir / JSON_FILE, json.dumps(doc, indent=2, default=str) + "\n")
            files.write_atomic(out_dir / MARKDOWN_FILE, to_markdown(doc))
        except OSError as e:
            raise FlaxResnetError(f"could not write the report to {out_dir} ({e.strerror or e}); choose another "
                                  "--out") from e

    @contextlib.contextmanager
    def part(name: str) -> Iterator[None]:
        """Time one part into ``doc['parts']``, then save; an exception ends the part (recorded, the run goes on)."""
        say(f"{name}: start")
        t0 = time.perf_counter()
        try:
            yield
            status = "ok"
        except Exception as e:  # noqa: BLE001 - a crashed part is a failed self-test, the other parts still run
            status = f"error: {type(e).__name__}: {' '.join(str(e).split())[:300]}"
            doc.setdefault("errors", {})[name] = traceback.format_exc()
        except KeyboardInterrupt:  # the report must not keep saying PASS for the parts before: INCOMPLETE
            doc["parts"][name] = {"status": "interrupted", "seconds": time.perf_counter() - t0}
            save()
            raise
        doc["parts"][name] = {"status": status, "seconds": time.perf_counter() - t0}
        say(f"{name}: {status} in {doc['parts'][name]['seconds']:.1f} s (total {time.perf_counter() - started:.1f} s)")
        save()

    if "parity" not in skip:
        with part("parity"):
            doc["parity"] += _parity_rows(plan, _PARITY_CHECKS, say) + _shape_rows(plan, say)
    if "default-precision" not in skip:
        with part("default-precision"):
            doc["parity"] += _parity_rows(plan, _DEFAULT_CHECKS, say)
    if "bench" not in skip:
        with part("bench"):
            doc["bench"] = _bench_rows(plan, "torch.compile" not in skip, say)
    if "epochs" not in skip:
        with part("epochs"):
            doc["epochs"] = _epoch_rows(plan, say)
    env["load_avg_end"] = bench.load_average()
    save()
    return doc


# ------------------------------------------------------------------------------------------- report
def verdict_line(doc: dict[str, Any]) -> str:
    """PASS, FAIL with what failed, or INCOMPLETE with the parts that did not run (also after a FAIL)."""
    interrupted = [name for name, part in doc["parts"].items() if part["status"] == "interrupted"]
    not_run = ", ".join(f"{name} (interrupted)" if name in interrupted else name for name in doc.get("not_run", []))
    incomplete = "**INCOMPLETE**: " + (f"not run: {not_run}" if not_run else
                                       f"nothing ran (--skip {' '.join(doc['skipped'])})")
    if doc.get("verdict") == "PASS":
        return "**PASS**: every parity row holds"
    if doc.get("verdict") == "FAIL":
        return "**FAIL**: " + "; ".join(doc["failed"]) + (f"; {incomplete}" if not_run else "")
    return incomplete


def _err(value: Any) -> str:
    if value is None:
        return "-"
    return value if isinstance(value, str) else ("0" if value == 0 else f"{value:.1e}")


def _table(header: list[str], rows: list[list[str]], align: str) -> list[str]:
    """A Markdown table, unpadded: a row's text is the same whatever the other rows hold (the tests look for it)."""
    return [tables.format_table(header, rows, align=align, markdown=True, pad=False)]


def to_markdown(doc: dict[str, Any]) -> str:
    """``selftest.md``: the verdict, the environment, one table per part, the time per part."""
    env = doc["environment"]
    lines = [f"# flax-resnet self-test ({doc['mode']})", "", verdict_line(doc), "",
             f"- date: {env['date']}",
             f"- device: {env['device']} ({env['platform']}, {env['device_kind']}, {env['device_count']} device(s))",
             f"- CPU: {env['cpu']['text']}, {env['cpu_count']} logical CPUs, load average at start {env['load_avg']}"
             f", at end {env.get('load_avg_end', 'n/a')}",
             f"- versions: python {env['python']}, jax {env['jax']}, jaxlib {env['jaxlib']}, flax {env['flax']}, "
             f"optax {env['optax']}, torch {env['torch']}",
             f"- skipped: {', '.join(doc['skipped']) or 'nothing'}", ""]
    if doc["parity"]:
        lines += ["## Parity (torch_ref vs Flax, relative error max|flax - torch| / max|torch| per tensor, the "
                  "worst tensor)", "",
                  "Rows at precision `default` are informational (XLA's and torch's default float32 precision, "
                  "TF32 on NVIDIA GPUs): they never fail the self-test.", ""]
        rows = [[registry.constructor_call(r["model"], r["kwargs"]), r["check"], r["dtype"], r["precision"],
                 "x".join(map(str, r["input_shape"])), _err(r.get("outputs_rel_err")),
                 _err(r.get("statistics_rel_err")), _err(r.get("gradients_rel_err")),
                 f"{r['tolerance']:g}" + (f" / {r['gradient_tolerance']:g}" if r.get("gradient_tolerance") else "")
                 if "tolerance" in r else "-", r["status"] + ("" if r["ok"] else f" ({r['first_divergence']})"),
                 f"{r['seconds']:.1f}"] for r in doc["parity"]]
        lines += _table(["model", "check", "dtype", "precision", "input", "outputs", "BN statistics", "gradients",
                         "tolerance", "status", "s"], rows, "lllllrrrrlr")
        lines.append("")
        for r in doc["parity"]:
            if r["counted"] and not r["ok"]:
                detail = r.get("report") or "\n".join(r.get("problems", []))
                title = f"{registry.constructor_call(r['model'], r['kwargs'])} {r['check']} {r['dtype']}"
                lines += [f"### {title}", "", "```", detail, "```", ""]
    for precision, rows in doc["bench"].items():
        lines += [f"## Benchmark, {precision}", "", "```", bench.format_table(rows, env["cpu"]["text"]), "```", ""]
    if doc["epochs"]:
        e = doc["epochs"]
        lines += ["## Training through training.train (synthetic CIFAR-sized data)", ""]
        lines += _table(["model", "precision", "batch", "train / test images", "epoch 1 s (compiles)",
                         "epoch 2 s", "train img/s", f"{e['estimate_epochs']} epochs (estimate)"],
                        [[registry.constructor_call(e["model"], e["kwargs"]), e["precision"], str(e["batch_size"]),
                          f"{e['num_train']:,} / {e['num_test']:,}", f"{e['first_epoch_s']:.1f}", f"{e['epoch_s']:.1f}",
                          f"{e['train_images_per_s']:,.0f}", f"{e['estimate_s']:,.0f} s"]], "llrrrrrr")
        lines += ["", f"Epoch times include the evaluation of the {e['num_test']:,} test images; the estimate is "
                  f"epoch 1 plus {e['estimate_epochs'] - 1} epochs like epoch 2. Data generation took "
                  f"{e['data_s']:.1f} s.", ""]
    lines += ["## Time per part", ""]
    lines += _table(["part", "status", "s"], [[name, part["status"], f"{part['seconds']:.1f}"]
                                               for name, part in doc["parts"].items()]
                    + [["total", "", f"{doc.get('total_s', 0):.1f}"]], "llr")
    return "\n".join(lines) + "\n"
