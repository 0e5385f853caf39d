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
import os
import re
import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from gossiplab.catalogue import build_config, validate
from gossiplab.compare import plot_against, plot_cost, plot_curves
from gossiplab.config import (
    Config,
    ConfigError,
    apply_values,
    config_from_toml,
    differing_fields,
    flatten,
    leaf_types,
    parse_override,
    resolve_key,
)
from gossiplab.devices import resolved_threads, with_pinned_threads
from gossiplab.report import Plots
from gossiplab.rundir import atomic_write, read_summary
from gossiplab.runfolder import RunFolder
from gossiplab.runner import Runner


@dataclass
class Sweep:
    name: str
    description: str
    preset: str
    overrides: list[str]
    variants: dict[str, list[str]]
    plot_against: str = ""  # a summary key to plot ALA/AGA/MMGA against (e.g. gossip_rounds)
    time_curves: bool = False  # also curves_vs_time.png: accuracy against the simulated network's clock


def sweep_names() -> list[str]:
    folder = resources.files("gossiplab") / "sweeps"
    return sorted(p.name.removesuffix(".toml") for p in folder.iterdir() if p.name.endswith(".toml"))


def load_sweep(name: str) -> Sweep:
    if name not in sweep_names():
        raise ConfigError(f"unknown sweep '{name}'; available sweeps: {', '.join(sweep_names())}")
    table = tomllib.loads((resources.files("gossiplab") / "sweeps" / f"{name}.toml").read_text())
    return Sweep(
        table["name"],
        table["description"],
        table["preset"],
        table.get("overrides", []),
        table["variants"],
        table.get("plot_against", ""),
        table.get("time_curves", False),
    )


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-").lower()


def variant_configs(sweep: Sweep, extra: list[str], seeds: int) -> dict[tuple[str, int], Config]:
    """Every (variant, seed) config, all validated before anything runs (a dry run too)."""
    folders: dict[str, str] = {}
    for variant in sweep.variants:
        other = folders.setdefault(slug(variant), variant)
        if other != variant:  # both would read and write one run directory
            raise ConfigError(f"sweep {sweep.name}: variants '{other}' and '{variant}' share the folder "
                              f"'{slug(variant)}'; rename one")  # fmt: skip
    configs = {}
    for variant, overrides in sweep.variants.items():
        check_no_collision(sweep, variant, overrides, extra)
        base = build_config(sweep.preset, [*sweep.overrides, *overrides, *extra])
        for k in range(seeds):
            config = copy.deepcopy(base)
            apply_values(config, {"seed": base.seed + k, "name": f"{sweep.name}/{variant}"})
            configs[(variant, config.seed)] = config
    return configs


def check_no_collision(sweep: Sweep, variant: str, overrides: list[str], extra: list[str]) -> None:
    """An override given for every run must not set a key that a variant sets itself: it would
    quietly turn that variant into another (`l2c.prune_round=2` made "L2C no pruning" prune)."""
    types = leaf_types()

    def keys(texts: list[str]) -> dict[str, str]:
        return {resolve_key(parse_override(t)[0].strip(), types): t for t in texts}

    own, given = keys(overrides), keys(extra)
    clashes = [f"'{given[k]}' (the variant sets '{own[k]}')" for k in own.keys() & given.keys()]
    if clashes:
        raise ConfigError(
            f"sweep {sweep.name}, variant '{variant}': the override {', '.join(sorted(clashes))} would change what "
            "the variant is; leave it out, or run that variant as a run of its own"
        )


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
    run_dirs = {(variant, seed): sweep_dir / slug(variant) / f"seed-{seed}" for variant, seed in configs}
    check_sweep_dir(sweep_dir, {run_dirs[key]: config for key, config in configs.items()})
    results: dict[str, list[dict[str, Any]]] = {variant: [] for variant in sweep.variants}
    for (variant, seed), config in configs.items():
        run_dir = run_dirs[(variant, seed)]
        if RunFolder(run_dir).summary.is_file():
            summary = read_summary(run_dir)
        else:
            resume = RunFolder(run_dir).checkpoint.is_file()
            run_dir.mkdir(parents=True, exist_ok=True)
            runner = Runner(config, run_dir, resume=resume, console=console, show_progress=show_progress)
            summary = runner.run(callbacks=[Plots()])
        results[variant].append(summary)
        atomic_write(sweep_dir / "sweep.json", json.dumps({"sweep": sweep.name, "results": results}).encode())
    plot_sweep(sweep, sweep_dir, results)
    return results


def pending_runs(sweep: Sweep, sweep_dir: Path, extra: list[str], seeds: int) -> list[tuple[Config, Path]]:
    """The (config, run directory) pairs of a sweep that have no summary yet, the folder checked first."""
    configs = variant_configs(sweep, extra, seeds)
    run_dirs = {key: sweep_dir / slug(key[0]) / f"seed-{key[1]}" for key in configs}
    check_sweep_dir(sweep_dir, {run_dirs[key]: config for key, config in configs.items()})
    return [(configs[key], run_dirs[key]) for key in configs if not RunFolder(run_dirs[key]).summary.is_file()]


def run_one(config: Config, run_dir: Path) -> Path:
    """One run to its end, quietly, resuming a checkpoint (what a worker process of `run_in_processes` does)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    resume = RunFolder(run_dir).checkpoint.is_file()
    runner = Runner(config, run_dir, resume=resume, console=Console(stderr=True, quiet=True), show_progress=False)
    runner.run(callbacks=[Plots()])
    return run_dir


def run_config_text(config_toml: str, run_dir: Path) -> Path:
    """`run_one` on a config passed as its TOML text: what a worker process receives, since a
    pickled `Config` would carry every section registered in this process, some of them from
    modules (plug-ins a test or a notebook imported) the worker cannot import."""
    config = config_from_toml(config_toml, origin=f"the config of {run_dir}")
    validate(config)
    return run_one(config, run_dir)


def oversubscription(jobs: int, threads: int, cores: int) -> str | None:
    """The warning for `jobs` processes of `threads` threads each on `cores` cores, if they do not fit."""
    if jobs * threads <= cores:
        return None
    fits = max(1, cores // jobs)
    return (f"{jobs} jobs x {threads} threads a run = {jobs * threads} threads on {cores} cores: they compete "
            f"(the numbers stay a serial run's, the time grows); train.threads={fits} fits them")  # fmt: skip


def run_in_processes(runs: list[tuple[Config, Path]], jobs: int, console: Console | None = None) -> None:
    """The runs spread over `jobs` worker processes (spawned: no state shared with this one), the
    finished count shown. A run computes with its config's thread count whichever process runs it,
    so its numbers are those of a serial run; when jobs x threads does not fit the cores it warns
    (`train.threads` sets the count). The first failure stops the rest and is raised here."""
    import concurrent.futures
    import multiprocessing

    from rich.progress import Progress

    console = console or Console(stderr=True)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threads = max((resolved_threads(config.train.threads) for config, _ in runs), default=1)
    warning = oversubscription(min(jobs, len(runs)), threads, cores)
    if warning:
        console.print(f"[yellow]warning:[/] {escape(warning)}")
    context = multiprocessing.get_context("spawn")
    with (
        concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool,
        Progress(console=console, transient=True) as progress,
    ):
        task = progress.add_task(f"{len(runs)} runs in {jobs} processes", total=len(runs))
        futures = [pool.submit(run_config_text, config.to_toml(), run_dir) for config, run_dir in runs]
        try:
            for future in concurrent.futures.as_completed(futures):
                future.result()
                progress.advance(task)
        except BaseException:
            for future in futures:
                future.cancel()
            raise


def check_sweep_dir(sweep_dir: Path, configs: dict[Path, Config]) -> None:
    """A sweep directory is reused only for the same sweep: refuse a run directory, and any
    variant's run that was made with another resolved config (changed overrides), before anything
    runs, so stale results are never reported as the new ones."""
    if RunFolder(sweep_dir).holds_a_run():
        raise ConfigError(f"--sweep-dir {sweep_dir} is a run directory, not a sweep's: choose another folder")
    stale = []
    for run_dir, config in configs.items():
        if RunFolder(run_dir).config.is_file():
            written = with_pinned_threads(flatten(build_config(path=RunFolder(run_dir).config).to_dict()))
            differing = differing_fields(written, with_pinned_threads(flatten(config.to_dict())))
            if differing:
                stale.append(f"{run_dir.relative_to(sweep_dir)} ({', '.join(differing)})")
    if stale:
        raise ConfigError(
            f"--sweep-dir {sweep_dir} holds runs made with another config: {'; '.join(stale[:5])}; "
            "choose a new --sweep-dir for the changed sweep (the old results stay where they are)"
        )


def plot_sweep(sweep: Sweep, sweep_dir: Path, results: dict[str, list[dict[str, Any]]]) -> list[Path]:
    """curves.png (merged vs local accuracy per variant), merged_vs_bytes.png, with
    `plot_against` metrics_vs_KEY.png, and with `time_curves` curves_vs_time.png."""
    paths = [
        plot_curves(f"{sweep.name}: merged vs local models (first seed)", results, sweep_dir / "curves.png"),
        plot_cost(f"{sweep.name}: accuracy vs communication", results, sweep_dir / "merged_vs_bytes.png"),
    ]
    if sweep.plot_against:
        key = sweep.plot_against
        paths.append(plot_against(f"{sweep.name} (first seed)", results, key, sweep_dir / f"metrics_vs_{key}.png"))
    if sweep.time_curves:
        title = f"{sweep.name}: merged vs local models in simulated time (first seed)"
        paths.append(plot_curves(title, results, sweep_dir / "curves_vs_time.png", x="simulated_time_s"))
    return paths
