"""The notebooks' training curves as PNG files (matplotlib's Agg canvas: no display, no global pyplot state)."""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from flax_resnet import files

__all__ = ["CURVE_PANELS", "PLAIN_COLOR", "RESNET_COLOR", "TARGET_ACCURACY", "comparison_figure", "curves_figure",
           "plot_comparison", "plot_history", "save_figure"]

# The accuracy a recipe's notebook asks for (notebook 004: "achieve >75% test accuracy").
TARGET_ACCURACY: dict[str, float] = {"resnet18-cifar": 75.0}
# notebook 000's colours: the plain network amber, the ResNet green
PLAIN_COLOR = "#f59e0b"
RESNET_COLOR = "#22c55e"
_STYLES = [("o", PLAIN_COLOR), ("s", RESNET_COLOR), ("^", "#3b82f6"), ("d", "#ef4444"), ("v", "#8b5cf6")]
# notebook 000's three panels: (history key, title, y label)
CURVE_PANELS = (("train_loss", "Training Loss", "Loss"), ("train_acc", "Training Accuracy", "Accuracy (%)"),
                ("test_acc", "Test Accuracy", "Accuracy (%)"))


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Write a PNG atomically, so a reader never sees half a PNG while training goes on. A figure without a
    layout engine gets ``tight_layout``; one made with ``layout='constrained'`` keeps it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    if fig.get_layout_engine() is None:
        fig.tight_layout()
    with files.atomic_path(path) as tmp:  # a failed write (a full disk) leaves the previous file and no partial one
        fig.savefig(tmp, format="png", dpi=100)
    return path


def curves_figure(curves: Sequence[tuple[str, Mapping[str, Sequence[float]], Mapping[str, Any]]],
                  panels: Sequence[tuple[str, str, str]] = CURVE_PANELS, title: str | None = None,
                  width: float = 5.0, height: float = 3.8, extra: int = 0) -> tuple[Figure, Any]:
    """Per-epoch curves, one panel per (history key, title, y label); ``curves`` are (label, history, style).
    ``extra`` empty panels are added on the right for the caller to draw in; returns the figure and all axes."""
    fig = Figure(figsize=(width * (len(panels) + extra), height))
    axes = fig.subplots(1, len(panels) + extra, squeeze=False)[0]
    for ax, (key, panel_title, ylabel) in zip(axes, panels, strict=False):
        for label, history, style in curves:
            values = history.get(key, [])
            ax.plot(range(1, len(values) + 1), values, label=label, **style)
        ax.set(xlabel="Epoch", ylabel=ylabel, title=panel_title)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return fig, axes


def comparison_figure(histories: Mapping[str, Mapping[str, Sequence[float]]]) -> Figure:
    """Notebook 000's figure: training loss, training accuracy and test accuracy of each run, side by side."""
    curves = [(label, history, {"marker": marker, "color": color})
              for (label, history), (marker, color) in zip(histories.items(), itertools.cycle(_STYLES))]
    return curves_figure(curves, height=4.0)[0]


def plot_comparison(histories: Mapping[str, Mapping[str, Sequence[float]]], path: str | Path) -> Path:
    """``comparison_figure`` written to ``path``."""
    return save_figure(comparison_figure(histories), path)


def plot_history(history: Mapping[str, Sequence[float]], path: str | Path, *, title: str | None = None,
                 target_accuracy: float | None = None, test_loss: bool = True) -> Path:
    """The curves of one run: notebook 004's loss and accuracy panels (train and test, with the recipe's target
    accuracy) if ``test_loss`` and the run has a test loss, else notebook 000's three panels."""
    if not test_loss or not history.get("test_loss"):
        return plot_comparison({title or "run": history}, path)
    curves = [(split.title(), {"loss": history[f"{split}_loss"], "acc": history[f"{split}_acc"]}, {})
              for split in ("train", "test")]
    panels = (("loss", "Loss Curves", "Loss"), ("acc", "Accuracy Curves", "Accuracy (%)"))
    fig, (_, ax_acc) = curves_figure(curves, panels, title, width=6.0, height=4.0)
    if target_accuracy is not None:
        ax_acc.axhline(y=target_accuracy, color="r", linestyle="--", label=f"Target ({target_accuracy:g}%)")
        ax_acc.legend(fontsize=8)
    return save_figure(fig, path)
