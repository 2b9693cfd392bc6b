"""What every experiment shares: its typed settings (a ``config.RunConfig`` plus the experiment's own frozen
``Settings``), training one run through ``training.train``, and the output files (summary.md, results.json, the
figure).

An experiment module has ``NAME``, ``BASE`` (its default ``RunConfig``), ``Settings``, ``QUICK`` (a
``config.Preset``; these four from ``experiments.settings``) and ``run(config, settings, ...)``. torch and
matplotlib, optional extras, are imported where they are used, after ``run_experiment`` has required them.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
from flax import nnx

from flax_resnet import data as datasets
from flax_resnet import files, registry, training
from flax_resnet.config import (
    RUNS_DIR,
    ConfigError,
    ModelConfig,
    ParallelConfig,
    Preset,
    RunConfig,
    with_recipe,
)
from flax_resnet.errors import require_all
from flax_resnet.recipes import Recipe
from flax_resnet.training.loop import write_json
from flax_resnet.training.outdir import claim_output_dir

__all__ = ["Context", "Outcome", "Report", "Run", "configure", "count_conv_layers", "count_params", "fmt",
           "refuse", "run_experiment", "settings_json", "to_jsonable"]

RESULTS_FILE = "results.json"
SUMMARY_FILE = "summary.md"


def configure(base: RunConfig, preset: Preset | None = None, *, recipe: Mapping[str, Any] | None = None,
              data: Mapping[str, Any] | None = None, model_kwargs: Mapping[str, Any] | None = None,
              **fields: Any) -> RunConfig:
    """``base`` with ``preset`` (an experiment's --quick) under the user's values (None: not given). The recipe
    values are applied in one ``with_recipe``, so multistep milestones scale from the notebook's run, not from the
    preset's. A preset's image size holds for synthetic data only, and its model arguments only where the model
    takes them (compare's --quick sets n_blocks 1 for SimpleResNet, not for ResNet18)."""
    preset = preset or Preset("none")
    given = {k: v for k, v in (data or {}).items() if v is not None}
    data_values = {**preset.data, **given}
    if data_values.get("dataset", base.data.dataset) != "synthetic" and "image_size" not in given:
        data_values.pop("image_size", None)
    takes = registry.get_spec(base.model.name).args if base.model.name in registry.MODELS else ()
    kwargs = {**{k: v for k, v in preset.model_kwargs.items() if k in takes},
              **{k: v for k, v in (model_kwargs or {}).items() if v is not None}}
    model = dataclasses.replace(base.model, kwargs={**base.model.kwargs, **kwargs})
    return base.replace(recipe=with_recipe(base.recipe, **{**preset.recipe, **(recipe or {})}), model=model,
                        data=dataclasses.replace(base.data, **data_values), **fields)


def refuse(name: str, config: RunConfig, base: RunConfig, why: str, *options: str) -> None:
    """A ``ConfigError`` when ``config`` sets one of ``options`` (``init_from``, ``framework``, ``dtype``,
    ``precision``, ``parallel``) away from ``base``'s: an experiment that cannot honour an option of ``train``
    refuses it in one line instead of ignoring it."""
    for option in options:
        value = config.model.init_from if option == "init_from" else getattr(config, option)
        default = base.model.init_from if option == "init_from" else getattr(base, option)
        if value != default:
            flag = {"parallel": "--parallel, --bn-sync and the multi-host options"}.get(
                option, f"--{option.replace('_', '-')}")
            raise ConfigError(f"{name} does not take {flag}: {why}.")


def count_params(model: Any) -> int:
    """Trainable parameters, as the notebooks count them: ``sum(p.numel() for p in model.parameters())``."""
    if hasattr(model, "parameters"):  # torch
        return int(sum(p.numel() for p in model.parameters()))
    return int(sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))))


def count_conv_layers(model: Any) -> int:
    """Conv layers on the main path (3x3 and larger; 1x1 projection shortcuts not counted): notebook 000's
    "1 + 6n conv layers", and the 17 of ResNet-18's 18 weighted layers."""
    if hasattr(model, "modules"):  # torch
        import torch.nn as nn

        return sum(1 for m in model.modules() if isinstance(m, nn.Conv2d) and tuple(m.kernel_size) != (1, 1))
    return sum(1 for _, m in nnx.iter_modules(model) if isinstance(m, nnx.Conv) and tuple(m.kernel_size) != (1, 1))


@dataclasses.dataclass
class Run:
    """One trained model of an experiment: what it was, its history and its size."""

    label: str
    model: str
    model_kwargs: dict[str, Any]
    framework: str
    params: int
    conv_layers: int
    history: dict[str, list[float]]
    out_dir: Path
    train_time: float  # seconds of training and evaluation over all epochs, as recorded (also after --resume)

    def final(self, key: str) -> float:
        values = self.history[key]
        return float(values[-1]) if values else math.nan

    def final_cells(self, accuracy: str = ".2f") -> list[str]:
        """Final training loss, training accuracy and test accuracy, for a table."""
        return [fmt(self.final("train_loss"), ".4f"), fmt(self.final("train_acc"), accuracy, "%"),
                fmt(self.final("test_acc"), accuracy, "%")]


def fmt(value: float, spec: str = ".2f", suffix: str = "") -> str:
    """A number for a table; non-finite values as 'n/a' (a diverged run must not break the table)."""
    return f"{value:{spec}}{suffix}" if isinstance(value, int | float) and math.isfinite(value) else "n/a"


def to_jsonable(value: Any) -> Any:
    """Plain JSON: numpy and jax scalars and arrays as numbers and lists, NaN and infinities as null."""
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist"):
        return to_jsonable(value.tolist())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    return value


def settings_json(config: RunConfig, settings: Any) -> dict[str, Any]:
    """results.json's "settings": the run's config and the experiment's own settings, as plain JSON."""
    init_from = config.model.init_from
    model = {"name": config.model.name, "kwargs": dict(config.model.kwargs),
             "init_from": "a state_dict" if isinstance(init_from, Mapping) else init_from}
    fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name != "model"}
    plain = {k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for k, v in fields.items()}
    return to_jsonable({**plain, "model": model, "experiment": dataclasses.asdict(settings)})


@dataclasses.dataclass
class Context:
    """What the runs of one experiment share: its config (recipe, seed, framework, dtype, precision, devices, data,
    resume/overwrite), the directory it writes to, the data (loaded once), and the progress and log callbacks."""

    config: RunConfig
    out: Path
    dataset: Any = None
    data_note: str = ""
    progress: Callable[..., Any] | None = None
    log: Callable[[str], None] | None = None

    @property
    def framework(self) -> str:
        return self.config.framework

    @property
    def seed(self) -> int:
        return self.config.seed

    def train(self, label: str, model: str, model_kwargs: Mapping[str, Any], name: str, *, recipe: Recipe | None = None,
              framework: str | None = None, overwrite: bool | None = None,
              init_from: Path | Mapping[str, Any] | None = None, dtype: str | None = None) -> Run:
        """Train the registered ``model`` on the context's data through ``training.train``, into
        ``OUT/runs/<name>`` (which ``landscape`` and ``port`` read). ``recipe``, ``framework``, ``overwrite`` and
        ``dtype`` default to the context's; ``init_from`` (a state_dict mapping or a weights path) replaces the
        initial weights in either framework (``compare`` starts both from one, and trains each in float64 too).
        The devices options hold for Flax runs."""
        recipe = recipe or self.config.recipe
        framework = framework or self.config.framework
        dtype = dtype or self.config.dtype
        kwargs = registry.model_kwargs(model, model_kwargs, recipe.name)
        output = dataclasses.replace(self.config.output, out_dir=self.out / "runs" / name)
        if overwrite is not None:
            output = dataclasses.replace(output, overwrite=overwrite, resume=output.resume and not overwrite)
        config = self.config.replace(
            recipe=recipe, framework=framework, dtype=dtype, model=ModelConfig(model, kwargs, init_from),
            output=output, parallel=self.config.parallel if framework == "jax" else ParallelConfig())
        title = f"{label}: {registry.constructor_call(model, kwargs)}, {recipe.name}, {framework}"
        log, progress = self.log, self.progress
        result = training.train(
            config, dataset=self.dataset, title=title,
            log=None if log is None else (lambda line: log(f"[{label}] {line}")),
            progress=None if progress is None else (lambda total, desc: progress(total=total, desc=f"{label} {desc}")))
        history = result.history
        return Run(label, model, dict(kwargs), framework, count_params(result.model),
                   count_conv_layers(result.model), {k: list(v) for k, v in history.items()}, config.output.out_dir,
                   float(sum(history["epoch_time"])))


@dataclasses.dataclass
class Report:
    """What an experiment found: a Markdown table, notes, raw numbers and a matplotlib figure (``run_experiment``
    writes it beside summary.md as ``<name>.png``, dashes as underscores: docs/make_figures.sh copies it by that
    name)."""

    title: str
    table: str
    results: dict[str, Any]
    figure: Any
    notes: list[str]


@dataclasses.dataclass
class Outcome:
    """An experiment's written outputs: its report, the directory, summary.md's text and the seconds it took."""

    report: Report
    out: Path
    summary: str
    seconds: float


def run_experiment(name: str, config: RunConfig, settings: Any, work: Callable[[Context], Report], *,
                   reads_data: bool = True, needs_torch: bool = False, progress: Callable[..., Any] | None = None,
                   log: Callable[[str], None] | None = None) -> Outcome:
    """Claim the experiment's directory (``config.output.out_dir``, default runs/<name>), load the data, run
    ``work`` and write summary.md, results.json and the figure there. An interrupted experiment keeps its finished
    runs (continue with ``resume``)."""
    given = [config.parallel.coordinator, config.parallel.num_processes, config.parallel.process_id]
    if any(v is not None for v in given):
        raise ConfigError(f"{name} runs in one process: the multi-host options are for `train`.")
    torch = needs_torch or config.framework == "torch"
    require_all(["matplotlib", *(["torch"] if torch else [])],  # matplotlib: the figures
                f"{name}{' --framework torch' if torch and not needs_torch else ''}")
    if reads_data:
        datasets.check(config.data)
    out = config.output.out_dir or RUNS_DIR / name
    # as `train` does: an unwritable --out, or another run writing to it, fails before any data or training
    claim = claim_output_dir(out, probe=())
    ctx = Context(config, out, progress=progress, log=log)
    start = time.perf_counter()
    with claim:
        if reads_data:
            ctx.dataset = datasets.load(config.data, log)
            size = ctx.dataset.train_images.shape[1]
            ctx.data_note = (f"{'synthetic data' if config.data.dataset == 'synthetic' else 'CIFAR-10'}, "
                             f"{len(ctx.dataset.train_labels)} training and {len(ctx.dataset.test_labels)} "
                             f"test images of {size}x{size}")
        report = work(ctx)
        from flax_resnet import plots  # matplotlib, the [plots] extra: required above

        figure = plots.save_figure(report.figure, out / f"{name.replace('-', '_')}.png")
        markdown = "\n\n".join([f"## {report.title}", report.table, "\n".join(report.notes),
                                 f"![{figure.stem}]({figure.name})"]) + "\n"
        files.write_atomic(out / SUMMARY_FILE, markdown)
        payload = {"command": name, "settings": settings_json(config, settings), **report.results,
                   "figures": [figure.name]}
        write_json(out / RESULTS_FILE, to_jsonable(payload))
    return Outcome(report, out, markdown, time.perf_counter() - start)
