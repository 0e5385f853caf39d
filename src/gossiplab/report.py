"""Plots of a run directory: accuracy curves, consensus distance and the accuracy matrix (PNG)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def plot_run(run_dir: Path, rows: list[dict[str, Any]], summary: dict[str, Any]) -> list[Path]:
    """Write accuracy.png, consensus.png and accuracy_matrix.png into the run directory."""
    steps = [r["step"] for r in rows]
    communication = summary["communication_steps"]
    written = []

    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label in (("ala", "ALA (local)"), ("aga", "AGA (global)"), ("mmga", "MMGA (merged model)")):
        ax.plot(steps, [r[key] for r in rows], marker="o", markersize=3, label=label)
    if communication:
        ax.plot(
            communication,
            [0.0] * len(communication),
            "|",
            color="grey",
            markersize=8,
            label=f"communication ({len(communication)} rounds)",
        )
    ax.set(xlabel="step", ylabel="accuracy", ylim=(-0.02, 1.0), title=f"{summary['name']}: accuracy")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    written.append(_save(fig, run_dir / "accuracy.png"))

    fig, ax = plt.subplots(figsize=(7, 4))
    distance = [max(r["consensus_distance"], 1e-12) for r in rows]
    ax.plot(steps, distance, marker="o", markersize=3)
    ax.set(
        xlabel="step",
        ylabel="(1/N) sum ||theta_i - mean||^2",
        yscale="log",
        title=f"{summary['name']}: consensus distance",
    )
    ax.grid(alpha=0.3)
    written.append(_save(fig, run_dir / "consensus.png"))

    matrix = summary["accuracy_matrix"]
    size = len(matrix)
    fig, ax = plt.subplots(figsize=(5 + size * 0.15, 4 + size * 0.15))
    image = ax.imshow(matrix, vmin=0, vmax=1, cmap="viridis")
    fig.colorbar(image, ax=ax, label="accuracy")
    ax.set(
        xlabel="test data of site j",
        ylabel="model of site i",
        title=f"accuracy matrix A[i, j] at step {summary['step']}",
    )
    if size <= 20:
        for i in range(size):
            for j in range(size):
                ax.text(
                    j,
                    i,
                    f"{matrix[i][j]:.2f}",
                    ha="center",
                    va="center",
                    fontsize=6,
                    color="white" if matrix[i][j] < 0.5 else "black",
                )
    written.append(_save(fig, run_dir / "accuracy_matrix.png"))
    return written


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def replot(run_dir: Path) -> list[Path]:
    """Redraw the plots of a finished run from its metrics.jsonl and summary.json."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    summary = json.loads((run_dir / "summary.json").read_text())
    return plot_run(run_dir, rows, summary)
