"""What a run directory shows: plots (PNG) and one self-contained HTML report.

Plots: accuracy curves with the communication rounds marked, consensus distance, the accuracy
matrix, the communication graph of the first gossip round and its mixing matrix.
"""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from gossiplab.callbacks import Callback
from gossiplab.config import Config, read_run_config
from gossiplab.mixing import mixing_matrix, spectral_gap
from gossiplab.plots import plt
from gossiplab.registry import MIXING_RULES
from gossiplab.rundir import RunDirError, read_metrics, read_summary
from gossiplab.runfolder import RunFolder
from gossiplab.sparse import dense
from gossiplab.topology import build_adjacency, is_time_varying

if TYPE_CHECKING:
    from gossiplab.assembly import Experiment
    from gossiplab.state import TrainingState

SUMMARY_ROWS = (  # label, summary key, format
    ("ALA", "ala", "{:.4f}"),
    ("AGA", "aga", "{:.4f}"),
    ("MMGA", "mmga", "{:.4f}"),
    ("(ALA+AGA)/2", "ala_aga_mean", "{:.4f}"),
    ("Gossip Gain", "gossip_gain", "{:+.2f}%"),
    ("Consensus distance", "consensus_distance", "{:.4g}"),
    ("Worst-10% local acc.", "worst10_local", "{:.4f}"),
    ("Worst-20% local acc.", "worst20_local", "{:.4f}"),
    ("Communication (MB, all sites)", "bytes_sent", "{:.1f}"),
    ("Wall time (s)", "wall_time_s", "{:.1f}"),
)
MAX_DRAWN_SITES = 64
MAX_MATRIX_SITES = 1024  # mixing.png: an image of W and its spectral gap (an O(N^3) eigendecomposition)


def summary_values(summary: dict[str, Any]) -> list[tuple[str, str]]:
    """The final metrics as (label, formatted value) pairs, for the terminal and the HTML report."""
    return [
        (
            label,
            "-"
            if summary.get(key) is None
            else fmt.format(summary[key] / 1e6 if key == "bytes_sent" else summary[key]),
        )
        for label, key, fmt in SUMMARY_ROWS
    ]


def plot_graph(config: Config, run_dir: Path, graph: tuple[torch.Tensor, torch.Tensor] | None = None) -> list[Path]:
    """topology.png (sites on a circle, edges of the first gossip round; up to 64 sites) and
    mixing.png (its W; up to 1,024 sites):
    `graph`, the adjacency and W the run used; else (redrawing from files) the configured graph
    of round 0 with its rule, or the uniform base of a rule that depends on the training."""
    gossip, n = config.gossip, config.num_sites
    rule = gossip.mixing
    if graph is not None:
        adjacency, weights = graph
        shown = f"{config.gossip.algorithm}: {rule}" if config.gossip.algorithm != "dsgd" else rule
    else:
        adjacency = build_adjacency(gossip.topology, n, 0, config.seed, gossip.p)
        computable = MIXING_RULES.property(rule, "distributed", False)  # computed from the graph alone
        weights = mixing_matrix(adjacency, rule if computable else "uniform")
        shown = rule if computable else f"uniform (the base {rule} reweights)"
    when = "round 0 of a time-varying graph" if is_time_varying(gossip.topology) else "static"
    written = []
    if n <= MAX_DRAWN_SITES:
        fig, ax = plt.subplots(figsize=(5, 5))
        angles = torch.arange(n) * 2 * math.pi / n
        xs, ys = angles.cos().numpy(), angles.sin().numpy()
        for i, j in torch.nonzero(dense(adjacency)).tolist():
            ax.annotate("", (xs[i], ys[i]), (xs[j], ys[j]), arrowprops={"arrowstyle": "->", "alpha": 0.5, "lw": 0.8})
        ax.scatter(xs, ys, s=120, zorder=3)
        for i in range(n):
            ax.annotate(str(i), (xs[i], ys[i]), ha="center", va="center", fontsize=7, color="white", zorder=4)
        ax.set_aspect("equal")
        ax.axis("off")
        ax.set_title(f"{gossip.topology} ({when})\nan arrow j \u2192 i: site i receives from site j", fontsize=9)
        written.append(_save(fig, run_dir / "topology.png"))
    if n > MAX_MATRIX_SITES:
        return written
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    image = ax.imshow(dense(weights).numpy(), cmap="Blues", vmin=0)
    fig.colorbar(image, ax=ax, label="W[i, j]")
    ax.set(
        xlabel="sender j",
        ylabel="receiver i",
        title=f"{shown} mixing matrix, spectral gap {spectral_gap(dense(weights)):.3f}",
    )
    written.append(_save(fig, run_dir / "mixing.png"))
    return written


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
        ylabel=r"$\frac{1}{N}\sum_i \Vert\theta_i - \bar{\theta}\Vert^2$",
        yscale="log",
        title=f"{summary['name']}: consensus distance",
    )
    ax.grid(alpha=0.3)
    written.append(_save(fig, run_dir / "consensus.png"))

    matrix = summary["accuracy_matrix"]
    size = len(matrix)
    # the figure grows with the sites up to 12 inches: beyond, one pixel per cell (1,000 sites: 55 s -> 1 s)
    fig, ax = plt.subplots(figsize=(min(5 + size * 0.15, 13), min(4 + size * 0.15, 12)))
    image = ax.imshow(matrix, vmin=0, vmax=1, cmap="viridis")
    fig.colorbar(image, ax=ax, label="accuracy")
    ax.set(
        xlabel="test data of site j",
        ylabel="model of site i",
        title=f"accuracy matrix A[i, j] at step {summary['step']}"
        + (f"\nover {size} evenly spaced sites" if summary.get("accuracy_matrix_sites") else ""),
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


def write_outputs(
    run_dir: Path,
    config: Config,
    rows: list[dict[str, Any]],
    summary: dict[str, Any],
    graph: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> list[Path]:
    """Every plot and the HTML report of a run (`graph`: the adjacency and W of its first round)."""
    paths = plot_run(run_dir, rows, summary) + plot_graph(config, run_dir, graph)
    return [*paths, write_html(run_dir, config, rows, summary)]


class Plots(Callback):
    """Every plot and the HTML report of a finished run, drawn from its files (config.toml names
    the parts that ran), its summary, and the graph and W of the first gossip round this process
    ran (else, as the parts give them for round 0)."""

    def __init__(self) -> None:
        self.first_round: tuple[torch.Tensor, torch.Tensor] | None = None

    def on_gossip(
        self, experiment: Experiment, state: TrainingState, adjacency: torch.Tensor, weights: torch.Tensor
    ) -> None:
        if self.first_round is None:
            self.first_round = (adjacency, weights)

    def on_finish(self, experiment: Experiment, state: TrainingState, summary: dict[str, Any]) -> None:
        folder = RunFolder(Path(summary["run_dir"]))
        graph = self.first_round
        if graph is None:
            adjacency = experiment.topology(0)
            graph = (adjacency, experiment.algorithm.mixing(0, adjacency, experiment.state))
        write_outputs(folder.path, read_run_config(folder.config), read_metrics(folder.metrics), summary, graph)


def replot(run_dir: Path) -> list[Path]:
    """Redraw the plots and the HTML report of a finished run from its files."""
    summary = read_summary(run_dir)
    if summary["status"] != "finished":
        raise RunDirError(
            f"{run_dir} did not finish ({summary['status']}: {summary.get('message', '')}); its metrics.jsonl "
            "holds the rows it logged"
        )
    folder = RunFolder(run_dir)
    return write_outputs(run_dir, read_run_config(folder.config), read_metrics(folder.metrics), summary)


def figure_html(path: Path, caption: str) -> str:
    """A PNG inlined into a self-contained page, with its caption."""
    data = base64.b64encode(path.read_bytes()).decode()
    caption = html.escape(caption)
    return (
        f'<figure><img src="data:image/png;base64,{data}" alt="{caption}"><figcaption>{caption}</figcaption></figure>'
    )


def write_html(run_dir: Path, config: Config, rows: list[dict[str, Any]], summary: dict[str, Any]) -> Path:
    """report.html: one file, no external resources (images inlined), opens offline in any browser."""
    final = "".join(f"<tr><th>{label}</th><td>{value}</td></tr>" for label, value in summary_values(summary))
    columns = ("step", "ala", "aga", "mmga", "gossip_gain", "consensus_distance", "train_loss", "bytes_sent")
    header = "".join(f"<th>{c}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{'' if r.get(c) is None else format(r[c], '.4g')}</td>" for c in columns) + "</tr>"
        for r in rows
    )
    figures = [
        ("accuracy.png", "ALA, AGA and MMGA (counterfactual merged model) vs step; ticks: communication rounds"),
        ("consensus.png", "consensus distance vs step"),
        ("accuracy_matrix.png", "accuracy matrix: site i's model on site j's test set"),
        ("topology.png", "communication graph"),
        ("mixing.png", "mixing matrix W"),
        ("landscape_loss.png", "loss landscape of the sites' models"),
        ("landscape_accuracy.png", "accuracy landscape of the sites' models"),
    ]
    images = "".join(figure_html(run_dir / name, caption) for name, caption in figures if (run_dir / name).is_file())
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>gossiplab: {html.escape(config.name)}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; }} td, th {{ border: 1px solid #ccc; padding: 3px 8px; }}
th {{ background: #f3f3f3; text-align: left; }} td {{ text-align: right; font-variant-numeric: tabular-nums; }}
figure {{ display: inline-block; margin: 0.5em; }} img {{ max-width: 640px; }}
pre {{ background: #f7f7f7; padding: 1em; }}
</style></head><body>
<h1>{html.escape(config.name)}</h1>
<p>{html.escape(config.description)}</p>
<p>{summary["status"]} at step {summary["step"]}, {config.num_sites} sites,
{summary["num_parameters"]:,} parameters each, engine strategy {summary["strategy"]};
run directory <code>{html.escape(str(run_dir))}</code></p>
<h2>Final metrics</h2><table id="final">{final}</table>
<h2>Plots</h2>{images}
<h2>Every evaluation</h2><table id="metrics"><tr>{header}</tr>{body}</table>
<h2>Configuration (config.toml)</h2><pre>{html.escape(config.to_toml())}</pre>
</body></html>
"""
    path = RunFolder(run_dir).report
    path.write_text(page)
    return path
