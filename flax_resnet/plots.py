"""The notebooks' training curves as PNG files (matplotlib's Agg canvas: no display, no global state).

- ``plot_history``: one run. Notebook 004's figure (loss curves train/test, accuracy curves train/test, with
  the 75% target line for the ResNet-18 recipe) when the run has a test loss worth showing, else notebook
  000's three panels (training loss, training accuracy, test accuracy).
- ``plot_comparison``: several runs in notebook 000's three panels (its plain-vs-residual figure).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = ["TARGET_ACCURACY", "plot_comparison", "plot_history", "save_figure"]

# The accuracy a recipe's notebook asks for (notebook 004: "achieve >75% test accuracy").
TARGET_ACCURACY: dict[str, float] = {"resnet18-cifar": 75.0}

# Notebook 000's colours and markers: plain network amber circles, ResNet green squares; then matplotlib's.
_STYLES = [("o-", "#f59e0b"), ("s-", "#22c55e"), ("^-", "#3b82f6"), ("d-", "#ef4444"), ("v-", "#8b5cf6")]


def save_figure(fig: Figure, path: str | Path, dpi: int = 100) -> Path:
    """Write a PNG atomically, so a reader never sees half a PNG while training goes on (matplotlib's Agg
    canvas: no display, no global pyplot state). A figure without a layout engine gets ``tight_layout``; one
    made with ``layout='constrained'`` keeps it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    FigureCanvasAgg(fig)
    if fig.get_layout_engine() is None:
        fig.tight_layout()
    try:
        fig.savefig(tmp, format="png", dpi=dpi)
        os.replace(tmp, path)
    finally:  # a failed write (a full disk) leaves the previous file and no partial one
        tmp.unlink(missing_ok=True)
    return path


def _epochs(values: Sequence[float]) -> range:
    return range(1, len(values) + 1)


def plot_history(history: Mapping[str, Sequence[float]], path: str | Path, *, title: str | None = None,
                 target_accuracy: float | None = None, test_loss: bool = True) -> Path:
    """The curves of one run; notebook 004's two panels if ``test_loss``, else notebook 000's three."""
    if not test_loss or not history.get("test_loss"):
        return plot_comparison({title or "run": history}, path)
    fig = Figure(figsize=(12, 4))
    ax_loss, ax_acc = fig.subplots(1, 2)
    epochs = _epochs(history["train_loss"])
    ax_loss.plot(epochs, history["train_loss"], label="Train")
    ax_loss.plot(epochs, history["test_loss"], label="Test")
    ax_loss.set(xlabel="Epoch", ylabel="Loss", title="Loss Curves")
    ax_acc.plot(epochs, history["train_acc"], label="Train")
    ax_acc.plot(epochs, history["test_acc"], label="Test")
    if target_accuracy is not None:
        ax_acc.axhline(y=target_accuracy, color="r", linestyle="--", label=f"Target ({target_accuracy:g}%)")
    ax_acc.set(xlabel="Epoch", ylabel="Accuracy (%)", title="Accuracy Curves")
    for ax in (ax_loss, ax_acc):
        ax.legend()
        ax.grid(True, alpha=0.3)
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def plot_comparison(histories: Mapping[str, Mapping[str, Sequence[float]]], path: str | Path) -> Path:
    """Notebook 000's figure: training loss, training accuracy and test accuracy of each run, side by side."""
    fig = Figure(figsize=(15, 4))
    axes = fig.subplots(1, 3)
    panels = [("train_loss", "Training Loss", "Training Loss"), ("train_acc", "Accuracy (%)", "Training Accuracy"),
              ("test_acc", "Accuracy (%)", "Test Accuracy")]
    for i, (label, history) in enumerate(histories.items()):
        marker, color = _STYLES[i % len(_STYLES)]
        for ax, (key, _, _) in zip(axes, panels, strict=True):
            ax.plot(_epochs(history[key]), history[key], marker, label=label, color=color)
    for ax, (_, ylabel, title) in zip(axes, panels, strict=True):
        ax.set(xlabel="Epoch", ylabel=ylabel, title=title)
        ax.legend()
        ax.grid(True, alpha=0.3)
    return save_figure(fig, path)
