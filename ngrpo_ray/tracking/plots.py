"""PNG plots of a run's curves (saved as files and MLflow artifacts). Uses matplotlib's Agg backend: no display."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

Series = Sequence[tuple[float, float]]  # (x, y) points


def save_figure(fig, path: str | Path) -> Path:
    """Lay out, write the PNG (creating its folder), and free the figure."""
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def line_plot(path: str | Path, title: str, series: Mapping[str, Series], xlabel: str = "iteration",
              ylabel: str = "", bands: Mapping[str, Sequence[tuple[float, float, float]]] | None = None) -> Path:
    """One panel, one line per series; `bands` adds (x, low, high) shaded intervals for a series of the same name."""
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    for name, points in series.items():
        if not points:
            continue
        xs, ys = zip(*points)
        ax.plot(xs, ys, marker="o", markersize=3, label=name)
        if bands and name in bands and bands[name]:
            bx, lo, hi = zip(*bands[name])
            ax.fill_between(bx, lo, hi, alpha=0.2)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend()
    return save_figure(fig, path)


def stacked_bars(path: str | Path, title: str, parts: Mapping[str, Sequence[float]], xlabel: str = "iteration",
                 ylabel: str = "seconds") -> Path:
    """Stacked bars per x (e.g. the generation/reward/train/sync timing breakdown per iteration)."""
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    bottom = None
    for name, values in parts.items():
        xs = list(range(1, len(values) + 1))
        ax.bar(xs, values, bottom=bottom, label=name)
        bottom = list(values) if bottom is None else [b + v for b, v in zip(bottom, values)]
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend()
    return save_figure(fig, path)
