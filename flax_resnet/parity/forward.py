"""Layer-by-layer parity of a PyTorch module and its Flax NNX port: does the port compute what torch computes,
and if not, which layer is the first to compute something else?

    report = parity.compare(torch_model, flax_model, input_shape=(2, 3, 32, 32))
    print(report)                 # the table: every layer, BatchNorm statistic and gradient, worst errors
    report.ok                     # True when every row is within parity (float32: see below)
    report.first_divergence      # 'layer2.0.conv1', or None
    report.diagnosis             # the known traps that fit, each confirmed by recomputing (parity.diagnosis)

``compare`` runs both models on the same batch (an NCHW one transposed to NHWC for Flax, NCL to NLC; integer
token ids as they are; ``layout="same"`` for models that hold their tensors alike), records every module's
output (torch forward hooks; on the NNX side each submodule's class is swapped for a recording subclass for the
duration of one call), and compares them under torch's module names, in torch's forward order, in eval and in
train mode. In train mode it also compares the BatchNorm running statistics after that one pass, and the
gradient of the loss with respect to every parameter, in torch's layout (the port's conversions); before any
pass, every weight. Everything runs on copies cast to ``dtype``: both models are left exactly as they were.

What the Flax model needs: attribute names that follow torch's (as the port requires, see ``flax_resnet.port``),
so each torch module has a twin of the same name, and torch's weights, typically after
``port.load_torch_state_dict(flax_model, torch_model.state_dict())``. ``port_weights=True`` does that on the
copy instead. Models built from stock ``nnx.Conv``/``nnx.Linear``/``nnx.BatchNorm`` are compared as well as those
built from ``flax_resnet.layers`` (a stock ``nnx.BatchNorm`` then shows its biased running variance), and so are
every kind the port knows (transposed convolutions, LayerNorm, GroupNorm, embeddings). A torch module without a
Flax module of its name (an activation or pooling that is a function in Flax) is listed in the outputs table in
its place and not compared; a parameter-free Flax module of that name (a GELU, a Dropout) is compared.

In float32 no fixed tolerance is right for every input, so a row beyond it is decided against float64
references of the same computation: a port defect when its float64 twin differs too, within float32 rounding
(a pass) when not; and each leaf layer, fed torch's float64 input to it, has its own float32 error measured in
both frameworks: one far larger than its twin's is a precision loss in that framework (a failure). See
``compare``'s ``references`` and docs/design.md, "The float32 verdict".
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import dataclasses
import functools
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flax_resnet.dtypes import cast_floating
from flax_resnet.parity import diagnosis, recording
from flax_resnet.port import load_torch_state_dict, named_modules, to_torch_state_dict
from flax_resnet.precision import torch_fp32_precision

__all__ = ["PORT_DEFECT", "PRECISION_FACTOR", "PRECISION_FLOOR", "PRECISION_LOSS", "ROUNDING", "TOLERANCES",
           "ParityReport", "Row", "Tolerance", "compare", "perturb_batchnorm"]


# ------------------------------------------------------------------------------------------- tolerances
@dataclasses.dataclass(frozen=True)
class Tolerance:
    """Largest relative error, max|flax - torch| / max|torch| over a tensor, that still counts as equal."""

    values: float  # layer outputs, logits, loss, BatchNorm running statistics, weights
    gradients: float
    why: str


# The one place where the tolerances live. Relative to the tensor's largest torch value (not element by element,
# where entries near zero would turn any rounding into a large relative change), as parity_tests/helpers.py does.
TOLERANCES: dict[str, Tolerance] = {
    "float64": Tolerance(
        1e-12, 1e-10,
        "unit roundoff 1.1e-16; a convolution sums up to a few thousand products and a ResNet stacks a few dozen "
        "of them: the notebook models measure up to 3e-14 for outputs, statistics and gradients (ResNet-18, "
        "batch 2, 16x16, train mode), while a wrong padding, layout, variance or weight is off by 1e-3 or more. "
        "Give every BatchNorm several values per channel: with 2 (batch 2 at 1x1) it divides by the difference "
        "of two nearly equal numbers and rounding grows to 1e-10 (measured: ResNet-18 at 8x8)"),
    "float32": Tolerance(
        1e-4, 1e-3,
        "unit roundoff 6e-8, accumulated the same way: the notebook models measure up to 2e-5 for outputs (the "
        "two frameworks round in different orders, each ~1e-5 from its own float64 result) and 3e-5 for "
        "gradients (ResNet-18 at batch 4, 32x32: 1e-5). A stock nnx.BatchNorm computes the batch variance as "
        "E[x^2] - E[x]^2 (use_fast_variance, Flax's default), which cancels in float32: its ResNet-18 train-mode "
        "gradients are 2e-2 from torch's (flax_resnet.layers.BatchNorm2d uses the two-pass variance). "
        "No fixed float32 tolerance fits every input: near a ReLU's zero one framework's rounding flips a sign and "
        "gradients upstream move by up to 1.2e-1 (ResNet-18, seed 2), so compare decides the rows beyond it "
        "against float64 references (its `references`). Prove parity in float64; float32 shows what a float32 "
        "run sees"),
}

_LOGITS = "(logits)"  # the whole model's output; parentheses: no torch module name looks like this
_LOSS = "(loss)"
_PRECISION = "float32 precision"  # the section of the layers that lose float32 precision (float32 verdict only)
_SECTIONS = ("weights", "outputs", "running statistics", "gradients", _PRECISION)

# The float32 verdict's classes of a row beyond the float32 tolerance (``Row.classification``).
ROUNDING = "within float32 rounding"
PORT_DEFECT = "port defect"
PRECISION_LOSS = "precision loss in"  # + " Flax" or " torch"

# A layer loses float32 precision in one framework when its own float32 error (float32 result against float64
# result, both on the layer's float64 reference input rounded to float32) is more than PRECISION_FACTOR times its
# twin's and above PRECISION_FLOOR (relative to the layer's largest float64 value). Measured on exact ports
# (the registry models at verify's defaults, 69 model-seeds): own errors are at most 9.5e-7 in either framework
# and the larger of the two is within 4.3x of the smaller where it exceeds 1e-7; a BatchNorm computing
# E[x^2] - E[x]^2 (use_fast_variance) on inputs offset by 30 / 100 is 1.8e-4 / 5.7e-4 off against torch's
# 3.4e-7 / 7.4e-7 (500x, 780x). See docs/design.md.
PRECISION_FACTOR = 100.0
# A row whose float64 twin is beyond the float64 tolerance but a million times closer than in float32 shows
# rounding amplified (cancellation), not a port defect: see _shrinks_with_precision.
ROUNDING_SHRINK = 1e-6
PRECISION_FLOOR = 1e-4  # TOLERANCES["float32"].values: an own error below it cannot move a row past the tolerance


# ----------------------------------------------------------------------------------------------- report
@dataclasses.dataclass(frozen=True)
class Row:
    """One compared tensor: a layer's output, a running statistic, a gradient or a weight, under torch's name."""

    mode: str  # "eval" or "train"; "" for the weights, compared once before any pass
    section: str  # one of "weights", "outputs", "running statistics", "gradients"
    name: str  # the torch name: a module name for outputs, a state_dict key otherwise
    layer: str  # the torch module name this row belongs to ("" for the whole model)
    abs_err: float
    rel_err: float
    tolerance: float
    kinds: str = ""  # "torch class / Flax class" for outputs
    note: str = ""
    # float32 verdict, for a row beyond the float32 tolerance: ROUNDING (within parity), PORT_DEFECT or
    # "precision loss in Flax"/"... torch"; "" when the tolerance alone decides (within it, or in float64)
    classification: str = ""
    twin_rel_err: float | None = None  # the float64 twin's relative error (same weights and input in float64)
    # False for a torch module listed in its place in the forward order but with no Flax module to compare with
    # (an activation or pooling written as a function in Flax): shown, never a failure, not counted.
    compared: bool = True

    @property
    def ok(self) -> bool:
        if not self.compared:
            return True
        if self.classification:
            return self.classification == ROUNDING
        return self.rel_err <= self.tolerance  # False for NaN too


class _Verdict:
    """What both reports (``ParityReport``, ``parity.training.TrainingReport``) decide from their rows."""

    dtype: str
    rows: list[Any]

    @property
    def tolerance(self) -> Tolerance:
        return TOLERANCES[self.dtype]

    @property
    def ok(self) -> bool:
        return all(row.ok for row in self.rows)

    @property
    def failures(self) -> list[Any]:
        return [row for row in self.rows if not row.ok]


@dataclasses.dataclass
class ParityReport(_Verdict):
    """What ``compare`` found; ``str(report)`` is the table."""

    torch_name: str
    flax_name: str
    dtype: str
    input_shape: tuple[int, ...]
    modes: tuple[str, ...]
    loss: str
    rows: list[Row]
    forward_order: dict[str, int]  # torch module name -> position of its first output in torch's forward pass
    notes: list[str] = dataclasses.field(default_factory=list)
    input_layout: str = ""  # how the input was laid out for each framework ('NCHW (NHWC for Flax)', ...)
    diagnosis: list[str] = dataclasses.field(default_factory=list)  # the known traps that fit (parity.diagnosis)
    # float32 verdict: whether float64 references decided the rows beyond the float32 tolerance, and each checked
    # leaf layer's own float32 error per framework: (mode, layer, Flax's, torch's), relative to its float64 result
    references: bool = False
    own_errors: list[tuple[str, str, float, float]] = dataclasses.field(default_factory=list)

    @property
    def first_divergence(self) -> str | None:
        """The torch name of the layer where the two models first part, or None if they never do.

        Outputs decide first: the earliest layer, in torch's forward order over all modes, whose output differs
        or (float32) that loses float32 precision (every later layer then differs too, so only the first one says
        where the port is wrong); a row within float32 rounding is no divergence. If every
        output agrees: the first BatchNorm whose running statistics differ after the train-mode pass. Then
        gradients: they flow backwards, so the layer nearest the output whose gradient differs. Last, a weight
        that differs without changing any output. '(logits)' when only the model's own output differs (a
        function between the modules, such as a flatten in another order).
        """
        row = self._divergent_row()
        return None if row is None else row.layer or _LOGITS

    def _divergent_row(self) -> Row | None:
        by_section = {section: [row for row in self.failures if row.section == section] for section in _SECTIONS}
        # A layer that loses float32 precision parts the models there, as a differing output does.
        if by_section["outputs"] or by_section[_PRECISION]:
            return min(by_section["outputs"] + by_section[_PRECISION], key=self._position)
        if by_section["running statistics"]:
            return min(by_section["running statistics"], key=self._position)
        if by_section["gradients"]:
            return max(by_section["gradients"], key=self._position)
        if by_section["weights"]:
            return min(by_section["weights"], key=self._position)
        return None

    def _position(self, row: Row) -> float:
        if row.layer == "" or row.name in (_LOGITS, _LOSS):
            return math.inf  # the model's output comes after every layer
        return self.forward_order.get(row.layer, math.inf)

    def table(self) -> str:
        """The report as text: a header, one block per mode and section (worst errors per tensor, in torch's
        names; '<-- differs' marks a row beyond the tolerance), the diagnosis if any, and the verdict."""
        tol = self.tolerance
        width = max([len(row.name) for row in self.rows] + [24])
        kinds_width = max([len(row.kinds) for row in self.rows] + [0])
        lines = [
            f"parity of {self.torch_name} (torch) and {self.flax_name} (Flax NNX), {self.dtype}, "
            f"input {self.input_shape}{' ' + self.input_layout if self.input_layout else ''}",
            f"tolerance: relative error <= {tol.values:g} (outputs, statistics, weights), {tol.gradients:g} "
            "(gradients)",
            "relative error: max|flax - torch| / max|torch| over each tensor (the worst call of a module called "
            "more than once)",
            f"loss for the gradients: {self.loss}",
        ]
        if self.references:
            lines += [
                f"{self.dtype} verdict: rows beyond the tolerance are decided in float64 (same weights and input): a "
                "port defect if float64 differs too, else within float32 rounding; and a layer, fed torch's float64 "
                f"input, loses precision in a framework whose own float32 error is > {PRECISION_FACTOR:g}x the "
                f"other's and > {PRECISION_FLOOR:g}",
            ]
        lines += [f"note: {note}" for note in self.notes]
        blocks = [("", "weights", "")]
        for mode in self.modes:
            blocks += [(mode, "outputs", f"{mode} mode: outputs, in torch's forward order (torch / Flax class)"),
                       (mode, "running statistics", f"{mode} mode: BatchNorm running statistics after the pass"),
                       (mode, "gradients", f"{mode} mode: gradients of the loss (torch names and layout)")]
        for mode, section, title in blocks:
            rows = [row for row in self.rows if row.mode == mode and row.section == section]
            if section == "weights":  # the same in every mode: listed only where they differ
                compared = len(rows)
                rows = [row for row in rows if not row.ok or row.classification]
                if not rows:
                    lines.append(f"weights (torch layout): all {compared} tensors equal torch's")
                    continue
                title = f"weights (torch layout): {len(rows)} of {compared} tensors differ from torch's"
            if not rows:
                continue
            kinds = kinds_width if section == "outputs" else 0
            lines += ["", title, f"  {'':<{width}}  {'':<{kinds}}{'abs err':>9}  {'rel err':>9}"]
            for row in rows:
                mark = "" if row.ok else "  <-- differs"
                note = f"  ({'; '.join(filter(None, [self._verdict(row), row.note]))})" if (
                    row.note or row.classification) else ""
                errors = (f"{_number(row.abs_err):>9}  {_number(row.rel_err):>9}" if row.compared else
                          f"{'-':>9}  {'-':>9}")
                lines.append(f"  {row.name:<{width}}  {row.kinds:<{kinds}}{errors}{mark}{note}")
        lines += self._precision_lines(width)
        lines.append("")
        if self.diagnosis:  # the verdict stays the last line
            lines += ["diagnosis:"] + [f"  {line}" for line in self.diagnosis]
        ordinary = [row for row in self.rows if row.section != _PRECISION and row.compared]
        rounding = [row for row in ordinary if row.classification == ROUNDING]
        if self.ok and rounding:
            lines.append(f"OK: all {len(ordinary)} comparisons within parity: {len(ordinary) - len(rounding)} within "
                         f"the {self.dtype} tolerance, {len(rounding)} beyond it but within float32 rounding (their "
                         "float64 twins agree)")
        elif self.ok:
            lines.append(f"OK: all {len(ordinary)} comparisons within the {self.dtype} tolerance")
        else:
            row = self._divergent_row()
            where = f"{row.mode} mode {row.section}" if row.mode else row.section
            if row.name != self.first_divergence:
                where += f": {row.name}"
            if self.references:
                defects = [row for row in self.failures if row.section != _PRECISION]
                losses = [row for row in self.failures if row.section == _PRECISION]
                found = [f"{len(defects)} of {len(ordinary)} comparisons differ in float64 too (port defects)"
                         if defects else "",
                         f"{len(losses)} layer{'s' if len(losses) != 1 else ''} lose{'s' if len(losses) == 1 else ''}"
                         " float32 precision" if losses else ""]
                lines.append(f"DIFFERENT: {', '.join(filter(None, found))}; first divergence: "
                             f"{self.first_divergence} ({where})")
            else:
                lines.append(f"DIFFERENT: {len(self.failures)} of {len(ordinary)} comparisons exceed the "
                             f"{self.dtype} tolerance; first divergence: {self.first_divergence} ({where})")
        return "\n".join(lines)

    def _verdict(self, row: Row) -> str:
        """A row's float32 classification as the table's note."""
        twin = f"float64: {_number(row.twin_rel_err)}" if row.twin_rel_err is not None else ""
        if row.classification == ROUNDING:
            if any(r.section == _PRECISION for r in self.failures):
                return f"float32 only, within both frameworks' float32 errors (see the precision losses); {twin}"
            return f"{ROUNDING}; {twin}"
        if row.classification == PORT_DEFECT:
            return f"{PORT_DEFECT}: float64 differs too" + (f", {_number(row.twin_rel_err)}" if twin else "")
        return row.classification

    def _precision_lines(self, width: int) -> list[str]:
        if not self.references:
            return []
        checked = len(self.own_errors)
        losses = [row for row in self.rows if row.section == _PRECISION]
        if not losses:
            return ["", f"float32 precision, layer by layer: {checked} layer calls checked, none loses precision"]
        lines = ["", f"float32 precision, layer by layer (each fed torch's float64 input): {len(losses)} of {checked} "
                 "layer calls lose precision; own error = float32 result vs float64 result on that input",
                 f"  {'':<{width}}  {'own err':>9}  {'twin':>9}"]
        for row in losses:
            lines.append(f"  {row.mode + ' ' + row.name:<{width}}  {_number(row.rel_err):>9}  "
                         f"{_number(row.twin_rel_err or 0.0):>9}  <-- {row.classification}"
                         + (f"  ({row.note})" if row.note else ""))
        return lines

    def __str__(self) -> str:
        return self.table()


def _number(value: float) -> str:
    return "0" if value == 0 else f"{value:.1e}"


def perturb_batchnorm(torch_model: Any, seed: int = 0) -> None:
    """Give every BatchNorm of ``torch_model`` (``BatchNorm1d/2d/3d``, ``SyncBatchNorm``) random affine parameters
    and running statistics, and every ``LayerNorm`` and ``GroupNorm`` random affine parameters, in place (port
    them into the Flax twin afterwards). With torch's initial 1 / 0 a swapped scale and bias, or mean and
    variance, would go unseen, and eval mode would pass activations through unnormalised (ResNet-50's grow until
    float64 rounding exceeds its tolerance)."""
    import torch
    from torch.nn.modules.batchnorm import _BatchNorm

    generator = torch.Generator().manual_seed(seed)

    def fill(tensor: Any, scale: float, shift: float, normal: bool) -> None:
        if tensor is not None:
            draw = torch.randn if normal else torch.rand
            tensor.copy_(scale * draw(tensor.shape, generator=generator) + shift)

    with torch.no_grad():
        for module in torch_model.modules():
            if isinstance(module, _BatchNorm | torch.nn.LayerNorm | torch.nn.GroupNorm):
                fill(module.weight, 1.0, 0.5, normal=False)
                fill(module.bias, 0.2, 0.0, normal=True)
            if isinstance(module, _BatchNorm):
                fill(module.running_mean, 0.2, 0.0, normal=True)
                fill(module.running_var, 1.0, 0.5, normal=False)


# ------------------------------------------------------------------------------------------------ compare
def compare(torch_model: Any, flax_model: nnx.Module, inputs: Any = None, *, dtype: str = "float64",
            modes: Sequence[str] = ("eval", "train"), gradients: bool = True, labels: Any = None,
            input_shape: Sequence[int] | None = None, seed: int = 0, port_weights: bool = False,
            precision: Literal["highest", "default"] = "highest",
            layout: Literal["channels_last", "same"] = "channels_last", references: bool = True) -> ParityReport:
    """Run ``torch_model`` and its NNX port ``flax_model`` side by side, layer by layer; return a ``ParityReport``.

    ``inputs``: one batch in torch's layout (numpy array or torch tensor), of any rank and dtype. Floating-point
    inputs are cast to ``dtype``; integer ones (token ids) go to both models unchanged. None: a seeded batch of
    ``input_shape``, or, without that, of a shape that suits the first layer (Conv2d: (4, C, 32, 32); Conv1d:
    (4, C, 32); Linear: (4, in_features); BatchNorm1d, LayerNorm: (4, features); ...): unit-normal floats, or,
    when the first layer is an Embedding, integer ids in [0, num_embeddings) ((4, 8) without ``input_shape``).

    ``layout``: how torch's tensors of rank 3 and more map to Flax's. "channels_last" (the default): torch's
    (N, C, *spatial) is Flax's (N, *spatial, C), as for images and Conv1d sequences: a float input of rank >= 3
    is moved channels-last for Flax (NCHW -> NHWC, NCL -> NLC), and every Flax output of rank >= 3 is moved back
    channels-first before it is compared. "same": both frameworks hold such tensors alike (a transformer's
    (N, L, D)), nothing is moved. Integer inputs and tensors of rank <= 2 are never moved. A recorded output that
    fits torch's shape only without the move (an embedding's (N, L, D) inside a channels-last model) is
    compared as it is; where both readings fit (L = D) the layout decides.

    ``dtype``: both copies compute in it
    ("float64", the default, proves parity to ~1e-14; "float32" shows what a float32 run sees); tolerances in
    ``TOLERANCES``. ``modes``: "eval" (running statistics) and/or "train" (batch statistics; dropout is held
    off, as its masks come from different random generators in the two frameworks).

    ``gradients``: compare d(loss)/d(every parameter) in train mode (in eval mode if ``modes`` has no
    "train"). The loss is the mean cross-entropy of the logits against ``labels`` (seeded random class labels
    when None. Not the sum of the logits: its gradient at the last layer is the same for every class and sample,
    and a train-mode BatchNorm that receives the same gradient for every sample passes none back). Outputs of
    other ranks are read as a model of that kind is trained: with ``layout="channels_last"`` an output
    (N, C, *spatial) (a block's feature map, in torch's layout) is average-pooled over its trailing axes to
    (N, C) logits, as a classifier head would, labels (N,); with ``layout="same"`` an output (N, ..., V) holds
    logits per position (a language model's (N, L, V)), and the loss is the cross-entropy averaged over every
    position, labels (N, ...). An output of rank 1 has no class axis: pass ``gradients=False``.

    ``port_weights``: load torch's state_dict into the Flax copy first (the Flax model itself is never changed).
    Without it (the default: it is the user's port that is being checked) the Flax model must hold torch's
    weights already, typically after ``port.load_torch_state_dict``; the report's weights block lists those
    that differ.

    ``precision``: "highest" (the default) computes float32 matmuls and convolutions in full float32 in both
    frameworks (``jax.default_matmul_precision('highest')``, TF32 off in torch); "default" leaves both frameworks'
    settings as they are, to show what a run with them sees on a GPU (XLA's default and torch's cuDNN default use
    TF32 there; the tolerances assume full float32). CPUs compute float32 in full either way.

    ``references`` (float32 only): decide each row beyond the float32 tolerance against float64 references of
    the same computation, as ``verify`` does (see "The float32 verdict" in docs/design.md). A fixed float32
    tolerance fails exact ports: near a ReLU's zero one framework's rounding flips a sign and the other's does
    not, and the gradients upstream move by up to 1.2e-1 (ResNet-18, seed 2). So when a row exceeds it, the
    comparison is run again in float64 (same weights, same input) and the row is a port defect if its float64
    twin differs too (``TOLERANCES['float64']``), within float32 rounding (not a failure) if not; and every leaf
    layer is run on torch's float64 input to it, in both frameworks, in float32 and float64: a layer whose own
    float32 error is more than ``PRECISION_FACTOR`` times its twin's and above ``PRECISION_FLOOR`` loses
    precision in that framework (a failure, named in the table). Costs one float64 comparison and the layer
    runs, only when some row exceeds the tolerance. False: every row beyond the tolerance is a failure.

    Both models are left exactly as they were: weights, BatchNorm statistics and counters, train/eval mode.
    """

    _check_pair(torch_model, flax_model, dtype)
    if precision not in ("highest", "default"):
        raise ValueError(f"precision must be 'highest' or 'default', got {precision!r}")
    modes = tuple(modes)
    if not modes or any(mode not in ("eval", "train") for mode in modes):
        raise ValueError(f"modes must be a non-empty sequence of 'eval' and 'train', got {modes!r}")
    if layout not in ("channels_last", "same"):
        raise ValueError(f"layout must be 'channels_last' (torch's (N, C, ...) is Flax's (N, ..., C)) or 'same' "
                         f"(both hold tensors alike), got {layout!r}")
    x = _input_batch(torch_model, inputs, input_shape, seed, dtype)
    capture = _Capture() if references and dtype != "float64" else None
    with _capturing(capture):
        report = _pass(torch_model, flax_model, x, dtype, modes, gradients, labels, seed, port_weights, precision,
                       layout)
    if capture is not None and not report.ok:
        _decide_float32(report, capture, torch_model, flax_model, x, modes, gradients, labels, seed, port_weights,
                        precision, layout)
    if not report.ok:  # each known trap confirmed by recomputing, on fresh copies: an exact port pays nothing
        with _numerics(dtype, precision):
            report.diagnosis = diagnosis.diagnose(report, x, _flax_input(x, layout), functools.partial(
                _copies_in_mode, torch_model, flax_model, dtype, port_weights))
    return report


def _check_pair(torch_model: Any, flax_model: Any, dtype: str) -> None:
    """The arguments both ``compare`` and ``compare_training`` take first: a torch model, its NNX port, a dtype
    with a stated tolerance."""
    import torch

    if dtype not in TOLERANCES:
        raise ValueError(f"dtype {dtype!r} has no stated tolerance; use one of {', '.join(TOLERANCES)}")
    if not isinstance(torch_model, torch.nn.Module):
        raise TypeError(f"torch_model must be a torch.nn.Module, got {type(torch_model).__name__} "
                        "(the torch model comes first, its Flax port second)")
    if not isinstance(flax_model, nnx.Module):
        raise TypeError(f"flax_model must be a flax.nnx.Module, got {type(flax_model).__name__} "
                        "(the torch model comes first, its Flax port second)")


def _pass(torch_model: Any, flax_model: nnx.Module, x: np.ndarray, dtype: str, modes: tuple[str, ...],
          gradients: bool, labels: Any, seed: int, port_weights: bool, precision: str, layout: str,
          layer_check: Callable[[str, Any, nnx.Module, dict], None] | None = None) -> ParityReport:
    """One comparison in ``dtype``: the report of ``compare`` without the float32 verdict. ``layer_check(mode,
    t, f, inputs)`` is called after each mode's forward pass with the copies and torch's inputs to each module."""
    with _numerics(dtype, precision):
        report = ParityReport(type(torch_model).__name__, type(flax_model).__name__, dtype, tuple(x.shape), modes,
                              "", [], {}, input_layout=_layout_description(x, layout))
        tol = TOLERANCES[dtype]
        t0, f0 = _copies(torch_model, flax_model, dtype, port_weights, report.notes)
        report.rows += _weight_rows(t0, f0, tol, report.notes, port_weights)
        torch_only: set[str] = set()
        flax_only: set[str] = set()
        for mode in modes:
            t, f = (t0, f0) if mode == modes[0] else _copies(torch_model, flax_model, dtype, port_weights, [])
            _set_mode(t, f, mode, report.notes)
            inputs_t: dict[str, list[tuple]] | None = {} if layer_check is not None else None
            out_t, records_t, order = _record_torch(t, x, inputs_t)
            out_f, records_f = _record_flax(f, x, layout)
            if layer_check is not None:
                layer_check(mode, t, f, inputs_t)
            for position, name in enumerate(order):
                report.forward_order.setdefault(name, position)
            report.rows += _output_rows(mode, order, records_t, records_f, _kinds(t, f), tol, torch_only,
                                        flax_names={name for name, _ in named_modules(f)})
            flax_only.update(name for name in records_f if name not in records_t)
            report.rows.append(_row(mode, "outputs", _LOGITS, "", [_fit(_numpy(out_f, layout), _numpy(out_t))],
                                    [_numpy(out_t)], tol.values, kinds=f"{type(t).__name__} / {type(f).__name__}"))
            if mode == "train":
                report.rows += _statistics_rows(t, f, tol)
            # Gradients where training takes them, in train mode; in eval mode only when that is all there is.
            if gradients and mode == ("train" if "train" in modes else "eval") and not any(
                    p.requires_grad for p in t.parameters()):
                report.loss = "none: the torch model has no parameters that require grad, so no gradients to compare"
            elif gradients and mode == ("train" if "train" in modes else "eval"):
                labels_used = _labels(labels, out_t, seed, layout)
                report.loss = ("mean cross-entropy against the given labels" if labels is not None else
                               f"mean cross-entropy against seeded random labels (seed {seed})")
                if np.ndim(out_t) >= 3:
                    report.loss += ("; the output (N, C, ...) average-pooled to (N, C) logits first"
                                    if layout == "channels_last" else
                                    "; the output read as logits per position (N, ..., classes), averaged over all")
                report.rows += _gradient_rows(mode, t, f, x, labels_used, tol, layout=layout)
        if not gradients:
            report.loss = "none (gradients=False)"
        if torch_only:
            report.notes.append("listed in the outputs, not compared: no NNX module of that name called (a function "
                                "there): " + ", ".join(sorted(torch_only)))
        if flax_only:
            report.notes.append("called in Flax only, not compared (torch never called a module of that name): "
                                + ", ".join(sorted(flax_only)))
    weights_differ = [row for row in report.rows if row.section == "weights" and not row.ok]
    if weights_differ and not port_weights:
        report.notes.append(f"{len(weights_differ)} state_dict tensors differ from torch's: port them first "
                            "(flax_resnet.port.load_torch_state_dict(flax_model, torch_model.state_dict())) or "
                            "pass port_weights=True")
    return report


# ------------------------------------------------------------------------------------------ preparation
def _input_batch(torch_model: Any, inputs: Any, input_shape: Sequence[int] | None, seed: int,
                 dtype: str) -> np.ndarray:
    """The batch both models get, in torch's layout, as numpy: floats in ``dtype``, integers (ids) unchanged."""
    import torch

    if inputs is not None and input_shape is not None:
        raise ValueError("pass inputs (a batch) or input_shape (for a random batch), not both")
    if inputs is not None:
        x = inputs.detach().cpu().numpy() if isinstance(inputs, torch.Tensor) else np.asarray(inputs)
        if np.issubdtype(x.dtype, np.floating):
            return x.astype(dtype)
        if np.issubdtype(x.dtype, np.integer) or x.dtype == np.bool_:
            return x  # token ids, indices, masks: the same values for both
        raise ValueError(f"inputs must be floating point (images, features) or integers (token ids), got dtype "
                         f"{x.dtype}")
    first = _first_layer(torch_model)
    shape = tuple(input_shape) if input_shape is not None else _guess_input_shape(torch_model)
    rng = np.random.default_rng(seed)
    if isinstance(first, torch.nn.Embedding):
        return rng.integers(0, first.num_embeddings, shape)  # int64, as torch's ids are
    return rng.standard_normal(shape).astype(dtype)


def _first_layer(torch_model: Any) -> Any:
    """The first module (in registration order, which is usually the forward order) that takes the input's
    layout from its settings, or None."""
    import torch
    from torch.nn.modules.batchnorm import _BatchNorm

    kinds = (torch.nn.modules.conv._ConvNd, torch.nn.Linear, torch.nn.Embedding, _BatchNorm, torch.nn.LayerNorm,
             torch.nn.GroupNorm)
    return next((module for module in torch_model.modules() if isinstance(module, kinds)), None)


def _guess_input_shape(torch_model: Any) -> tuple[int, ...]:
    import torch
    from torch.nn.modules.batchnorm import _BatchNorm
    from torch.nn.modules.conv import _ConvNd

    module = _first_layer(torch_model)
    if isinstance(module, _ConvNd):  # 32 (1-d and 2-d), 8 (3-d) per axis; half that where the layer grows it
        dims = len(module.kernel_size)
        return (4, module.in_channels, *((32 if dims < 3 else 8) // (2 if module.transposed else 1),) * dims)
    if isinstance(module, torch.nn.Linear):
        return (4, module.in_features)
    if isinstance(module, torch.nn.Embedding):
        return (4, 8)
    if isinstance(module, torch.nn.BatchNorm1d):
        return (4, module.num_features)
    if isinstance(module, _BatchNorm):
        return (4, module.num_features, *((4, 4, 4) if isinstance(module, torch.nn.BatchNorm3d) else (16, 16)))
    if isinstance(module, torch.nn.GroupNorm):
        return (4, module.num_channels, 16, 16)
    if isinstance(module, torch.nn.LayerNorm):
        return (4, *module.normalized_shape)
    raise ValueError(f"cannot guess the input shape of {type(torch_model).__name__} (no convolution, Linear, "
                     "Embedding or norm layer first): pass input_shape=(N, C, H, W) or inputs=")


def _layout_description(x: np.ndarray, layout: str) -> str:
    """How the input was given to each framework, for the report's header."""
    if not np.issubdtype(x.dtype, np.floating):
        return f"{x.dtype} ids, the same for both"
    if x.ndim < 3:
        return ""
    if layout == "same":
        return "the same layout for both (layout='same')"
    axes = {3: ("NCL", "NLC"), 4: ("NCHW", "NHWC"), 5: ("NCDHW", "NDHWC")}
    torch_axes, flax_axes = axes.get(x.ndim, ("channels first", "channels last"))
    return f"{torch_axes} ({flax_axes} for Flax)"


@contextlib.contextmanager
def _numerics(dtype: str, precision: str = "highest") -> Iterator[None]:
    """float64 available in JAX (scoped, as the parity tests do) and, at "highest", full-precision float32 matmuls
    and convolutions on GPUs in both frameworks (no TF32), restored afterwards: the comparison is of the models,
    not of precision settings."""
    with contextlib.ExitStack() as stack:
        if dtype == "float64":
            stack.enter_context(jax.enable_x64(True))
        if precision == "highest":
            stack.enter_context(jax.default_matmul_precision("highest"))
            stack.enter_context(torch_fp32_precision("ieee"))
        yield


def _copies(torch_model: Any, flax_model: nnx.Module, dtype: str, port_weights: bool,
            notes: list[str]) -> tuple[Any, nnx.Module]:
    """Copies of both models in ``dtype`` (the originals are never run: a train-mode pass would move their
    BatchNorm statistics); the Flax copy given torch's weights when ``port_weights``."""
    import torch

    t = copy.deepcopy(torch_model).to(getattr(torch, dtype))
    f = _compute_in(cast_floating(nnx.clone(flax_model), jnp.dtype(dtype)), jnp.dtype(dtype))
    if port_weights:
        state_dict = t.state_dict()
        known = set(_flax_state(f))
        # Stock nnx.BatchNorm keeps no batch counter (torch uses it only when momentum=None): not an error.
        dropped = [k for k in state_dict if k.endswith("num_batches_tracked") and k not in known]
        load_torch_state_dict(f, {k: v for k, v in state_dict.items() if k not in dropped})
        if dropped:
            notes.append(f"port_weights: {len(dropped)} num_batches_tracked not loaded (the Flax BatchNorm has none)")
    return t, f


def _compute_in(model: nnx.Module, dtype: Any) -> nnx.Module:
    """Every module's floating-point compute ``dtype`` (where one is set) made ``dtype``, in place.

    Casting the variables is not enough: ``nnx.Embed`` fixes its ``dtype`` to its parameters' at construction
    (float32), so a float64 copy still embeds in float32 and rounds the embedding's gradient to float32 (7e-8
    from torch's float64 one, measured); a layer given ``dtype=bfloat16`` would compute in bfloat16.
    """
    for _, module in nnx.iter_modules(model):
        current = getattr(module, "dtype", None)
        if current is not None and jnp.issubdtype(current, jnp.floating):
            module.dtype = dtype
    return model

def _copies_in_mode(torch_model: Any, flax_model: nnx.Module, dtype: str, port_weights: bool,
                    mode: str) -> tuple[Any, nnx.Module]:
    """Fresh copies as ``compare`` runs them in ``mode`` ("" leaves the modes as they are)."""
    t, f = _copies(torch_model, flax_model, dtype, port_weights, [])
    if mode:
        _set_mode(t, f, mode, [])
    return t, f


def _flax_state(model: nnx.Module) -> dict[str, np.ndarray]:
    return {key: value.numpy() for key, value in to_torch_state_dict(model).items()}


_DROPOUT_NOTE = "dropout held off in train mode (its masks come from different random generators)"


def _set_mode(t: Any, f: nnx.Module, mode: str, notes: list[str]) -> None:
    import torch

    if mode == "eval":
        t.eval()
        f.eval()
        return
    t.train()
    f.train()
    dropouts = (torch.nn.Dropout, torch.nn.Dropout1d, torch.nn.Dropout2d, torch.nn.Dropout3d, torch.nn.AlphaDropout,
                torch.nn.FeatureAlphaDropout)
    held = [m for m in t.modules() if isinstance(m, dropouts)]
    for module in held:
        module.eval()
    flax_held = [m for _, m in nnx.iter_modules(f) if isinstance(m, nnx.Dropout)]
    for module in flax_held:
        module.deterministic = True
    if (held or flax_held) and _DROPOUT_NOTE not in notes:
        notes.append(_DROPOUT_NOTE)


# -------------------------------------------------------------------------------------------- recording
def _leaves(value: Any) -> list[Any]:
    """The arrays in a module's output (a tensor, or a tuple/list/dict of them)."""
    if isinstance(value, tuple | list):
        return [leaf for item in value for leaf in _leaves(item)]
    if isinstance(value, dict):
        return [leaf for item in value.values() for leaf in _leaves(item)]
    return [value] if hasattr(value, "shape") else []


def _numpy(value: Any, layout: str | None = None) -> np.ndarray:
    """A torch tensor or JAX array as numpy; a Flax one, with ``layout="channels_last"``, in torch's layout: a
    tensor of rank >= 3 moved channels-first (NHWC -> NCHW, NLC -> NCL)."""
    if hasattr(value, "detach"):
        return value.detach().cpu().numpy().copy()  # a copy: an in-place ReLU would change it afterwards
    array = np.asarray(value)
    return np.moveaxis(array, -1, 1) if layout == "channels_last" and array.ndim >= 3 else array


def _fit(flax: np.ndarray, torch: np.ndarray) -> np.ndarray:
    """A Flax tensor moved channels-first (``_numpy``) that fits torch's shape only as it was before the move (an
    embedding's (N, L, D) in a channels-last model) put back; otherwise as it is (a wrong shape stays wrong)."""
    if flax.ndim >= 3 and flax.shape != torch.shape and np.moveaxis(flax, 1, -1).shape == torch.shape:
        return np.moveaxis(flax, 1, -1)
    return flax


def _record_torch(model: Any, x: np.ndarray, inputs: dict[str, list[tuple]] | None = None,
                  ) -> tuple[np.ndarray, dict[str, list[list[np.ndarray]]], list[str]]:
    """Output, every submodule's outputs (per call) and the order in which the submodules first finished; with
    ``inputs``, also every leaf module's positional arguments per call (tensors as numpy), into that dict."""
    import torch

    records: dict[str, list[list[np.ndarray]]] = {}
    order: list[str] = []

    def hook(name: str):
        def record(module, args, output):
            if name not in records:
                order.append(name)
            records.setdefault(name, []).append([_numpy(leaf) for leaf in _leaves(output)])
        return record

    def pre_hook(name: str):
        def record(module, args):  # before the call: an in-place module would have changed them after it
            inputs.setdefault(name, []).append(tuple(_numpy(a) if hasattr(a, "detach") else a for a in args))
        return record

    handles = [module.register_forward_hook(hook(name)) for name, module in model.named_modules() if name]
    if inputs is not None:
        handles += [module.register_forward_pre_hook(pre_hook(name)) for name, module in model.named_modules()
                    if name and next(module.children(), None) is None]
    try:
        with torch.no_grad():
            out = model(torch.from_numpy(x).to(recording.device_of(model)))
    finally:
        for handle in handles:
            handle.remove()
    return _numpy(out), records, order


def _record_flax(model: nnx.Module, x: np.ndarray,
                 layout: str = "channels_last") -> tuple[jax.Array, dict[str, list[list[np.ndarray]]]]:
    """Output and every submodule's outputs (per call), these in torch's layout per ``layout``."""
    records: dict[str, list[list[np.ndarray]]] = {}

    def keep(name: str) -> recording.Callback:
        return lambda args, out: records.setdefault(name, []).append([np.asarray(leaf) for leaf in _leaves(out)])

    with recording.watching_flax([(module, keep(name)) for name, module in named_modules(model) if name]):
        out = model(_flax_input(x, layout))
    return out, {name: [[_numpy(a, layout) for a in call] for call in calls] for name, calls in records.items()}


def _flax_input(x: np.ndarray, layout: str = "channels_last") -> jax.Array:
    """torch's batch as Flax takes it: floats of rank >= 3 channels-last (NCHW -> NHWC, NCL -> NLC) unless
    ``layout="same"``; integer ids as they are (int32 unless float64 is on: JAX's default integer)."""
    if layout == "channels_last" and x.ndim >= 3 and np.issubdtype(x.dtype, np.floating):
        x = np.moveaxis(x, 1, -1)
    return jnp.asarray(x)


# ----------------------------------------------------------------------------------------------- errors
def _errors(flax: list[np.ndarray], torch: list[np.ndarray]) -> tuple[float, float, str]:
    """Worst absolute and relative error over the tensors of one output (relative to the largest torch value)."""
    if len(flax) != len(torch):
        return math.inf, math.inf, f"{len(torch)} tensors in torch, {len(flax)} in Flax"
    worst_abs = worst_rel = 0.0
    for a, b in zip(flax, torch, strict=True):
        if a.shape != b.shape:
            return math.inf, math.inf, f"shape {a.shape} in Flax, {b.shape} in torch"
        if a.size == 0:
            continue
        a, b = a.astype(np.float64), b.astype(np.float64)
        diff = float(np.max(np.abs(a - b)))
        scale = float(np.max(np.abs(b)))
        worst_abs = max(worst_abs, diff) if not math.isnan(diff) else math.nan
        rel = diff / scale if scale > 0 else diff
        worst_rel = max(worst_rel, rel) if not math.isnan(rel) else math.nan
    return worst_abs, worst_rel, ""


def _row(mode: str, section: str, name: str, layer: str, flax: list[np.ndarray], torch: list[np.ndarray],
         tolerance: float, kinds: str = "", note: str = "") -> Row:
    abs_err, rel_err, problem = _errors(flax, torch)
    row = Row(mode, section, name, layer, abs_err, rel_err, tolerance, kinds, "; ".join(filter(None, [note, problem])))
    capture = _CAPTURE.get()
    if capture is not None:
        capture.add((mode, section, name), flax, torch, row.ok)
    return row


def _kinds(t: Any, f: nnx.Module) -> dict[str, str]:
    """torch module name -> 'torch class / Flax class' ('Conv2d depthwise / Conv', 'ReLU / (none)')."""
    flax_kinds = {name: type(module).__name__ for name, module in named_modules(f)}
    return {name: f"{_torch_kind(module)} / {flax_kinds.get(name, '(none)')}" for name, module in t.named_modules()}


def _torch_kind(module: Any) -> str:
    """The torch class, with the settings that make a convolution another kind of layer."""
    import torch

    kind = type(module).__name__
    if isinstance(module, torch.nn.modules.conv._ConvNd):
        if module.groups > 1:
            depthwise = module.groups == module.in_channels
            kind += " depthwise" if depthwise else f" groups={module.groups}"
        if any(d != 1 for d in module.dilation):
            dilation = module.dilation
            kind += f" dilation={dilation[0] if len(set(dilation)) == 1 else dilation}"
    return kind


def _output_rows(mode: str, order: list[str], records_t: dict, records_f: dict, kinds: dict[str, str],
                 tol: Tolerance, torch_only: set[str], flax_names: set[str] | None = None) -> list[Row]:
    """One row per torch module, in torch's forward order: its worst call against the Flax module of that name.
    A module with no Flax module of that name called (an activation, pooling or flatten written as a function in
    Flax) is listed in its place, not compared and not a failure."""
    rows = []
    for name in order:
        if name not in records_f:
            torch_only.add(name)
            why = ("the Flax module of that name was never called" if flax_names and name in flax_names else
                   "no Flax module (a function there)")
            # errors 0, not NaN: whoever takes the worst error over rows sees none from a row that compared nothing
            rows.append(Row(mode, "outputs", name, name, 0.0, 0.0, tol.values, kinds.get(name, ""),
                            f"{why}: not compared", compared=False))
            continue
        calls_t, calls_f = records_t[name], records_f[name]
        if len(calls_t) != len(calls_f):
            rows.append(Row(mode, "outputs", name, name, math.inf, math.inf, tol.values, kinds.get(name, ""),
                            f"called {len(calls_t)}x in torch, {len(calls_f)}x in Flax"))
            continue
        # strict=False: a different number of tensors is reported by _errors
        worst = max((_row(mode, "outputs", name, name, [_fit(a, b) for a, b in zip(f_out, t_out, strict=False)],
                          t_out, tol.values, kinds.get(name, ""))
                     for t_out, f_out in zip(calls_t, calls_f, strict=True)),
                    key=lambda row: (not row.ok, row.rel_err if not math.isnan(row.rel_err) else math.inf))
        if len(calls_t) > 1:
            worst = dataclasses.replace(worst, note="; ".join(filter(None, [f"worst of {len(calls_t)} calls",
                                                                            worst.note])))
        rows.append(worst)
    return rows


def _layer_of(key: str) -> str:
    return key.rsplit(".", 1)[0] if "." in key else ""


def _weight_rows(t: Any, f: nnx.Module, tol: Tolerance, notes: list[str], port_weights: bool) -> list[Row]:
    torch_state = {key: value.detach().cpu().numpy() for key, value in t.state_dict().items()}
    flax_state = _flax_state(f)
    rows = []
    absent = []
    for key, value in torch_state.items():
        if key not in flax_state:
            if key.endswith("num_batches_tracked"):
                absent.append(key)  # stock nnx.BatchNorm has no counter; torch reads it only when momentum=None
                continue
            rows.append(Row("", "weights", key, _layer_of(key), math.inf, math.inf, tol.values,
                            note="missing in the Flax model"))
            continue
        rows.append(_row("", "weights", key, _layer_of(key), [flax_state[key]], [value], tol.values))
    rows += [Row("", "weights", key, _layer_of(key), math.inf, math.inf, tol.values, note="not in the torch model")
             for key in flax_state if key not in torch_state]
    if absent and not port_weights:
        notes.append(f"{len(absent)} BatchNorm layers keep no num_batches_tracked in Flax (stock nnx.BatchNorm): "
                     "not compared")
    return rows


def _statistics_rows(t: Any, f: nnx.Module, tol: Tolerance) -> list[Row]:
    """Every torch buffer (BatchNorm's running_mean, running_var, num_batches_tracked) after the train pass."""
    flax_state = _flax_state(f)
    rows = []
    for key, value in t.named_buffers():
        if key in flax_state:
            rows.append(_row("train", "running statistics", key, _layer_of(key), [flax_state[key]],
                             [value.detach().cpu().numpy()], tol.values))
    return rows


# -------------------------------------------------------------------------------------------- gradients
def _labels(labels: Any, out_t: np.ndarray, seed: int, layout: str = "channels_last") -> np.ndarray:
    """Class labels for the loss (see ``compare``): (N,) for logits (N, C) and, with ``layout="channels_last"``,
    for an (N, C, ...) map; (N, ...) for per-position logits (N, ..., classes) with ``layout="same"``."""
    if out_t.ndim < 2:
        raise ValueError(f"cannot form a cross-entropy loss from an output of shape {out_t.shape} (expected logits "
                         "(N, classes), a feature map (N, C, ...) or logits per position (N, L, classes) with "
                         "layout='same'); pass gradients=False")
    per_position = layout == "same" and out_t.ndim >= 3
    shape, classes = (out_t.shape[:-1], out_t.shape[-1]) if per_position else (out_t.shape[:1], out_t.shape[1])
    if labels is None:
        return np.random.default_rng(seed + 1).integers(0, classes, shape)
    labels = labels.detach().cpu().numpy() if hasattr(labels, "detach") else np.asarray(labels)
    if labels.shape != shape or not np.issubdtype(labels.dtype, np.integer):
        what = f"{shape[0]} integer class indices (shape {shape})" if len(shape) == 1 else f"integers of shape {shape}"
        raise ValueError(f"labels must be {what}, got {labels.dtype} of shape {labels.shape}")
    if labels.min() < 0 or labels.max() >= classes:
        raise ValueError(f"labels must lie in [0, {classes}) (the model has {classes} outputs)")
    return labels.astype(np.int64)


def _flax_loss(model: nnx.Module, x: jax.Array, labels: jax.Array, layout: str = "channels_last") -> jax.Array:
    logits = model(x)
    if logits.ndim >= 3 and layout == "channels_last":
        logits = logits.mean(axis=tuple(range(1, logits.ndim - 1)))  # (N, *spatial, C): pool the spatial axes
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.take_along_axis(log_probs, labels[..., None], axis=-1).mean()


def _gradient_rows(mode: str, t: Any, f: nnx.Module, x: np.ndarray, labels: np.ndarray, tol: Tolerance,
                   layout: str = "channels_last") -> list[Row]:
    """The loss and d(loss)/d(parameter) for every torch parameter, the Flax ones converted to torch's layout."""
    import torch
    import torch.nn.functional as F  # noqa: N812 - torch's own abbreviation

    t.zero_grad(set_to_none=True)
    logits = t(torch.from_numpy(x).to(recording.device_of(t)))
    if logits.ndim >= 3 and layout == "channels_last":
        logits = logits.mean(dim=tuple(range(2, logits.ndim)))
    target = torch.from_numpy(labels).to(logits.device)
    loss_t = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))
    loss_t.backward()
    loss_f, grads = nnx.value_and_grad(functools.partial(_flax_loss, layout=layout))(
        f, _flax_input(x, layout), jnp.asarray(labels))
    # The gradient State has the parameters' structure: put it in a copy's place and let the port name it and
    # lay it out as torch does.
    holder = nnx.clone(f)
    nnx.update(holder, grads)
    grads_f = _flax_state(holder)
    rows = [_row(mode, "gradients", _LOSS, "", [np.asarray(loss_f)], [loss_t.detach().cpu().numpy()], tol.values)]
    for name, param in t.named_parameters():
        grad_t = param.grad.detach().cpu().numpy() if param.grad is not None else np.zeros(tuple(param.shape))
        if name not in grads_f:
            rows.append(Row(mode, "gradients", name, _layer_of(name), math.inf, math.inf, tol.gradients,
                            note="no such parameter in the Flax model"))
            continue
        rows.append(_row(mode, "gradients", name, _layer_of(name), [grads_f[name]], [grad_t], tol.gradients))
    return rows


# ------------------------------------------------------------------------------------------ float32 verdict
_Key = tuple[str, str, str]  # a row's (mode, section, name)
_Call = tuple[list[np.ndarray], list[np.ndarray]]  # the (Flax, torch) tensors of one compared call


class _Capture:
    """The tensors behind the rows, per call, as ``_row`` compares them. In the float32 pass (``keys`` None) only
    the calls beyond the tolerance keep theirs (the others: None, to keep the call numbering), so the memory held
    is what needs a verdict; in the float64 pass every call of the rows in ``keys``."""

    def __init__(self, keys: set[_Key] | None = None):
        self.keys = keys
        self.calls: dict[_Key, list[_Call | None]] = {}

    def add(self, key: _Key, flax: list[np.ndarray], torch: list[np.ndarray], ok: bool) -> None:
        # Copies: a torch buffer's numpy view would follow the next train-mode pass's update.
        if self.keys is None:
            self.calls.setdefault(key, []).append(None if ok else _copied(flax, torch))
        elif key in self.keys:
            self.calls.setdefault(key, []).append(_copied(flax, torch))


def _copied(flax: list[np.ndarray], torch: list[np.ndarray]) -> _Call:
    return [np.array(a) for a in flax], [np.array(b) for b in torch]


_CAPTURE: contextvars.ContextVar[_Capture | None] = contextvars.ContextVar("flax_resnet_parity_capture",
                                                                          default=None)


@contextlib.contextmanager
def _capturing(capture: _Capture | None) -> Iterator[None]:
    token = _CAPTURE.set(capture)
    try:
        yield
    finally:
        _CAPTURE.reset(token)


def _decide_float32(report: ParityReport, capture: _Capture, torch_model: Any, flax_model: nnx.Module,
                    x: np.ndarray, modes: tuple[str, ...], gradients: bool, labels: Any, seed: int,
                    port_weights: bool, precision: str, layout: str) -> None:
    """Classify, in place, every row of a float32 ``report`` beyond the tolerance against its float64 twin (the
    same comparison in float64: same weights, same input), and add a row for each layer that loses float32
    precision in one framework (measured layer by layer on torch's float64 inputs)."""
    beyond = {(row.mode, row.section, row.name) for row in report.rows if not row.ok}
    twins = _Capture(beyond)
    own: list[tuple[str, str, str, float, float, float, float]] = []
    skipped: list[str] = []

    def layer_check(mode: str, t: Any, f: nnx.Module, inputs: dict[str, list[tuple]]) -> None:
        own.extend(_own_errors(mode, t, f, inputs, skipped, layout))

    # Only the modes that have a row to decide (a train-mode gradient, typically: eval mode then costs nothing);
    # the gradients stay in the mode that took them.
    gradient_mode = "train" if "train" in modes else "eval"
    needed = tuple(mode for mode in modes if any(key[0] == mode for key in beyond)) or modes[:1]
    with _capturing(twins):
        reference = _pass(torch_model, flax_model, x.astype(np.float64), "float64", needed,
                          gradients and gradient_mode in needed, labels, seed, port_weights, precision, layout,
                          layer_check=layer_check)
    twin_rows = {(row.mode, row.section, row.name): row for row in reference.rows}
    rows = []
    for row in report.rows:
        key = (row.mode, row.section, row.name)
        if row.ok:
            rows.append(row)
            continue
        twin = twin_rows.get(key)
        if twin is None or not (twin.ok or _shrinks_with_precision(row.rel_err, twin.rel_err)):
            rows.append(dataclasses.replace(row, classification=PORT_DEFECT,
                                            twin_rel_err=None if twin is None else twin.rel_err))
            continue
        classification, note = _rounding(capture.calls.get(key, []), twins.calls.get(key, []),
                                         max(twin.tolerance, twin.rel_err))
        rows.append(dataclasses.replace(row, classification=classification, twin_rel_err=twin.rel_err,
                                        note="; ".join(filter(None, [row.note, note]))))
    report.rows = rows + _precision_rows(own)
    report.references = True
    report.own_errors = [(mode, name, flax, torch) for mode, name, _, flax, torch, _, _ in own]
    if skipped:
        report.notes.append("float32 precision not checked (the twin would not run on torch's input to it): "
                            + ", ".join(sorted(set(skipped))))


def _shrinks_with_precision(rel32: float, rel64: float) -> bool:
    """Whether a difference shrinks from float32 to float64 as rounding does (by ~the ratio of unit roundoffs,
    6e-8 / 1.1e-16 = 5e8; required: by ROUNDING_SHRINK), where a port defect (a weight, a padding, a formula)
    stays the same size. Measured: a BatchNorm computing E[x^2] - E[x]^2 on inputs offset by 300 is 6e-3 apart
    in float32 and 1e-11 in float64 (beyond the float64 tolerance, 6e8x smaller): its precision loss, not a
    defect of the port; a 1e-3 error in a weight is 1e-3 in both."""
    return rel64 <= ROUNDING_SHRINK * rel32


def _rounding(calls32: list[_Call | None], calls64: list[_Call | None], tolerance64: float) -> tuple[str, str]:
    """ROUNDING when, element by element in every call beyond the tolerance, the frameworks' float32 difference is
    within their own float32 errors plus the float64 tolerance: |f32_flax - f32_torch| <= |f32_flax - f64_flax| +
    |f32_torch - f64_torch| + tolerance64 * max|f64_torch|. Element-wise, as an element whose sign flipped in one
    framework is one such element. Given an agreeing float64 twin this is the triangle inequality, so what it
    refuses in practice is a float32 value that is not finite where float64's is (an overflow: named as a
    precision loss of that framework)."""
    if len(calls32) != len(calls64):
        return PORT_DEFECT, f"called {len(calls64)}x in float64, {len(calls32)}x in float32"
    for call32, call64 in zip(calls32, calls64, strict=True):
        if call32 is None:
            continue
        if call64 is None:
            return PORT_DEFECT, "no float64 twin"
        for a32, b32, a64, b64 in zip(*call32, *call64, strict=True):
            a32, b32, a64, b64 = (np.asarray(v, np.float64) for v in (a32, b32, a64, b64))
            for framework, v32, v64 in (("Flax", a32, a64), ("torch", b32, b64)):
                if not np.all(np.isfinite(v32) | ~np.isfinite(v64)):
                    return f"{PRECISION_LOSS} {framework}", "not finite in float32 where float64 is"
            slack = tolerance64 * float(np.max(np.abs(b64), initial=0.0))
            if not np.all(np.abs(a32 - b32) <= np.abs(a32 - a64) + np.abs(b32 - b64) + slack):
                return PORT_DEFECT, "beyond both frameworks' float32 errors"
    return ROUNDING, ""


def _own_errors(mode: str, t: Any, f: nnx.Module, inputs: dict[str, list[tuple]],
                skipped: list[str], layout: str) -> list[tuple[str, str, str, float, float, float, float]]:
    """Each leaf module's own float32 error in each framework, in ``mode``: the module (a copy: its statistics
    are not disturbed) run on torch's float64 input to it rounded to float32, in float32 and in float64, and
    the two results compared (relative to the largest float64 value), so that no upstream rounding counts.
    One entry per call: (mode, name, kinds, Flax's relative, torch's relative, Flax's absolute, torch's
    absolute error). ``t`` and ``f`` are the float64 copies of the pass."""
    import torch

    twins = dict(named_modules(f))
    modules = dict(t.named_modules())
    kinds = _kinds(t, f)
    device = recording.device_of(t)
    found = []
    for name, calls in inputs.items():
        if name not in twins:
            continue
        for args in calls:
            if not any(isinstance(a, np.ndarray) and np.issubdtype(a.dtype, np.floating) for a in args):
                continue
            args32 = [a.astype(np.float32) if isinstance(a, np.ndarray) and np.issubdtype(a.dtype, np.floating)
                      else a for a in args]
            args64 = [a.astype(np.float64) if isinstance(a, np.ndarray) and np.issubdtype(a.dtype, np.floating)
                      else a for a in args32]
            try:
                results = {}
                for dtype, values in (("float64", args64), ("float32", args32)):
                    module = copy.deepcopy(modules[name]).to(getattr(torch, dtype))
                    with torch.no_grad():
                        # copies: an in-place module (ReLU(inplace=True)) would write into the arrays
                        out = module(*[torch.from_numpy(a.copy()).to(device) if isinstance(a, np.ndarray) else a
                                       for a in values])
                    results["torch", dtype] = [_numpy(leaf) for leaf in _leaves(out)]
                    twin = _compute_in(cast_floating(nnx.clone(twins[name]), jnp.dtype(dtype)), jnp.dtype(dtype))
                    with jax.enable_x64(dtype == "float64"):  # float32 as a float32 run computes it
                        out = twin(*[_flax_input(a, layout) if isinstance(a, np.ndarray) else a for a in values])
                        results["flax", dtype] = [_numpy(leaf, layout) for leaf in _leaves(out)]
            except Exception:  # noqa: BLE001 - a twin with another signature: said in a note, not a verdict
                skipped.append(name)
                break
            flax_abs, flax_rel, _ = _errors(results["flax", "float32"], results["flax", "float64"])
            torch_abs, torch_rel, _ = _errors(results["torch", "float32"], results["torch", "float64"])
            found.append((mode, name, kinds.get(name, ""), flax_rel, torch_rel, flax_abs, torch_abs))
    return found


def _precision_rows(own: list[tuple[str, str, str, float, float, float, float]]) -> list[Row]:
    """A row for each (mode, layer) whose own float32 error, worst over its calls, is more than PRECISION_FACTOR
    times its twin's and above PRECISION_FLOOR (NaN counts as infinite)."""
    worst: dict[tuple[str, str], list] = {}
    for mode, name, kinds, flax_rel, torch_rel, flax_abs, torch_abs in own:
        flax_rel, torch_rel = (math.inf if math.isnan(e) else e for e in (flax_rel, torch_rel))
        entry = worst.setdefault((mode, name), [kinds, 0.0, 0.0, 0.0, 0.0])
        entry[1:] = [max(entry[1], flax_rel), max(entry[2], torch_rel), max(entry[3], flax_abs),
                     max(entry[4], torch_abs)]
    rows = []
    for (mode, name), (kinds, flax_rel, torch_rel, flax_abs, torch_abs) in worst.items():
        for framework, mine, theirs, mine_abs in (("Flax", flax_rel, torch_rel, flax_abs),
                                                  ("torch", torch_rel, flax_rel, torch_abs)):
            if mine > PRECISION_FLOOR and mine > PRECISION_FACTOR * theirs:
                ratio = f"{mine / theirs:.0f}x" if theirs > 0 else "the other's is 0"
                rows.append(Row(mode, _PRECISION, name, name, mine_abs, mine, PRECISION_FLOOR, kinds,
                                note=f"{framework}'s own float32 error; {'torch' if framework == 'Flax' else 'Flax'}'s "
                                f"{_number(theirs)}, {ratio}", classification=f"{PRECISION_LOSS} {framework}",
                                twin_rel_err=theirs))
    return rows
