"""Why a parity report says DIFFERENT: the known traps of a PyTorch -> Flax port, each named only when
recomputing confirms it.

``diagnose`` runs only for a report that fails (an exact port pays nothing). It never guesses from a module's
settings alone: each trap is a hypothesis that must reproduce the Flax numbers from torch's, to within the report's
tolerance and at least 20 times closer than Flax's numbers are to torch's own (so that rounding on an exact port
cannot pass for a trap). What it recomputes:

- weights (no pass needed): a square linear kernel left in torch's (out, in) layout (Flax's equals torch's
  transposed); a layer still holding its own initialisation (its weight unrelated to torch's, correlation below
  0.5, while other layers equal torch's); an init variance off by the truncation factor (standard deviation ratio
  Flax/torch ~0.8796 and nothing beyond 2 of torch's standard deviations).
- layer by layer, each divergent layer fed torch's own input of that layer (so upstream differences do not count):
  a conv at stride 2 that pads as 'SAME' (torch's conv recomputed with Flax's asymmetric padding gives Flax's
  output), a linear layer computing x @ W for torch's x @ W.T, a normalisation layer with another epsilon (torch's
  layer recomputed with Flax's ``epsilon``), an approximate (tanh) GELU where torch's is exact.
- at the first divergent layer, when that layer computes as torch's does on torch's input but receives another
  input: the input flattened in (H, W, C) order, or passed through the tanh GELU.
- after the train-mode pass, BatchNorm running statistics: the batch statistic each framework put in is recomputed
  from the statistic before and after (``running_statistic``, also for the training-step report).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flax_resnet.parity import recording
from flax_resnet.port import named_modules, to_numpy_state_dict

__all__ = ["TRUNCATED_NORMAL_STD", "diagnose", "running_statistic"]

# The standard deviation of a unit normal truncated to [-2, 2] (sqrt(1 - 4 phi(2) / (2 Phi(2) - 1))):
# jax.nn.initializers.truncated_normal(stddev) draws stddev times such a variable, so its values have 0.8796 of
# stddev (variance 0.774); variance_scaling(..., 'truncated_normal') divides by this constant to correct it.
TRUNCATED_NORMAL_STD = 0.87962566103423978

_FIT = 0.05  # a hypothesis must come 20x closer to Flax's numbers than torch's own numbers are
_SIGMAS = 4.0  # sampling bound of the init check: 4 standard errors, missed or misread once in ~16,000 tensors
_UNRELATED = 0.5  # correlation below which a weight is another draw, not torch's weight with an error
_LOCAL_LAYERS = 16  # divergent layers recomputed per mode: a fault shows in its first layers, and each costs a call
_GROUP = 3  # a trap found at more layers than this is one line that lists them

# (torch model copy, Flax model copy) in the report's dtype, fresh, in the given mode ("eval", "train"; "": as is)
Copies = Callable[[str], tuple[Any, nnx.Module]]


@dataclasses.dataclass(frozen=True)
class _Finding:
    trap: str
    where: str  # torch name of the layer (or tensor)
    text: str  # the whole line


# ------------------------------------------------------------------------------------------------ entry
def diagnose(report: Any, x: np.ndarray, flax_x: Any, copies: Copies) -> list[str]:
    """The known traps that explain ``report``'s differences, one line each ([] when none fits).

    ``report``: a ``ParityReport`` (its rows, modes, forward order, dtype and tolerance are read). ``x``: the batch
    torch got; ``flax_x``: the same batch as Flax got it. ``copies(mode)``: fresh copies of both models as
    ``compare`` ran them, in that mode. Runs each mode that has a divergent output or running statistic once more
    with hooks; the originals are never touched.
    """
    tol = report.tolerance.values
    failing = [row for row in report.rows if not row.ok]
    findings: list[_Finding] = []
    weights_off = {row.layer for row in failing if row.section == "weights"}
    transposed: set[str] = set()
    passes = []
    for mode in report.modes:
        outputs = [row for row in failing if row.mode == mode and row.section == "outputs" and row.layer]
        stats = [row for row in failing if row.mode == mode and row.section == "running statistics"]
        if outputs or stats:
            passes.append((mode, outputs, stats))
    # Copying a model costs as much as a pass (ResNet-18 in float64): the weights are read from the first pass's
    # copies, before that pass (which moves only BatchNorm statistics).
    if not (passes or weights_off):
        return []  # gradients alone: no trap here is read from them
    models = copies(passes[0][0] if passes else "")
    if weights_off:
        findings += _weight_findings(report, *models, tol, transposed)
    for mode, outputs, stats in passes:
        findings += _pass_findings(report, outputs, stats, weights_off - transposed, transposed, x, flax_x,
                                   models if mode == passes[0][0] else copies(mode), tol)
    return _lines(findings)


def _lines(findings: list[_Finding]) -> list[str]:
    """One line per (trap, layer), in the order found; a trap at many layers as one line listing them."""
    unique: dict[tuple[str, str], _Finding] = {}
    for finding in findings:
        unique.setdefault((finding.trap, finding.where), finding)
    by_trap: dict[str, list[_Finding]] = {}
    for finding in unique.values():
        by_trap.setdefault(finding.trap, []).append(finding)
    lines = []
    for group in by_trap.values():
        if len(group) > _GROUP:
            others = [finding.where for finding in group[1:]]
            lines.append(f"{group[0].text} [the same at {len(others)} more: {', '.join(others[:8])}"
                         f"{', ...' if len(others) > 8 else ''}]")
        else:
            lines += [finding.text for finding in group]
    return lines


# -------------------------------------------------------------------------------------------- measures
def _rel(a: Any, b: Any) -> float:
    """max|a - b| / max|b|, as the report measures (inf when the shapes differ)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        return math.inf
    if a.size == 0:
        return 0.0
    diff, scale = float(np.max(np.abs(a - b))), float(np.max(np.abs(b)))
    return diff / scale if scale > 0 else diff


def _fits(error: float, null: float, tol: float) -> bool:
    """A hypothesis reproduces Flax's numbers: within the tolerance and 20x closer than torch's own numbers are."""
    return error <= tol and error <= _FIT * null


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel() - a.mean(), b.ravel() - b.mean()
    norm = float(np.linalg.norm(a) * np.linalg.norm(b))
    return float(a @ b) / norm if norm > 0 else 0.0


# --------------------------------------------------------------------------------------------- weights
def _weight_findings(report: Any, t: Any, f: nnx.Module, tol: float, transposed: set[str]) -> list[_Finding]:
    """Transposed linear kernels, layers left with their own initialisation, truncated-normal init variance."""
    torch_state = {key: value.detach().cpu().numpy() for key, value in t.state_dict().items()}
    flax_state = to_numpy_state_dict(f)
    by_layer: dict[str, list[Any]] = {}
    for row in report.rows:
        if row.section == "weights":
            by_layer.setdefault(row.layer, []).append(row)
    equal = [layer for layer, rows in by_layer.items() if all(row.ok for row in rows)]
    findings, unrelated = [], {}
    for row in (row for rows in by_layer.values() for row in rows if not row.ok):
        a, b = flax_state.get(row.name), torch_state.get(row.name)
        if a is None or b is None or a.shape != b.shape or not np.issubdtype(b.dtype, np.floating) or b.size < 2:
            continue
        a, b = a.astype(np.float64), b.astype(np.float64)
        if a.ndim == 2 and a.shape[0] == a.shape[1] and _rel(a, b.T) <= tol:
            transposed.add(row.layer)
            findings.append(_Finding("transposed", row.layer, (
                f"{row.layer}: linear kernel not transposed: the Flax kernel holds torch's (out, in) weight as it "
                f"is (read in torch's layout it equals torch's weight.T to {_rel(a, b.T):.1e}), so Flax computes "
                f"x @ W where torch computes x @ W.T: port it with flax_resnet.port.load_torch_state_dict, which "
                "transposes")))
            continue
        if not row.name.endswith(".weight") or _rel(a, b) <= 0.1:
            continue
        corr = _corr(a, b)
        if abs(corr) >= _UNRELATED:
            continue
        unrelated[row.layer] = (corr, _rel(a, b))
        truncation = _truncation(a, b)
        if truncation is not None:
            ratio, bound = truncation
            findings.append(_Finding("truncation", row.name, (
                f"{row.name}: init variance off by the truncation factor: standard deviation Flax/torch {ratio:.4f} "
                f"(n = {a.size}; sampling bound +-{bound:.3f} at {_SIGMAS:g} standard errors) where a unit normal "
                f"cut at +-2 has {TRUNCATED_NORMAL_STD:.4f}, and no Flax value lies beyond 2 of torch's standard "
                "deviations: Flax draws a truncated normal without dividing by 0.8796 "
                "(jax.nn.initializers.truncated_normal(stddev)); torch's kaiming_normal_ is untruncated: draw "
                "variance_scaling(scale, mode, 'normal') (or port the weights)")))
    if unrelated and equal:
        for layer, (corr, err) in unrelated.items():
            findings.append(_Finding("unported", layer, (
                f"{layer}: still holds its own initialisation: its weight is unrelated to torch's (correlation "
                f"{corr:.2f}, relative error {err:.2g}) while {len(equal)} other layers' weights equal torch's: "
                "port it (flax_resnet.port.load_torch_state_dict(flax_model, torch_model.state_dict()))")))
    elif unrelated:
        findings.append(_Finding("unported", "", (
            f"no layer holds torch's weights: {len(unrelated)} layers' weights are unrelated to torch's (correlation "
            f"below {_UNRELATED:g}): the Flax model still holds its own initialisation: port the weights "
            "(flax_resnet.port.load_torch_state_dict(flax_model, torch_model.state_dict())) or pass "
            "port_weights=True")))
    return findings


def _truncation(a: np.ndarray, b: np.ndarray) -> tuple[float, float] | None:
    """(std ratio a/b, its sampling bound) when ``a`` looks like ``b``'s distribution drawn as a truncated normal
    whose standard deviation was not corrected; None otherwise or when the tensors are too small to tell.

    The standard error of a sample standard deviation is s * sqrt((kurtosis - 1) / (4 n)) (1/sqrt(2 n) for a
    normal; the empirical kurtosis is used, as a truncated normal has 2.37 and a uniform 1.8); that of the log of
    the ratio of two independent ones adds in quadrature. Decided only where 4 of them stay below half the
    distance from log 0.8796 to log 1 (0.064): from about 3,300 values per tensor (a normal against a truncated
    normal: standard error sqrt(0.84 / n))."""
    a, b = a.ravel(), b.ravel()
    sa, sb = float(a.std()), float(b.std())
    if sa == 0 or sb == 0:
        return None

    def excess(v: np.ndarray, s: float) -> float:
        return max(float(np.mean(((v - v.mean()) / s) ** 4)) - 1.0, 0.0)

    se = math.sqrt(excess(a, sa) / (4 * a.size) + excess(b, sb) / (4 * b.size))
    bound = _SIGMAS * se
    if bound > abs(math.log(TRUNCATED_NORMAL_STD)) / 2:
        return None
    ratio = sa / sb
    if abs(math.log(ratio / TRUNCATED_NORMAL_STD)) > bound:
        return None
    if float(np.max(np.abs(a - a.mean()))) > 2 * sb * math.exp(bound):  # a truncated draw has nothing beyond 2 std
        return None
    return ratio, TRUNCATED_NORMAL_STD * (math.exp(bound) - 1)


# ----------------------------------------------------------------------------------- running statistics
@dataclasses.dataclass(frozen=True)
class _StatisticFit:
    biased: bool  # Flax stored the biased batch variance
    weight: float  # the weight Flax gave the batch statistic (torch: its momentum)
    error: float  # relative error of the hypothesis


def _fit_statistic(key: str, before: Any, torch_after: Any, flax_after: Any, n: int, momentum: float,
                   tolerance: float | None = None) -> _StatisticFit | None:
    before, t, f = (np.asarray(a) for a in (before, torch_after, flax_after))
    if tolerance is None:  # a thousand units of roundoff of the arrays' dtype: 2e-13 in float64, 1e-4 in float32
        tolerance = 1000 * float(np.finfo(np.result_type(t.dtype, np.float32)).eps)
    before, t, f = (a.astype(np.float64) for a in (before, t, f))
    if before.shape != t.shape or t.shape != f.shape or not 0 < momentum <= 1:
        return None
    null = _rel(f, t)
    if not math.isfinite(null) or null == 0:
        return None
    scale = float(np.max(np.abs(t))) or 1.0
    batch = (t - (1 - momentum) * before) / momentum  # the batch statistic torch put in
    candidates = []
    statistics = [(False, batch)]
    if key.endswith("running_var") and n > 1:
        statistics.append((True, batch * (n - 1) / n))
    for biased, statistic in statistics:
        weights = [momentum]
        step = statistic - before
        if float(np.sum(step * step)) > 0:
            weights.append(float(np.sum((f - before) * step) / np.sum(step * step)))  # least squares
        for weight in weights:
            if not 0 < weight <= 1 or (not biased and weight == momentum):
                continue  # no weight, or torch's own update
            if weight != momentum and abs(weight - momentum) <= 0.1 * momentum:
                continue  # torch's momentum after all: only the fixed hypothesis speaks for it
            error = float(np.max(np.abs((1 - weight) * before + weight * statistic - f))) / scale
            if _fits(error, null, tolerance):
                candidates.append(_StatisticFit(biased, weight, error))
    # the simplest explanation first: torch's momentum with the biased variance, then another momentum alone
    preferred = sorted(candidates, key=lambda fit: (fit.weight != momentum, fit.biased, fit.error))
    return preferred[0] if preferred else None


def _statistic_texts(keys: str, fit: _StatisticFit, n: int, momentum: float) -> list[tuple[str, str]]:
    """(trap, line) for each trap in ``fit``."""
    texts = []
    if fit.biased:
        texts.append(("biased variance", (
            f"{keys}: running variance off by n/(n-1): Flax stores the biased batch variance where torch stores the "
            f"unbiased one (x {n}/{n - 1} at {n} values per channel; recomputed from the update, to {fit.error:.1e}): "
            f"use flax_resnet.layers.BatchNorm2d, which stores torch's")))
    if fit.weight != momentum:
        other = abs(fit.weight - (1 - momentum)) <= 0.01
        what = "the other momentum convention" if other else "another momentum"
        texts.append(("momentum", (
            f"{keys}: running statistics updated with {what}: Flax weights the batch by {fit.weight:.3g} (Flax "
            f"momentum={1 - fit.weight:.3g}), torch by {momentum:g} (recomputed from the update, to {fit.error:.1e}); "
            f"Flax's momentum weights the old average, torch's the new batch: give nnx.BatchNorm momentum="
            f"{1 - momentum:g} (Flax's convention) or flax_resnet.layers.BatchNorm2d momentum={momentum:g} "
            "(torch's)")))
    return texts


def running_statistic(key: str, before: Any, torch_after: Any, flax_after: Any, n: int, momentum: float = 0.1,
                      *, tolerance: float | None = None) -> str | None:
    """Which known trap explains a BatchNorm running statistic ``key`` ('bn1.running_var') that differs after an
    update, or None.

    ``before``: the statistic before the pass (both frameworks'); ``torch_after`` / ``flax_after``: after it; ``n``:
    values per channel in the batch at that layer; ``momentum``: torch's. The batch statistic torch put in is
    recomputed from its update, (after - (1 - m) before) / m; Flax's value is then checked against (a) that
    statistic times (n-1)/n (Flax stores the biased variance: n/(n-1) off) and (b) an update with another weight,
    fitted by least squares (Flax's momentum weights the old average: torch's 0.1 is Flax's 0.9). A fit must come
    20x closer to Flax's value than torch's value is, and within ``tolerance`` (relative to max|torch_after|;
    default a thousand units of roundoff of the arrays' dtype, 2e-13 in float64 and 1e-4 in float32).
    """
    fit = _fit_statistic(key, before, torch_after, flax_after, n, momentum, tolerance)
    if fit is None:
        return None
    return "; ".join(text for _, text in _statistic_texts(key, fit, n, momentum))


# --------------------------------------------------------------------------------------------- a pass
def _torch_pass(t: Any, x: np.ndarray, names: set[str]) -> dict[str, dict]:
    """The first call's input and output of each module in ``names``, and how often each was called."""
    import torch

    records: dict[str, dict] = {name: {"calls": 0} for name in names}

    def before(name: str):
        def hook(module, args):
            record = records[name]
            record["calls"] += 1
            if record["calls"] == 1 and args and isinstance(args[0], torch.Tensor):
                record["input"] = args[0].detach().cpu().numpy().copy()  # before an in-place op changes it
        return hook

    def after(name: str):
        def hook(module, args, output):
            if "output" not in records[name] and isinstance(output, torch.Tensor):
                records[name]["output"] = output.detach().cpu().numpy().copy()
        return hook

    modules = dict(t.named_modules())
    handles = []
    for name in names:
        handles += [modules[name].register_forward_pre_hook(before(name)),
                    modules[name].register_forward_hook(after(name))]
    try:
        with torch.no_grad():
            t(torch.from_numpy(x).to(recording.device_of(t)))
    finally:
        for handle in handles:
            handle.remove()
    return records


def _flax_pass(f: nnx.Module, flax_x: Any, names: set[str]) -> dict[str, dict]:
    modules = dict(named_modules(f))
    chosen = [(name, modules[name]) for name in names if name in modules]
    records: dict[str, dict] = {name: {} for name, _ in chosen}

    def keep(record: dict) -> recording.Callback:
        def first_call(args: tuple, out: Any) -> None:
            if "output" not in record:
                record.update(input=np.asarray(args[0]) if args else None, output=np.asarray(out))
        return first_call

    with recording.watching_flax([(module, keep(records[name])) for name, module in chosen]):
        f(flax_x)
    return records


def _pass_findings(report: Any, outputs: list[Any], stats: list[Any], weights_off: set[str], transposed: set[str],
                   x: np.ndarray, flax_x: Any, models: tuple[Any, nnx.Module], tol: float) -> list[_Finding]:
    """Run fresh copies in one mode again with hooks: running statistics, divergent layers recomputed, the first
    one's input."""
    t, f = models
    torch_modules, flax_modules = dict(t.named_modules()), dict(named_modules(f))
    position = report.forward_order
    divergent = sorted({row.layer for row in outputs if row.layer in torch_modules},
                       key=lambda name: position.get(name, math.inf))
    local = [name for name in divergent if name in flax_modules and name not in weights_off
             and _kind(torch_modules[name]) is not None][:_LOCAL_LAYERS]
    first = divergent[0] if divergent and divergent[0] not in weights_off else None
    earlier = [] if first is None else sorted((name for name in position if name in torch_modules
                                               and position[name] < position.get(first, -1)),
                                              key=position.get)[-3:]
    stat_layers = {row.layer for row in stats if row.layer in torch_modules and row.layer not in weights_off}
    before = {key: value.detach().cpu().numpy().copy() for key, value in t.state_dict().items()
              if key.rsplit(".", 1)[0] in stat_layers}

    torch_records = _torch_pass(t, x, set(local) | stat_layers | set(earlier) | ({first} if first else set()))
    flax_records = _flax_pass(f, flax_x, {first} if first else set())
    findings: list[_Finding] = []
    if stat_layers:
        torch_after = {key: value.detach().cpu().numpy() for key, value in t.state_dict().items()}
        findings += _statistic_findings(stats, stat_layers, torch_modules, torch_records, before, torch_after,
                                        to_numpy_state_dict(f), tol)
    agrees: dict[str, bool] = {}
    for name in local:
        record = torch_records[name]
        if "input" not in record or "output" not in record:
            continue
        try:
            agree, found = _local_findings(name, torch_modules[name], flax_modules[name], record, tol,
                                           name in transposed)
        except (RuntimeError, TypeError, ValueError):  # a layer that cannot be called alone: nothing to say
            continue
        agrees[name] = agree
        findings += found
    if first is not None and agrees.get(first, True) and first in flax_modules:
        try:
            findings += _input_findings(first, torch_modules, torch_records, flax_records.get(first, {}), earlier,
                                        tol)
        except (RuntimeError, TypeError, ValueError):
            pass
    return findings


def _statistic_findings(stats: list[Any], layers: set[str], torch_modules: dict, torch_records: dict,
                        before: dict, torch_after: dict, flax_after: dict, tol: float) -> list[_Finding]:
    findings = []
    for layer in sorted(layers):
        module, record = torch_modules[layer], torch_records.get(layer, {})
        momentum = getattr(module, "momentum", None)
        shape = getattr(record.get("input"), "shape", None)
        if momentum is None or record.get("calls") != 1 or shape is None or len(shape) < 2:
            continue  # a cumulative average, or several updates in one pass: not the one-update arithmetic
        n = int(np.prod(shape)) // int(shape[1])
        by_trap: dict[str, list[tuple[str, _StatisticFit]]] = {}  # running_mean and running_var: one line a trap
        for key in sorted({row.name for row in stats if row.layer == layer}):
            if key.endswith(("running_mean", "running_var")) and key in flax_after and key in before:
                fit = _fit_statistic(key, before[key], torch_after[key], flax_after[key], n, momentum, tol)
                if fit is not None:
                    for trap, _ in _statistic_texts(key, fit, n, momentum):
                        by_trap.setdefault(trap, []).append((key, fit))
        for trap, fits in by_trap.items():
            keys = ", ".join(key for key, _ in fits)
            text = dict(_statistic_texts(keys, fits[0][1], n, momentum))[trap]
            findings.append(_Finding(trap, layer, text))
    return findings


# ------------------------------------------------------------------------------------------- one layer
def _kind(module: Any) -> str | None:
    """The kind of layer that is recomputed alone, or None."""
    import torch

    if isinstance(module, torch.nn.modules.conv._ConvNd) and not module.transposed:
        return "conv"
    if isinstance(module, torch.nn.Linear):
        return "linear"
    if isinstance(module, torch.nn.GELU):
        return "gelu"
    if isinstance(getattr(module, "eps", None), float):
        return "norm"
    return None


def _channels_first(module: Any) -> bool:
    """Whether torch's layout of this layer's 3-D/4-D tensors has the channels second (conv, norm, pooling) where
    Flax has them last; a linear layer, LayerNorm or embedding works on the last axis in both. Elementwise layers
    are laid out as their neighbours: 4-D is an image batch."""
    import torch

    if isinstance(module, torch.nn.Linear | torch.nn.LayerNorm | torch.nn.Embedding):
        return False
    pooling = torch.nn.modules.pooling
    return isinstance(module, torch.nn.modules.conv._ConvNd | torch.nn.modules.batchnorm._NormBase
                      | torch.nn.GroupNorm | pooling._MaxPoolNd | pooling._AvgPoolNd | pooling._AdaptiveAvgPoolNd
                      | pooling._AdaptiveMaxPoolNd)


def _to_flax(module: Any, a: np.ndarray) -> np.ndarray:
    if a.ndim == 4 or (a.ndim == 3 and _channels_first(module)):
        return np.moveaxis(a, 1, -1)
    return a


def _to_torch(module: Any, a: np.ndarray) -> np.ndarray:
    if a.ndim == 4 or (a.ndim == 3 and _channels_first(module)):
        return np.moveaxis(a, -1, 1)
    return a


def _torch_call(module: Any, a: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return module(torch.from_numpy(np.ascontiguousarray(a)).to(recording.device_of(module))).detach().cpu().numpy()


def _local_findings(name: str, tm: Any, fm: nnx.Module, record: dict, tol: float,
                    transposed: bool) -> tuple[bool, list[_Finding]]:
    """Layer ``name`` of both frameworks on torch's own input of it: (whether they agree, the traps that explain
    Flax's output when they do not)."""
    import torch
    import torch.nn.functional as F  # noqa: N812 - torch's own abbreviation

    x_t, y_t = record["input"], record["output"]
    y_f = _to_torch(tm, np.asarray(fm(jnp.asarray(_to_flax(tm, x_t)))))
    null = _rel(y_f, y_t)
    if null <= tol and not transposed:
        return True, []
    kind, findings = _kind(tm), []
    if kind == "conv" and isinstance(tm.padding, tuple) and tm.padding_mode == "zeros" and max(tm.stride) > 1:
        spatial = x_t.shape[2:]
        window = [(k - 1) * d + 1 for k, d in zip(tm.kernel_size, tm.dilation, strict=True)]
        pads = [tuple(p) for p in jax.lax.padtype_to_pads(spatial, window, tm.stride, "SAME")]
        if any(pad != (p, p) for pad, p in zip(pads, tm.padding, strict=True)):
            shifted = copy.deepcopy(tm)
            shifted.padding = (0,) * len(pads)
            padded = F.pad(torch.from_numpy(x_t), [side for pad in reversed(pads) for side in pad]).numpy()
            error = _rel(y_f, _torch_call(shifted, padded))
            if _fits(error, null, tol):
                stride = tm.stride[0] if len(set(tm.stride)) == 1 else tm.stride
                torch_pads = tuple((p, p) for p in tm.padding)
                findings.append(_Finding("same padding", name, (
                    f"{name}: output shifted by one pixel at stride {stride}: Flax pads {tuple(pads)} ('SAME' on a "
                    f"{'x'.join(map(str, spatial))} input) where torch's padding={tm.padding[0]} pads "
                    f"{torch_pads}; torch's conv recomputed with Flax's padding gives Flax's output (to "
                    f"{error:.1e}): give the Flax conv padding={torch_pads}")))
    elif kind == "linear" and tm.weight.shape[0] == tm.weight.shape[1]:
        weight = tm.weight.detach().cpu()
        with torch.no_grad():
            bias = None if tm.bias is None else tm.bias.detach().cpu()
            plain = F.linear(torch.from_numpy(x_t), weight.T, bias).numpy()  # x @ W (+ b)
        error = _rel(y_f, plain)
        if _fits(error, null, tol):
            findings.append(_Finding("transposed", name, (
                f"{name}: linear kernel not transposed: the Flax output is x @ W (+ b) with torch's weight W as "
                f"it is (to {error:.1e}), torch computes x @ W.T: store W.T as the kernel (flax_resnet.port."
                "load_torch_state_dict transposes)")))
    elif kind == "norm" and isinstance(getattr(fm, "epsilon", None), float) and fm.epsilon != tm.eps:
        other = copy.deepcopy(tm)
        other.eps = fm.epsilon
        error = _rel(y_f, _torch_call(other, x_t))
        if _fits(error, null, tol):
            findings.append(_Finding("epsilon", name, (
                f"{name}: epsilon mismatch: the Flax layer has epsilon={fm.epsilon:g}, torch's eps={tm.eps:g}; "
                f"torch's layer recomputed with epsilon={fm.epsilon:g} gives Flax's output (to {error:.1e}): give "
                f"the Flax {type(fm).__name__} epsilon={tm.eps:g}")))
    elif kind == "gelu" and tm.approximate == "none":
        error = _rel(y_f, F.gelu(torch.from_numpy(x_t), approximate="tanh").numpy())
        if _fits(error, null, tol):
            findings.append(_Finding("gelu", name, _gelu_text(name, error)))
    return False, findings


def _gelu_text(where: str, error: float) -> str:
    return (f"{where}: approximate GELU: Flax computes the tanh approximation (jax.nn.gelu's and nnx.gelu's "
            f"default, approximate=True) where torch's GELU is the exact erf form; the tanh form of torch's input "
            f"gives Flax's values (to {error:.1e}): use jax.nn.gelu(x, approximate=False)")


def _input_findings(first: str, torch_modules: dict, torch_records: dict, flax_record: dict, earlier: list[str],
                    tol: float) -> list[_Finding]:
    """The first divergent layer computes as torch's does but receives another input: a flatten in (H, W, C)
    order, or the tanh GELU, between it and the modules before it."""
    import torch
    import torch.nn.functional as F  # noqa: N812 - torch's own abbreviation

    tm, record = torch_modules[first], torch_records[first]
    if "input" not in record or flax_record.get("input") is None or "output" not in flax_record:
        return []
    x_t = record["input"]
    x_f = _to_torch(tm, flax_record["input"])
    null_in = _rel(x_f, x_t)
    if null_in <= tol or x_f.shape != x_t.shape:
        return []
    sources = [torch_records[name][key] for name in reversed(earlier) for key in ("output", "input")
               if key in torch_records.get(name, {})]
    findings = []
    if isinstance(tm, torch.nn.Linear) and x_t.ndim == 2:
        y_f, y_t = _to_torch(tm, flax_record["output"]), record["output"]
        null_out = _rel(y_f, y_t)
        features = x_t.shape[1]
        shapes = [tuple(s.shape[1:]) for s in sources if s.ndim == 4 and int(np.prod(s.shape[1:])) == features]
        for c, h, w in dict.fromkeys(shapes):
            permuted = x_t.reshape(-1, c, h, w).transpose(0, 2, 3, 1).reshape(x_t.shape)
            error = _rel(y_f, _torch_call(tm, permuted))
            if _fits(error, null_out, tol):
                findings.append(_Finding("flatten", first, (
                    f"{first}: its input is flattened in (H, W, C) order where torch flattens (C, H, W) (C, H, W = "
                    f"{c}, {h}, {w}): torch's {first} on its input permuted that way gives Flax's output (to "
                    f"{error:.1e}): transpose the NHWC map to NCHW before the reshape (x.transpose(0, 3, 1, "
                    "2).reshape(x.shape[0], -1))")))
                break
    for source in sources:
        if source.shape != x_t.shape:
            continue
        exact = F.gelu(torch.from_numpy(source)).numpy()
        if _rel(exact, x_t) > tol:
            continue  # torch did not apply an exact GELU to this
        error = _rel(x_f, F.gelu(torch.from_numpy(source), approximate="tanh").numpy())
        if _fits(error, null_in, tol):
            findings.append(_Finding("gelu", first, _gelu_text(f"{first} (its input)", error)))
            break
    return findings
