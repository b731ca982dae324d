"""Matplotlib plots of suite results (Agg backend: no display needed): accuracy by length, and by length x depth."""

from __future__ import annotations

import os
from typing import Any

from .tasks import parse_lengths

__all__ = ["plot_files", "plot_results"]


def plot_files(tasks) -> list[str]:
    """The names of the files :func:`plot_results` writes for ``tasks``."""
    return ["accuracy_by_length.png"] + [f"depth_{task}.png" for task in tasks]


def plot_results(results: dict[str, Any], output_dir: str) -> list[str]:
    """Write ``accuracy_by_length.png`` (one line per task) and ``depth_<task>.png`` (a depth x length heat map per
    task) into ``output_dir``; returns the paths written."""
    try:
        import matplotlib
    except ImportError as err:  # matplotlib is in the `eval` extra
        raise ImportError(
            "plots need matplotlib: pip install 'hope-hf[eval]' (or pass plots=False / --no_plots)") from err
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    os.makedirs(output_dir, exist_ok=True)
    written = []
    fig, ax = plt.subplots(figsize=(6, 4))
    for task, res in results["tasks"].items():
        names = list(res["by_length"])
        xs = [parse_lengths(n)[0] for n in names]
        ax.plot(xs, [res["by_length"][n] for n in names], marker="o", label=task)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(-0.05, 1.05)
    ax.set_title("Accuracy by context length")
    ax.grid(alpha=0.3)
    ax.legend()
    path = os.path.join(output_dir, plot_files([])[0])
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    written.append(path)

    for task, res in results["tasks"].items():
        cells = res["by_length_depth"]
        lengths = list(cells)
        depths = sorted({d for row in cells.values() for d in row}, key=float)
        grid = [[cells[length].get(d, float("nan")) for length in lengths] for d in depths]
        fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(lengths), 1.2 + 0.5 * len(depths)))
        im = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(lengths)), lengths)
        ax.set_yticks(range(len(depths)), depths)
        ax.set_xlabel("context length")
        ax.set_ylabel("needle depth")
        ax.set_title(f"{task}: accuracy")
        fig.colorbar(im, ax=ax)
        path = os.path.join(output_dir, plot_files([task])[1])
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written
