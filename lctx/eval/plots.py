"""PNG plots of an evaluation: perplexity against length, passkey accuracy, needle heatmap."""

from __future__ import annotations

import os
from typing import Mapping, Sequence

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on CI or TPU hosts
    import matplotlib.pyplot as plt

    return plt


def _against_length(plt, curves: Mapping[str, Mapping[int, float]],
                    training_lengths: Sequence[int], *, label_training: bool):
    """A figure with one line per curve {label: {length: value}} on a log-2 length axis
    and the training lengths dashed; returns (fig, ax) for the caller to finish."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, by_length in curves.items():
        xs = sorted(by_length)
        ax.plot(xs, [by_length[x] for x in xs], marker="o", label=label)
    for n in sorted(set(training_lengths)):
        ax.axvline(n, color="grey", linestyle="--", linewidth=1)
        if label_training:
            ax.text(n, 1.0, f" train {n}", transform=ax.get_xaxis_transform(), va="top",
                    fontsize=8, color="grey")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context length (tokens)")
    return fig, ax


def _save(plt, fig, path: str) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_perplexity(curves: Mapping[str, Mapping[int, float]], path: str, *,
                    training_lengths: Sequence[int] = (), ylabel: str = "perplexity") -> str:
    """One line per curve {label: {length: ppl}}, log-2 x axis, training lengths dashed."""
    plt = _pyplot()
    fig, ax = _against_length(plt, curves, training_lengths, label_training=True)
    ax.set_yscale("log")
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)
    if len(curves) > 1 or any(curves):
        ax.legend(fontsize=8)
    return _save(plt, fig, path)


def plot_accuracy(curves: Mapping[str, Mapping[int, float]], path: str, *,
                  training_lengths: Sequence[int] = (), title: str = "passkey retrieval") -> str:
    """Accuracy (0-1) against length, one line per curve."""
    plt = _pyplot()
    fig, ax = _against_length(plt, curves, training_lengths, label_training=False)
    ax.set_ylim(-0.05, 1.05)
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return _save(plt, fig, path)


def plot_heatmap(grid: Mapping[int, Mapping[float, float]], path: str, *,
                 title: str = "needle in a haystack") -> str:
    """grid {length: {depth: accuracy}}: length on x, depth (%) on y, red (0) to green (1);
    cells without a value (lengths skipped) are grey."""
    plt = _pyplot()
    lengths = sorted(grid)
    depths = sorted({d for row in grid.values() for d in row})
    values = np.full((len(depths), len(lengths)), np.nan)
    for j, n in enumerate(lengths):
        for i, d in enumerate(depths):
            if d in grid[n]:
                values[i, j] = grid[n][d]
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(lengths), 1.2 + 0.45 * len(depths)))
    import matplotlib

    cmap = matplotlib.colormaps["RdYlGn"].with_extremes(bad="lightgrey")
    image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, vmin=0.0, vmax=1.0,
                      aspect="auto", interpolation="nearest")
    ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{100 * d:.0f}%" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="accuracy")
    return _save(plt, fig, path)


def ensure_dir(path: str) -> str:
    os.makedirs(path, exist_ok=True)
    return path
