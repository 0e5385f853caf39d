"""Comparing runs: one table in the paper's layout (a column per run or group) and overlay plots.

Used by `gossiplab compare` (any run or sweep directories) and `gossiplab sweep`.
"""

from __future__ import annotations

import csv
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gossiplab.config import flatten, read_run_config
from gossiplab.plots import plt
from gossiplab.rundir import RunDirError, read_metrics, read_summary
from gossiplab.runfolder import RunFolder

TABLE_ROWS = (  # label, summary key, scale, format
    ("ALA", "ala", 1.0, ".4f"),
    ("AGA", "aga", 1.0, ".4f"),
    ("MMGA", "mmga", 1.0, ".4f"),
    ("(ALA+AGA)/2", "ala_aga_mean", 1.0, ".4f"),
    ("Gossip Gain (%)", "gossip_gain", 1.0, "+.2f"),
    ("worst-10% local accuracy", "worst10_local", 1.0, ".4f"),
    ("worst-20% local accuracy", "worst20_local", 1.0, ".4f"),
    ("std of local accuracy", "std_local", 1.0, ".4f"),
    ("learned weight on same-task sites", "learned_weight_same_task", 1.0, ".4f"),
    ("learned weight on other sites", "learned_weight_other_task", 1.0, ".4f"),
    ("AGA before final merge", ("before_final_merge", "aga"), 1.0, ".4f"),
    ("MMGA before final merge", ("before_final_merge", "mmga"), 1.0, ".4f"),
    ("MB sent (all sites)", "bytes_sent", 1e-6, ".1f"),
    ("messages lost", ("communication", "messages_lost"), 1.0, ".0f"),
    ("simulated time (s)", "simulated_time_s", 1.0, ".1f"),
    ("peers per round R", ("communication", "peers_per_round_R"), 1.0, ".3f"),
    ("steps to 95% of best ALA", ("convergence_step", "ala"), 1.0, ".0f"),
    ("steps to 95% of best AGA", ("convergence_step", "aga"), 1.0, ".0f"),
    ("steps to 95% of best MMGA", ("convergence_step", "mmga"), 1.0, ".0f"),
)


def _value(summary: dict[str, Any], key: str | tuple[str, str]) -> float | None:
    if isinstance(key, tuple):
        inner = summary.get(key[0])
        return None if inner is None else inner.get(key[1])
    return summary.get(key)


def table_rows(groups: dict[str, list[dict[str, Any]]]) -> list[tuple[str, list[str]]]:
    """One row per metric, one column per group; mean +- std over a group's runs (seeds)."""
    rows = []
    for label, key, scale, spec in TABLE_ROWS:
        cells = []
        for summaries in groups.values():
            values = [v * scale for s in summaries if (v := _value(s, key)) is not None]
            if not values:
                cells.append("-")
            elif len(values) == 1:
                cells.append(format(values[0], spec))
            else:
                cells.append(f"{format(statistics.mean(values), spec)} +- {statistics.stdev(values):.2g}")
        if any(c != "-" for c in cells):
            rows.append((label, cells))
    return rows


def find_runs(paths: list[Path], warn: Callable[[str], None] = print) -> list[Path]:
    """Finished run directories: the paths themselves, or every run inside a sweep directory.
    A run that diverged is left out with a warning (it has no final metrics to compare)."""
    candidates = []
    for path in paths:
        if RunFolder(path).summary.is_file():
            candidates.append(path)
        elif (path / "sweep.json").is_file():
            candidates += sorted(p.parent for p in path.glob("*/seed-*/summary.json"))
        else:
            raise RunDirError(f"{path} is neither a finished run (summary.json) nor a sweep (sweep.json)")
    runs = []
    for run in candidates:
        summary = read_summary(run)
        if summary["status"] == "finished":
            runs.append(run)
        else:
            warn(f"left out {run}: it did not finish ({summary['status']}: {summary.get('message', '')})")
    if not runs:
        raise RunDirError("none of the runs finished, so there is nothing to compare")
    return runs


def group_runs(runs: list[Path]) -> dict[str, list[dict[str, Any]]]:
    """Group finished runs by the config keys that differ between them (seeds pooled within a group)."""
    configs, keys = configs_and_differing_keys(runs)
    groups: dict[str, list[dict[str, Any]]] = {}
    for run, config in configs.items():
        label = ", ".join(f"{k.split('.')[-1]}={config[k]}" for k in keys) or config["name"]
        summary = read_summary(run)
        summary["run_dir"] = str(run)
        groups.setdefault(label, []).append(summary)
    return groups


def configs_and_differing_keys(runs: list[Path]) -> tuple[dict[Path, dict[str, Any]], list[str]]:
    """Each run's flattened config, and the keys whose values are not the same in every run (its
    name, description and seed aside: seeds are pooled, not compared)."""
    configs = {run: flatten(read_run_config(RunFolder(run).config).to_dict()) for run in runs}
    ignored = {"name", "description", "seed"}
    return configs, sorted(
        {
            k
            for c in configs.values()
            for k in c
            if k not in ignored and len({str(d.get(k)) for d in configs.values()}) > 1
        }
    )


def tidy_rows(runs: list[Path]) -> list[dict[str, Any]]:
    """One row per (run, evaluation step, scalar metric): the run's folder, its seed, the config
    keys that differ between the runs (full dotted names), step, metric and value. The long
    ("tidy") layout that pandas, seaborn and R's ggplot group and plot without reshaping."""
    configs, keys = configs_and_differing_keys(runs)
    rows = []
    for run, config in configs.items():
        fixed = {"run": str(run), "seed": config["seed"], **{k: _cell(config.get(k)) for k in keys}}
        for metrics in read_metrics(RunFolder(run).metrics):
            for metric, value in metrics.items():
                if metric != "step" and isinstance(value, int | float) and not isinstance(value, bool):
                    rows.append({**fixed, "step": metrics["step"], "metric": metric, "value": value})
    return rows


def write_csv(runs: list[Path], path: Path) -> Path:
    """The runs' `tidy_rows` as a CSV file (columns in the order of the first row)."""
    rows = tidy_rows(runs)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else ["run", "step", "metric", "value"])
        writer.writeheader()
        writer.writerows(rows)
    return path


def _cell(value: Any) -> Any:
    """A config value as one table cell: lists and tables as their text."""
    return value if isinstance(value, int | float | str | bool) or value is None else str(value)


AXES = {
    "step": "step",
    "simulated_time_s": "simulated time (s), [network] clock",
    "bytes_sent": "bytes sent by all sites",
}


def plot_curves(title: str, groups: dict[str, list[dict[str, Any]]], path: Path, x: str = "step") -> Path:
    """The counterfactual merged model (MMGA, solid) and the average local model (AGA, dashed)
    against the step, or against another value of the rows (`simulated_time_s`: the simulated
    network's clock), one colour per group (its first run; rows without that value are skipped)."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for index, (label, summaries) in enumerate(groups.items()):
        rows = [r for r in read_metrics(RunFolder(Path(summaries[0]["run_dir"])).metrics) if x in r]
        at = [r[x] for r in rows]
        ax.plot(at, [r["mmga"] for r in rows], color=f"C{index}", label=f"{label}: merged (MMGA)")
        ax.plot(at, [r["aga"] for r in rows], color=f"C{index}", linestyle="--", label=f"{label}: local (AGA)")
    ax.set(xlabel=AXES.get(x, x), ylabel="global test accuracy", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_cost(title: str, groups: dict[str, list[dict[str, Any]]], path: Path) -> Path:
    """Final merged-model accuracy against the bytes every site sent, one point per run."""
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for index, (label, summaries) in enumerate(groups.items()):
        sent = [max(s["bytes_sent"], 1) / 1e6 for s in summaries]
        merged = [s["mmga"] for s in summaries]
        ax.scatter(sent, merged, color=f"C{index}", label=label, s=40)
        ax.annotate(label, (sent[0], merged[0]), xytext=(5, 5), textcoords="offset points", fontsize=8)
    ax.set(xscale="log", xlabel="MB sent by all sites (log)", ylabel="final merged-model global accuracy", title=title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_against(title: str, groups: dict[str, list[dict[str, Any]]], key: str, path: Path) -> Path:
    """ALA, AGA and MMGA against a summary value (e.g. gossip_rounds, MAZEL Fig. 2), one line per
    series; a variant's series is its name without the last word ("MAZEL 10" -> "MAZEL")."""
    series: dict[str, list[tuple[float, dict[str, Any]]]] = {}
    for label, summaries in groups.items():
        series.setdefault(label.rsplit(" ", 1)[0], []).append((summaries[0][key], summaries[0]))
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.8), sharey=True)
    for ax, (metric, name) in zip(axes, (("ala", "ALA"), ("aga", "AGA"), ("mmga", "MMGA")), strict=True):
        for index, (label, points) in enumerate(series.items()):
            points.sort(key=lambda p: p[0])
            ax.plot([p[0] for p in points], [p[1][metric] for p in points], "o-", color=f"C{index}", label=label)
        ax.set(xscale="log", xlabel=key.replace("_", " "), title=name)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy")
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
