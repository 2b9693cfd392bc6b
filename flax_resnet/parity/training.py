"""Training-step parity: do a torch model with its optimizer and the Flax port with its optax optimizer take the
same training steps, and if not, at which step and in which tensor do they part, and why?

    report = parity.compare_training(
        torch_model, flax_model,
        lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=5e-4),
        optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(0.1, momentum=0.9)),
        steps=3, input_shape=(4, 3, 16, 16))
    print(report)                 # one block per step: loss, running statistics, parameters, optimizer moments
    report.ok                     # every comparison within the tolerance of the dtype
    report.first_divergence       # 'step 2: layer1.0.conv1.weight', or None
    report.diagnosis              # the known trap the numbers fit, one line each ([] on an exact run)

Both frameworks start from the same weights (``compare``'s copies, cast to ``dtype``: the given models are left
exactly as they were) and take ``steps`` steps of mean cross-entropy in train mode (dropout held off, as its masks
come from different random generators). After each step the loss, every parameter, every BatchNorm running
statistic (and ``num_batches_tracked``) and the optimizer's moment buffers where the two optimizers have them are
compared in torch's names and layout. The optax state is found by structure: every part of it shaped like the
parameters (a ``nnx.State`` of ``nnx.Param``) is a moment, named by its field and paired with torch's buffer:

| torch ``optimizer.state[p]`` | optax state field                     |
| ---------------------------- | ------------------------------------- |
| ``momentum_buffer`` (SGD)    | ``trace`` (``optax.trace``/``sgd``)   |
| ``exp_avg`` (Adam, AdamW)    | ``mu`` (``ScaleByAdamState``)         |
| ``exp_avg_sq`` (Adam, AdamW) | ``nu`` (``ScaleByAdamState``)         |

The optimizer pairs that compute the same steps (in float64 to 4e-15 for SGD, 3e-13 for Adam, measured: see
docs/parity.md and parity_tests/test_compare_training.py): torch ``SGD(lr, momentum, weight_decay, nesterov)`` =
``optax.chain(optax.add_decayed_weights(wd), optax.sgd(lr, momentum, nesterov=nesterov))`` (torch adds wd * p to
the gradient before the momentum: coupled); ``Adam(lr, betas, eps, weight_decay)`` =
``optax.chain(optax.add_decayed_weights(wd), optax.adam(lr, b1, b2, eps))``; ``AdamW(lr, betas, eps, weight_decay)``
= ``optax.adamw(lr, b1, b2, eps, weight_decay=wd)`` (torch's default weight_decay is 1e-2, optax's 1e-4: give it).
A per-epoch torch scheduler is ``per_epoch(optax schedule, steps_per_epoch)``.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from flax_resnet.parity import diagnosis
from flax_resnet.parity.forward import (
    TOLERANCES,
    Tolerance,
    _check_pair,
    _copies,
    _errors,
    _flax_input,
    _flax_loss,
    _flax_state,
    _input_batch,
    _labels,
    _layer_of,
    _numerics,
    _set_mode,
    _Verdict,
)

__all__ = ["MOMENTS", "StepRow", "TrainingReport", "compare_training", "per_epoch"]

# optax state field -> the torch optimizer.state buffer that holds the same moment
MOMENTS: dict[str, str] = {"trace": "momentum_buffer", "mu": "exp_avg", "nu": "exp_avg_sq"}

_LOSS = "(loss)"
_WEIGHTS = "weights before training"
_SECTIONS = ("running statistics", "loss", "parameters")  # the order in which a step computes them
_SHOWN = 8  # rows listed per block beyond the tolerance; a ResNet-18 has 62 parameters and 60 statistics


def per_epoch(schedule: Callable[[Any], Any], steps_per_epoch: int) -> optax.Schedule:
    """An optax schedule of epochs as one of steps: lr(step) = schedule(step // steps_per_epoch).

    torch's schedulers (StepLR, MultiStepLR, CosineAnnealingLR) are stepped once per epoch, after its last step;
    optax calls a schedule with the update count. ``per_epoch(optax.cosine_decay_schedule(0.1, T_max), spe)``
    is ``CosineAnnealingLR(opt, T_max)`` stepped every ``spe`` steps; the schedule alone would move every step.

    The epoch is handed on as JAX's default int (int64 with float64 enabled), not optax's int32 count: JAX divides
    an int32 in float32, so ``optax.exponential_decay(0.1, 1, 0.5, staircase=True)`` given the count returns
    0.1 rounded to float32 even in a float64 run, a learning rate 1.5e-8 off torch's (measured).
    """
    if not isinstance(steps_per_epoch, int) or steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be a positive int, got {steps_per_epoch!r}")

    def epoch_schedule(step: Any) -> Any:
        epoch = jnp.asarray(step) // steps_per_epoch
        return schedule(epoch.astype(jax.dtypes.canonicalize_dtype(jnp.int64)))

    return epoch_schedule


# ----------------------------------------------------------------------------------------------- report
@dataclasses.dataclass(frozen=True)
class StepRow:
    """One compared tensor after one step (step 0: the weights before training), under torch's name."""

    step: int
    section: str  # "weights before training", "loss", "running statistics", "parameters", or a moment's
    name: str  # a state_dict key ('(loss)' for the loss)
    abs_err: float
    rel_err: float
    tolerance: float
    note: str = ""

    @property
    def ok(self) -> bool:
        return self.rel_err <= self.tolerance  # False for NaN too

    @property
    def layer(self) -> str:
        return _layer_of(self.name) if self.name != _LOSS else ""


@dataclasses.dataclass
class TrainingReport(_Verdict):
    """What ``compare_training`` found; ``str(report)`` is the table, the diagnosis and the verdict."""

    torch_name: str
    flax_name: str
    dtype: str
    steps: int
    input_shapes: list[tuple[int, ...]]  # one per step
    torch_optimizer: str  # e.g. "SGD(lr=0.1, momentum=0.9, weight_decay=0.0005, nesterov=False)"
    scheduler: str  # e.g. "MultiStepLR stepped every 2 steps (steps_per_epoch)", or ""
    batches: str
    loss: str
    rows: list[StepRow]
    torch_lrs: list[float]  # the learning rate of torch's first parameter group at each step
    diagnosis: list[str] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def first_step(self) -> int | None:
        """The 1-based step after which the two first differ; 0 when the weights differ before training."""
        row = self._divergent_row()
        return None if row is None else row.step

    @property
    def first_divergence(self) -> str | None:
        """'step 2: layer1.0.conv1.weight': the first step that differs and its first differing tensor, in the
        order the step computes them (BatchNorm statistics and loss in the forward pass, then the parameters, then
        the optimizer's moments), each section in torch's state_dict order. None if the two never part."""
        row = self._divergent_row()
        return None if row is None else f"step {row.step}: {row.name}"

    def _divergent_row(self) -> StepRow | None:
        failures = self.failures
        if not failures:
            return None
        step = min(row.step for row in failures)
        sections = self._sections()
        return min((row for row in failures if row.step == step), key=lambda row: sections.index(row.section))

    def _sections(self) -> list[str]:
        moments = [row.section for row in self.rows if row.section not in (_WEIGHTS, *_SECTIONS)]
        return [_WEIGHTS, *_SECTIONS, *dict.fromkeys(moments)]

    def table(self, every_row: bool = False) -> str:
        """The report as text: a header, one block per step (the loss; per kind of tensor the count within the
        tolerance and the worst, and every row beyond it, '<-- differs', at most 8 per block unless
        ``every_row``), the diagnosis, then the verdict."""
        tol = self.tolerance
        width = max([len(row.name) for row in self.rows] + [30])
        shapes = sorted(set(self.input_shapes))
        lines = [
            f"training-step parity of {self.torch_name} (torch) and {self.flax_name} (Flax NNX), {self.dtype}, "
            f"{self.steps} steps",
            f"torch optimizer: {self.torch_optimizer}" + (f"; {self.scheduler}" if self.scheduler else ""),
            f"batches: {self.batches}, input {shapes[0] if len(shapes) == 1 else shapes}",
            f"loss: {self.loss}",
            f"tolerance: relative error <= {tol.values:g} (loss, parameters, running statistics), {tol.gradients:g} "
            "(optimizer moments: running averages of gradients, which carry the gradients' rounding)",
            "relative error: max|flax - torch| / max|torch| over each tensor",
        ]
        lines += [f"note: {note}" for note in self.notes]
        sections = self._sections()
        for step in range(self.steps + 1):
            rows = [row for row in self.rows if row.step == step]
            if not rows:
                continue
            if step == 0:
                lines += ["", "before training"]
            else:
                lr = self.torch_lrs[step - 1]
                lines += ["", f"{f'step {step} (torch lr {lr:.6g})':<{width + 4}}{'abs err':>9}  {'rel err':>9}"]
            for section in sections:
                block = [row for row in rows if row.section == section]
                if not block:
                    continue
                if section == "loss":
                    lines.append(self._line(block[0], "loss", width))
                    continue
                bad = [row for row in block if not row.ok]
                worst = max(block, key=lambda row: (row.rel_err if not math.isnan(row.rel_err) else math.inf))
                label = section if section != _WEIGHTS else "weights (torch layout)"
                if not bad:
                    lines.append(f"  {label}: all {len(block)} within tolerance; worst:")
                    lines.append(self._line(worst, "    " + worst.name, width))
                    continue
                lines.append(f"  {label}: {len(bad)} of {len(block)} beyond tolerance:")
                shown = block if every_row else bad[:_SHOWN]
                lines += [self._line(row, "    " + row.name, width) for row in shown]
                if len(shown) < len(bad):
                    lines.append(f"    ... and {len(bad) - len(shown)} more (report.table(every_row=True) lists them)")
        lines.append("")
        if self.diagnosis:  # as compare's report: the diagnosis block, then the verdict as the last line
            lines += ["diagnosis:"] + [f"  {line}" for line in self.diagnosis]
        if self.ok:
            lines.append(f"OK: all {len(self.rows)} comparisons within the {self.dtype} tolerance over "
                         f"{self.steps} steps")
        else:
            lines.append(f"DIFFERENT: {len(self.failures)} of {len(self.rows)} comparisons exceed the {self.dtype} "
                         f"tolerance; first divergence: {self.first_divergence}")
        return "\n".join(lines)

    @staticmethod
    def _line(row: StepRow, label: str, width: int) -> str:
        mark = "" if row.ok else "  <-- differs"
        note = f"  ({row.note})" if row.note else ""
        return f"  {label:<{width + 2}}{_number(row.abs_err):>9}  {_number(row.rel_err):>9}{mark}{note}"

    def __str__(self) -> str:
        return self.table()


def _number(value: float) -> str:
    return "0" if value == 0 else f"{value:.1e}"


# ------------------------------------------------------------------------------------------ compare
def compare_training(torch_model: Any, flax_model: nnx.Module, torch_optimizer: Callable[[Any], Any],
                     flax_optimizer: optax.GradientTransformation, *, steps: int = 3, inputs: Any = None,
                     labels: Any = None, dtype: str = "float64", torch_scheduler: Callable[[Any], Any] | None = None,
                     steps_per_epoch: int | None = None, input_shape: Sequence[int] | None = None, seed: int = 0,
                     port_weights: bool = False) -> TrainingReport:
    """Train copies of ``torch_model`` and its NNX port ``flax_model`` for ``steps`` steps side by side and
    compare them after every step; return a ``TrainingReport``.

    ``torch_optimizer``: parameters -> ``torch.optim.Optimizer`` (``lambda p: torch.optim.SGD(p, lr=0.1)``).
    ``torch_scheduler``: optional, optimizer -> LR scheduler (or None: a constant rate), stepped once per epoch,
    after every ``steps_per_epoch`` steps (required with a scheduler), as the notebooks do; the Flax counterpart is
    ``per_epoch(schedule, steps_per_epoch)`` inside ``flax_optimizer`` (an ``optax.GradientTransformation``).

    ``inputs``: one NCHW batch (numpy array or torch tensor; transposed to NHWC for Flax) used at every step, or a
    list/tuple of ``steps`` batches, one per step. None: a seeded unit-normal batch of ``input_shape`` (default
    as ``compare``'s, from the first layer: (4, C, 32, 32) for a Conv2d), the same at every step. Why the same
    batch by default: it is all a parity check needs (every step still changes every parameter), and it makes the
    loss fall from step to step, so a step that goes wrong also shows in the loss. ``labels``: class indices for
    the batch (or a list, one array per batch); None: seeded random labels, one set per distinct batch.

    ``dtype``: both copies train in it. "float64" (the default) proves the two steps equal (~1e-14); in "float32"
    rounding grows from step to step (a ReLU input within rounding of zero flips in one framework only), so a
    float32 row beyond its tolerance is only a port defect if the float64 run shows it too. ``port_weights``: load
    torch's state_dict into the Flax copy first (as ``compare``). ``seed``: of the random batch and labels.
    """
    import torch

    _check_pair(torch_model, flax_model, dtype)
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    # a function, not an optimizer: one made by the caller would update the given model's own parameters
    if not callable(torch_optimizer) or isinstance(torch_optimizer, torch.optim.Optimizer):
        raise TypeError("torch_optimizer must be a function from parameters to an optimizer, e.g. "
                        "lambda params: torch.optim.SGD(params, lr=0.1), not an optimizer")
    if not isinstance(flax_optimizer, optax.GradientTransformation):
        raise TypeError(f"flax_optimizer must be an optax.GradientTransformation, got "
                        f"{type(flax_optimizer).__name__}")
    if torch_scheduler is not None and steps_per_epoch is None:
        raise ValueError("a torch_scheduler needs steps_per_epoch (it is stepped once per epoch)")
    if steps_per_epoch is not None and (not isinstance(steps_per_epoch, int) or steps_per_epoch < 1):
        raise ValueError(f"steps_per_epoch must be a positive int, got {steps_per_epoch!r}")
    batches, same_batch = _batches(torch_model, inputs, input_shape, steps, seed, dtype)

    with _numerics(dtype):
        notes: list[str] = []
        t, f = _copies(torch_model, flax_model, dtype, port_weights, notes)
        _set_mode(t, f, "train", notes)
        optimizer = torch_optimizer(t.parameters())
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"torch_optimizer returned a {type(optimizer).__name__}, not a torch.optim.Optimizer")
        scheduler = torch_scheduler(optimizer) if torch_scheduler is not None else None  # None: a constant rate
        report = TrainingReport(
            type(torch_model).__name__, type(flax_model).__name__, dtype, steps, [tuple(x.shape) for x in batches],
            _describe(optimizer), "" if scheduler is None else
            f"{type(scheduler).__name__} stepped every {steps_per_epoch} steps (steps_per_epoch)",
            "the same batch at every step" if same_batch else "one batch per step",
            "mean cross-entropy against " + ("the given labels" if labels is not None else
                                             f"seeded random labels (seed {seed})"),
            [], [], notes=notes)
        tol = TOLERANCES[dtype]
        names = {id(p): name for name, p in t.named_parameters()}
        buffers = [name for name, _ in t.named_buffers()]
        params = nnx.state(f, nnx.Param)
        opt_state = flax_optimizer.init(params)
        structure = jax.tree.structure(params)

        torch_params = _torch_params(t)
        flax_state = _flax_state(f)
        flax_params = {key: flax_state[key] for key in torch_params if key in flax_state}
        report.rows += _weight_rows(t, f, tol)
        evidence = _Evidence(optimizer, names, torch_params, dict(torch_params), dict(flax_params), report,
                             _epoch_lrs(torch_optimizer, torch_scheduler, steps), steps_per_epoch)
        evidence.buffers_before = {key: value.detach().numpy().copy() for key, value in t.named_buffers()}
        hooks = _count_batch_norm_inputs(t, evidence.batch_norms)
        label_sets: dict[int, np.ndarray] = {}
        for step in range(1, steps + 1):
            x = batches[step - 1]
            lr = float(optimizer.param_groups[0]["lr"])
            report.torch_lrs.append(lr)
            # torch: the notebooks' step
            optimizer.zero_grad(set_to_none=True)
            logits = t(torch.from_numpy(x))
            pooled = logits.mean(dim=(2, 3)) if logits.ndim == 4 else logits
            key = 0 if same_batch else step - 1
            if key not in label_sets:
                given = labels[key] if isinstance(labels, list | tuple) else labels
                label_sets[key] = _labels(given, logits.detach().numpy(), seed + key)
            y = label_sets[key]
            loss_t = torch.nn.functional.cross_entropy(pooled, torch.from_numpy(y))
            loss_t.backward()
            optimizer.step()
            if scheduler is not None and step % steps_per_epoch == 0:
                scheduler.step()
            # Flax: the same step with optax, as flax_resnet.training.engine.train_step takes it
            loss_f, grads = nnx.value_and_grad(_flax_loss)(f, _flax_input(x), jnp.asarray(y))
            updates, opt_state = flax_optimizer.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
            nnx.update(f, params)

            flax_state = _flax_state(f)
            torch_params = _torch_params(t)
            flax_params = {key: flax_state[key] for key in torch_params if key in flax_state}
            report.rows.append(_step_row(step, "loss", _LOSS, np.asarray(loss_f), loss_t.detach().numpy(),
                                         tol.values))
            torch_buffers = dict(t.named_buffers())
            if step == 1:
                for hook in hooks:
                    hook.remove()
                evidence.buffers_after = ({key: value.detach().numpy().copy() for key, value in torch_buffers.items()},
                                          {key: flax_state[key] for key in torch_buffers if key in flax_state})
            report.rows += [_step_row(step, "running statistics", key, flax_state[key],
                                      torch_buffers[key].detach().numpy(), tol.values)
                            for key in buffers if key in flax_state]
            report.rows += [_step_row(step, "parameters", key, flax_params[key], value, tol.values)
                            if key in flax_params else StepRow(step, "parameters", key, math.inf, math.inf,
                                                               tol.values, "no such parameter in the Flax model")
                            for key, value in torch_params.items()]
            report.rows += _moment_rows(step, optimizer, names, opt_state, structure, f, tol, report.notes)
            evidence.advance(step, torch_params, flax_params)
        report.diagnosis = _diagnoses(evidence)
    return report


def _batches(torch_model: Any, inputs: Any, input_shape: Sequence[int] | None, steps: int, seed: int,
             dtype: str) -> tuple[list[np.ndarray], bool]:
    """The batch of each step in torch's layout, as numpy in ``dtype`` (``compare``'s ``_input_batch`` for each:
    the same checks and the same guessed shape), and whether it is one batch for every step."""
    per_step = isinstance(inputs, list | tuple)
    if per_step and len(inputs) != steps:
        raise ValueError(f"inputs holds {len(inputs)} batches for {steps} steps: give one batch per step, or a "
                         "single batch (an array) for every step")
    batches = [_input_batch(torch_model, batch, input_shape, seed, dtype) for batch in
               (inputs if per_step else [inputs])]
    if any(not np.issubdtype(x.dtype, np.floating) for x in batches):
        raise ValueError("inputs must be floating point (images): compare_training takes image batches; "
                         "parity.compare also takes token ids")
    return (batches, False) if per_step else (batches * steps, True)


def _describe(optimizer: Any) -> str:
    """``SGD(lr=0.1, momentum=0.9, ...)``: the optimizer and the settings of its first parameter group."""
    group = optimizer.param_groups[0]
    keys = ("lr", "momentum", "nesterov", "dampening", "betas", "eps", "weight_decay", "amsgrad")
    settings = ", ".join(f"{k}={group[k]}" for k in keys if k in group)
    groups = f", {len(optimizer.param_groups)} parameter groups" if len(optimizer.param_groups) > 1 else ""
    return f"{type(optimizer).__name__}({settings}){groups}"


def _torch_params(t: Any) -> dict[str, np.ndarray]:
    return {name: p.detach().cpu().numpy().copy() for name, p in t.named_parameters()}


def _step_row(step: int, section: str, name: str, flax: np.ndarray, torch: np.ndarray, tolerance: float,
              note: str = "") -> StepRow:
    abs_err, rel_err, problem = _errors([np.asarray(flax)], [np.asarray(torch)])
    return StepRow(step, section, name, abs_err, rel_err, tolerance, "; ".join(filter(None, [note, problem])))


def _weight_rows(t: Any, f: nnx.Module, tol: Tolerance) -> list[StepRow]:
    """Step 0: every torch state_dict tensor against the Flax copy's, before any step."""
    flax_state = _flax_state(f)
    rows = []
    for key, value in t.state_dict().items():
        if key in flax_state:
            rows.append(_step_row(0, _WEIGHTS, key, flax_state[key], value.detach().cpu().numpy(), tol.values))
        elif not key.endswith("num_batches_tracked"):  # stock nnx.BatchNorm has none; torch reads it only when
            # momentum=None
            rows.append(StepRow(0, _WEIGHTS, key, math.inf, math.inf, tol.values, "missing in the Flax model"))
    return rows


def _moment_rows(step: int, optimizer: Any, names: dict[int, str], opt_state: Any, structure: Any,
                 f: nnx.Module, tol: Tolerance, notes: list[str]) -> list[StepRow]:
    """The optax state's parameter-shaped parts against torch's buffer of the same moment, in torch's layout."""
    torch_state = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            for buffer, value in optimizer.state.get(p, {}).items():
                if hasattr(value, "shape") and tuple(value.shape) == tuple(p.shape):
                    torch_state.setdefault(buffer, {})[names[id(p)]] = value.detach().cpu().numpy()
    rows: list[StepRow] = []
    paired: set[str] = set()
    for field, moment in _moments(opt_state, structure):
        buffer = MOMENTS.get(field)
        if buffer is None or buffer not in torch_state or buffer in paired:
            if step == 1:
                _note(notes, f"optax state field {field!r}: no torch buffer to compare it with")
            continue
        paired.add(buffer)
        holder = nnx.clone(f)
        nnx.update(holder, moment)
        flax = _flax_state(holder)
        section = f"{buffer} / {field}"
        for key, value in torch_state[buffer].items():
            rows.append(_step_row(step, section, key, flax[key], value, tol.gradients) if key in flax else
                        StepRow(step, section, key, math.inf, math.inf, tol.gradients, "no such parameter in Flax"))
    if step == 1:
        for buffer in torch_state:
            if buffer not in paired:
                _note(notes, f"torch optimizer state {buffer!r}: no optax state field to compare it with")
    return rows


def _note(notes: list[str], note: str) -> None:
    if note not in notes:
        notes.append(note)


def _moments(state: Any, structure: Any, field: str = "") -> list[tuple[str, Any]]:
    """The parts of an optax state shaped like the parameters, with the name of the field that holds each."""
    if field and jax.tree.structure(state) == structure:
        return [(field, state)]
    found = []
    if isinstance(state, tuple):  # optax states are NamedTuples, chains tuples of them
        fields = getattr(state, "_fields", None)
        for index, item in enumerate(state):
            found += _moments(item, structure, fields[index] if fields else field or str(index))
    return found


# -------------------------------------------------------------------------------------------- diagnosis
@dataclasses.dataclass
class _Evidence:
    """What the diagnoses read: torch's optimizer, the parameters before training, the parameters before and after
    the first step that differs (torch layout), the rows, torch's learning rate per epoch."""

    optimizer: Any
    names: dict[int, str]
    initial: dict[str, np.ndarray]
    torch_before: dict[str, np.ndarray]
    flax_before: dict[str, np.ndarray]
    report: TrainingReport
    epoch_lrs: list[float] | None
    steps_per_epoch: int | None
    step: int | None = None  # the first step after which a parameter differs
    torch_after: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    flax_after: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    # BatchNorm buffers before and after step 1 (torch's, Flax's) and, per torch BatchNorm, its momentum and the
    # values per channel it saw: what parity.diagnosis.running_statistic reads
    buffers_before: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    buffers_after: tuple[dict[str, np.ndarray], dict[str, np.ndarray]] = ({}, {})
    batch_norms: dict[str, tuple[float | None, int]] = dataclasses.field(default_factory=dict)

    def advance(self, step: int, torch_params: dict[str, np.ndarray], flax_params: dict[str, np.ndarray]) -> None:
        """Keep the parameters around the first step whose parameters differ (only two steps' worth: a ResNet-18
        is 89 MB in float64)."""
        if self.step is not None:
            return
        if any(not row.ok for row in self.report.rows if row.step == step and row.section == "parameters"):
            self.step, self.torch_after, self.flax_after = step, torch_params, flax_params
        else:
            self.torch_before, self.flax_before = torch_params, flax_params

    def group(self, name: str) -> dict[str, Any]:
        for group in self.optimizer.param_groups:
            if any(self.names[id(p)] == name for p in group["params"]):
                return group
        return self.optimizer.param_groups[0]

    def clean_before(self, step: int) -> bool:
        """Every comparison before ``step``'s update agrees (the weights, earlier steps, this step's loss)."""
        return all(row.ok for row in self.report.rows
                   if row.step < step or (row.step == step and row.section in ("loss", "running statistics")))


def _diagnoses(evidence: _Evidence) -> list[str]:
    """Each known trap whose fingerprint the numbers show, one line each; [] when nothing differs.

    The one place where diagnoses are added: each function takes the evidence and returns its lines.
    Step 1's running statistics are checked by ``parity.diagnosis.running_statistic``, as ``compare``'s are.
    """
    if evidence.report.ok:
        return []
    lines: list[str] = []
    for diagnose in (_weights_diagnosis, _forward_diagnosis, _weight_decay_diagnosis, _learning_rate_diagnosis):
        lines += diagnose(evidence)
    return lines


def _weights_diagnosis(evidence: _Evidence) -> list[str]:
    differ = [row.name for row in evidence.report.rows if row.step == 0 and not row.ok]
    if not differ:
        return []
    return [f"the weights differ before training ({len(differ)} tensors, first {differ[0]}): port them first "
            "(flax_resnet.port.load_torch_state_dict(flax_model, torch_model.state_dict())) or pass "
            "port_weights=True"]


def _forward_diagnosis(evidence: _Evidence) -> list[str]:
    rows = [row for row in evidence.report.rows if row.step == 1 and row.section in ("loss", "running statistics")]
    weights_ok = all(row.ok for row in evidence.report.rows if row.step == 0)
    if not weights_ok or all(row.ok for row in rows):
        return []
    return ["step 1: the loss or running statistics differ before any update, from equal weights: the forward pass "
            "differs, not the optimizer; parity.compare(torch_model, flax_model) names the layer"] + \
        _statistics_diagnosis(evidence)


def _statistics_diagnosis(evidence: _Evidence) -> list[str]:
    """Step 1's running statistics that differ, checked against the known BatchNorm traps (a biased running
    variance, the other momentum convention) by ``parity.diagnosis.running_statistic``."""
    torch_after, flax_after = evidence.buffers_after
    lines = []
    for row in evidence.report.rows:
        if row.step != 1 or row.section != "running statistics" or row.ok:
            continue
        layer, _, buffer = row.name.rpartition(".")
        momentum, n = evidence.batch_norms.get(layer, (None, 0))
        if buffer not in ("running_mean", "running_var") or momentum is None or n < 2 or row.name not in flax_after:
            continue
        line = diagnosis.running_statistic(row.name, evidence.buffers_before[row.name], torch_after[row.name],
                                           flax_after[row.name], n, momentum)
        if line:
            lines.append(line)
    return lines


def _count_batch_norm_inputs(t: Any, found: dict[str, tuple[float | None, int]]) -> list[Any]:
    """Forward hooks that note each torch BatchNorm's momentum and values per channel (N x spatial) in its first
    call: the n of n/(n-1)."""
    import torch

    def hook(name: str):
        def record(module, args, output):
            x = args[0]
            found.setdefault(name, (module.momentum, x.numel() // x.shape[1] if x.ndim > 1 else 0))
        return record

    return [module.register_forward_hook(hook(name)) for name, module in t.named_modules()
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm)]


def _weight_decay_diagnosis(evidence: _Evidence) -> list[str]:
    """Step 1 from equal weights and an equal loss: Flax's parameters = torch's + k p_before, with k = +-lr*wd of
    the parameter's torch group. The gradient is the same in both, so a decay term is all that differs."""
    if evidence.step != 1 or not evidence.clean_before(1):
        return []
    fits: list[tuple[str, float, float]] = []  # name, k, lr*wd
    differ = [row.name for row in evidence.report.rows if row.step == 1 and row.section == "parameters"
              and not row.ok]
    for name in differ:
        p0 = evidence.initial[name]
        k = _proportionality(evidence.flax_after[name] - evidence.torch_after[name], p0)
        if k is not None:
            group = evidence.group(name)
            fits.append((name, k, float(group["lr"]) * float(group.get("weight_decay", 0.0))))
    if not fits:
        return []
    kind = type(evidence.optimizer).__name__
    # 0.5%: k is a median over thousands of entries, good to ~1e-3 even in float32, while optax.adamw's default
    # weight_decay 1e-4 against torch AdamW's 1e-2 is 1% from a decay left out
    plus = [name for name, k, lrwd in fits if lrwd > 0 and abs(k - lrwd) <= 0.005 * lrwd]
    minus = [name for name, k, lrwd in fits if lrwd > 0 and abs(k + lrwd) <= 0.005 * lrwd]
    lrwd = fits[0][2]
    of = f"{{}} of the {len(differ)} parameters that differ after step 1"
    lines = []
    if plus:
        where = of.format(len(plus))
        if kind == "AdamW":
            lines.append(f"{where} are off by +lr*wd*p ({lrwd:.3g} x p before the step): torch's AdamW decays "
                         "p by lr*wd*p beside the Adam update (decoupled), the Flax optimizer does not, or couples "
                         "it (a decay added to the gradient is normalised away by Adam): use "
                         "optax.adamw(lr, weight_decay=wd)")
        else:
            lines.append(f"{where} are off by +lr*wd*p ({lrwd:.3g} x p before the step): the Flax optimizer leaves "
                         f"out the weight decay of torch's {kind}, which adds wd*p to the gradient (coupled): put "
                         "optax.add_decayed_weights(wd) before it in an optax.chain")
    if minus:
        where = of.format(len(minus))
        if kind == "Adam":
            lines.append(f"{where} are off by -lr*wd*p ({lrwd:.3g} x p before the step): the Flax optimizer decays "
                         "the weights decoupled (optax.adamw), torch's Adam couples the decay (adds wd*p to the "
                         "gradient, then normalises): use optax.chain(optax.add_decayed_weights(wd), optax.adam(lr)), "
                         "or torch.optim.AdamW")
        else:
            lines.append(f"{where} are off by -lr*wd*p ({lrwd:.3g} x p before the step): the Flax optimizer decays "
                         f"them by lr*wd*p more than torch's {kind}: a weight decay applied twice")
    other = [(name, k) for name, k, lrwd in fits if name not in plus and name not in minus]
    if other and lrwd == 0 and all(k < 0 for _, k in other):
        lines.append(f"{of.format(len(other))} are off by {other[0][1]:.3g} x p before the step: the Flax optimizer "
                     f"decays weights that torch's {kind} (weight_decay 0) does not")
    elif other and kind != "Adam":  # SGD's and AdamW's first step move p by -lr*wd*p, whatever the gradient
        group = evidence.group(other[0][0])
        lr, wd = float(group["lr"]), float(group.get("weight_decay", 0.0))
        lines.append(f"{of.format(len(other))} are off by {other[0][1]:.3g} x p before the step, where torch's "
                     f"lr*wd is {lrwd:.3g}: the weight decays differ, the Flax optimizer's amounts to "
                     f"{wd - other[0][1] / lr:.3g}, torch's {kind} has {wd:g} (optax.adamw's default is 1e-4, "
                     "torch AdamW's 1e-2)")
    return lines


def _proportionality(diff: np.ndarray, p: np.ndarray) -> float | None:
    """k when ``diff`` = k * ``p`` for at least 90% of the entries with |p| above a hundredth of its largest
    (to 1% of k); None otherwise. Robust, not least squares: with Adam, an entry whose gradient is about wd*p
    flips sign under a coupled decay and moves by 2 lr, whatever k is."""
    scale = float(np.max(np.abs(p))) if p.size else 0.0
    mask = np.abs(p) > 0.01 * scale
    if scale == 0 or not mask.any():
        return None
    ratio = diff[mask] / p[mask]
    k = float(np.median(ratio))
    if k == 0 or not math.isfinite(k):
        return None
    return k if np.mean(np.abs(ratio - k) <= 0.01 * abs(k)) >= 0.9 else None


def _learning_rate_diagnosis(evidence: _Evidence) -> list[str]:
    """At the first step whose parameters differ, from equal states before it: every Flax update is c times
    torch's (an optimizer's update is the learning rate times a function of the gradient and the moments, which
    agree). Then the learning rates differ by c, and if Flax's equals torch's rate of epoch step-1, the Flax
    schedule counts steps where torch's counts epochs."""
    step = evidence.step
    if step is None or not evidence.clean_before(step):
        return []
    names = [name for name in evidence.torch_after if name in evidence.flax_after and name in evidence.flax_before]
    u_t = np.concatenate([(evidence.torch_after[n] - evidence.torch_before[n]).ravel() for n in names])
    u_f = np.concatenate([(evidence.flax_after[n] - evidence.flax_before[n]).ravel() for n in names])
    norm = float(u_t @ u_t)
    if norm == 0:
        return []
    c = float(u_f @ u_t) / norm
    residual = float(np.linalg.norm(u_f - c * u_t)) / math.sqrt(norm)
    if not abs(c - 1) > 0 or residual > 0.01 * abs(c - 1):  # the difference is not (99%) a scaling of the update
        return []
    lr_torch = evidence.report.torch_lrs[step - 1]
    lr_flax = c * lr_torch
    digits = 3 if abs(c - 1) > 1e-3 else 12  # 1.5e-8 apart (a rate rounded to float32) needs 12 to show
    line = (f"step {step}: every parameter moves by {c:.{digits}g} x torch's update: the learning rates differ "
            f"(Flax {lr_flax:.{digits}g}, torch {lr_torch:.{digits}g})")
    lrs, spe = evidence.epoch_lrs, evidence.steps_per_epoch
    if lrs and spe and spe > 1 and step - 1 < len(lrs) and (step - 1) // spe != step - 1 \
            and abs(lr_flax - lrs[step - 1]) <= 1e-6 * max(abs(lrs[step - 1]), 1e-300) \
            and abs(lrs[step - 1] - lr_torch) > 1e-6 * abs(lr_torch):
        line += (f"; Flax's is torch's rate of epoch {step} (0-based {step - 1}), torch's of epoch "
                 f"{(step - 1) // spe + 1}: the Flax schedule is stepped per step instead of per epoch; wrap it as "
                 f"parity.per_epoch(schedule, steps_per_epoch={spe})")
    group = evidence.optimizer.param_groups[0]
    momentum = float(group.get("momentum", 0.0) or 0.0)
    if step == 1 and momentum > 0 and any(abs(c - r) <= 1e-6 * r for r in (1 + momentum, 1 / (1 + momentum))):
        line += (f"; or Nesterov momentum on one side only: its first step is 1 + momentum = {1 + momentum:g} times "
                 f"the plain one (torch's nesterov={group.get('nesterov')}; optax.sgd(lr, momentum, nesterov=...))")
    return [line]


def _epoch_lrs(torch_optimizer: Callable[[Any], Any], torch_scheduler: Callable[[Any], Any] | None,
               epochs: int) -> list[float] | None:
    """torch's learning rate (first group) in epochs 0..``epochs``, from a replay of the scheduler on a scratch
    parameter; None without a scheduler, or if the factories do not take one."""
    import torch

    if torch_scheduler is None:
        return None
    try:
        optimizer = torch_optimizer([torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))])
        scheduler = torch_scheduler(optimizer)
        if scheduler is None:
            return None
        lrs = [float(optimizer.param_groups[0]["lr"])]
        with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()": intended here
            warnings.simplefilter("ignore")
            for _ in range(epochs):
                scheduler.step()
                lrs.append(float(optimizer.param_groups[0]["lr"]))
    except Exception:  # noqa: BLE001 - only a diagnosis's evidence: factories that want the model's own parameters
        return None
    return lrs
