"""Sweeps: one base experiment, several named variants, run side by side and compared.

A sweep file (src/gossiplab/sweeps/NAME.toml) names a base preset, overrides applied to every
variant, and a table of variants (name -> overrides). Every variant runs with the same seeds, so
the variants see the same partition and initialisation and differ only where the sweep says.
A sweep directory holds one run directory per variant and seed, `sweep.json` and the plots; a
rerun with the same `--sweep-dir` skips finished runs and resumes unfinished ones.
"""

from __future__ import annotations

import copy
import json
import re
import statistics
import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from rich.console import Console

from gossiplab.config import Config, ConfigError, apply_values, build_config
from gossiplab.runner import Runner, atomic_write


@dataclass
class Sweep:
    name: str
    description: str
    preset: str
    overrides: list[str]
    variants: dict[str, list[str]]


def sweep_names() -> list[str]:
    folder = resources.files("gossiplab") / "sweeps"
    return sorted(p.name.removesuffix(".toml") for p in folder.iterdir() if p.name.endswith(".toml"))


def load_sweep(name: str) -> Sweep:
    if name not in sweep_names():
        raise ConfigError(f"unknown sweep '{name}'; available sweeps: {', '.join(sweep_names())}")
    table = tomllib.loads((resources.files("gossiplab") / "sweeps" / f"{name}.toml").read_text())
    return Sweep(table["name"], table["description"], table["preset"], table.get("overrides", []), table["variants"])


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-").lower()


def variant_configs(sweep: Sweep, extra: list[str], seeds: int) -> dict[tuple[str, int], Config]:
    """Every (variant, seed) config, all validated before anything runs."""
    configs = {}
    for variant, overrides in sweep.variants.items():
        base = build_config(sweep.preset, [*sweep.overrides, *overrides, *extra])
        for k in range(seeds):
            config = copy.deepcopy(base)
            apply_values(config, {"seed": base.seed + k, "name": f"{sweep.name}/{variant}"})
            configs[(variant, config.seed)] = config
    return configs


def run_sweep(
    sweep: Sweep,
    sweep_dir: Path,
    extra: list[str],
    seeds: int = 1,
    console: Console | None = None,
    show_progress: bool = True,
) -> dict[str, list[dict[str, Any]]]:
    """Run (or finish) every variant and seed; return the summaries per variant."""
    configs = variant_configs(sweep, extra, seeds)
    results: dict[str, list[dict[str, Any]]] = {variant: [] for variant in sweep.variants}
    for (variant, seed), config in configs.items():
        run_dir = sweep_dir / slug(variant) / f"seed-{seed}"
        if (run_dir / "summary.json").is_file():
            summary = json.loads((run_dir / "summary.json").read_text())
        else:
            resume = (run_dir / "checkpoint.pt").is_file()
            run_dir.mkdir(parents=True, exist_ok=True)
            summary = Runner(config, run_dir, resume=resume, console=console, show_progress=show_progress).run()
        results[variant].append(summary)
        atomic_write(sweep_dir / "sweep.json", json.dumps({"sweep": sweep.name, "results": results}).encode())
    plot_sweep(sweep, sweep_dir, results)
    return results


TABLE_ROWS = (  # label, summary key, scale, format
    ("ALA", "ala", 1.0, ".4f"),
    ("AGA", "aga", 1.0, ".4f"),
    ("MMGA", "mmga", 1.0, ".4f"),
    ("(ALA+AGA)/2", "ala_aga_mean", 1.0, ".4f"),
    ("Gossip Gain (%)", "gossip_gain", 1.0, "+.2f"),
    ("AGA before final merge", ("before_final_merge", "aga"), 1.0, ".4f"),
    ("MMGA before final merge", ("before_final_merge", "mmga"), 1.0, ".4f"),
    ("MB sent (all sites)", "bytes_sent", 1e-6, ".1f"),
    ("peers per round R", ("communication", "peers_per_round_R"), 1.0, ".3f"),
    ("steps to 95% of best MMGA", ("convergence_step", "mmga"), 1.0, ".0f"),
)


def _value(summary: dict[str, Any], key: str | tuple[str, str]) -> float | None:
    if isinstance(key, tuple):
        inner = summary.get(key[0])
        return None if inner is None else inner.get(key[1])
    return summary.get(key)


def table_rows(results: dict[str, list[dict[str, Any]]]) -> list[tuple[str, list[str]]]:
    """The paper's layout: one row per metric, one column per variant; mean +- std over seeds."""
    rows = []
    for label, key, scale, spec in TABLE_ROWS:
        cells = []
        for summaries in results.values():
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


def _rows(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def plot_sweep(sweep: Sweep, sweep_dir: Path, results: dict[str, list[dict[str, Any]]]) -> list[Path]:
    """curves.png: counterfactual merged (MMGA) and average local (AGA) accuracy vs step per variant;
    merged_vs_bytes.png: final merged accuracy against bytes sent."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for index, (variant, summaries) in enumerate(results.items()):
        rows = _rows(Path(summaries[0]["run_dir"]))
        colour = f"C{index}"
        steps = [r["step"] for r in rows]
        ax.plot(steps, [r["mmga"] for r in rows], color=colour, label=f"{variant}: merged (counterfactual)")
        ax.plot(steps, [r["aga"] for r in rows], color=colour, linestyle="--", label=f"{variant}: local models (AGA)")
    ax.set(xlabel="step", ylabel="global test accuracy", title=f"{sweep.name}: merged vs local models (first seed)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    curves = sweep_dir / "curves.png"
    fig.savefig(curves, dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for index, (variant, summaries) in enumerate(results.items()):
        sent = [max(s["bytes_sent"], 1) / 1e6 for s in summaries]
        merged = [s["mmga"] for s in summaries]
        ax.scatter(sent, merged, color=f"C{index}", label=variant, s=40)
        ax.annotate(variant, (sent[0], merged[0]), xytext=(5, 5), textcoords="offset points", fontsize=8)
    ax.set(
        xscale="log",
        xlabel="MB sent by all sites (log)",
        ylabel="final merged-model global accuracy",
        title=f"{sweep.name}: accuracy vs communication",
    )
    ax.grid(alpha=0.3)
    fig.tight_layout()
    scatter = sweep_dir / "merged_vs_bytes.png"
    fig.savefig(scatter, dpi=110)
    plt.close(fig)
    return [curves, scatter]
