"""`gossiplab run | presets | report`: the command line."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.live import Live
from rich.markup import escape
from rich.table import Table

from gossiplab import __version__
from gossiplab.catalogue import build_config
from gossiplab.config import Config, ConfigError, load_preset, preset_names
from gossiplab.memory import ResourceError
from gossiplab.plugins import DEBUG_OPTION, debugging, plugin_fault
from gossiplab.runfolder import RunFolder


def user_errors() -> tuple[type[Exception], ...]:
    """The exceptions that are a user's mistake or the environment's (one line, exit 2), imported only
    when an exception is being matched: most of their modules import PyTorch, which `gossiplab --help`
    and the shell's completion must not wait for (seconds)."""
    from gossiplab.data.partition import PartitionError
    from gossiplab.data.sources import DataFileError, SourceMissingError
    from gossiplab.distributed import JoinRefused
    from gossiplab.encoders import EncoderError
    from gossiplab.rundir import RunDirError

    return (
        ConfigError,
        RunDirError,
        SourceMissingError,
        DataFileError,
        PartitionError,
        ResourceError,
        EncoderError,
        JoinRefused,
    )


def file_errors() -> tuple[type[Exception], ...]:
    """A data or checkpoint file that is unsafe to load or unreadable (one line, exit 2)."""
    from gossiplab.safeload import PlainDataFileError, UnsafeFileError

    return (UnsafeFileError, PlainDataFileError)


app = typer.Typer(
    add_completion=True,  # --install-completion / --show-completion for bash, zsh, fish, PowerShell
    pretty_exceptions_enable=False,
    help="gossiplab: decentralized (gossip) deep learning on PyTorch.",
)
console = Console()
errors = Console(stderr=True, soft_wrap=True)


def summary_table(summary: dict[str, Any]) -> Table:
    from gossiplab.report import summary_values

    table = Table(title=f"{summary['name']}: final metrics at step {summary['step']}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for label, value in summary_values(summary):
        table.add_row(label, value)
    return table


def _listing(title: str, descriptions: dict[str, str]) -> Table:
    table = Table(title=title)
    table.add_column("name")
    table.add_column("description")
    for name, description in descriptions.items():
        table.add_row(name, description)
    return table


def paper_table(title: str, groups: dict[str, list[dict[str, Any]]]) -> Table:
    """The papers' layout: one row per metric, one column per run group (mean +- std over seeds)."""
    from gossiplab.compare import table_rows

    table = Table(title=title)
    table.add_column("metric")
    for label in groups:
        table.add_column(label, justify="right")
    for label, cells in table_rows(groups):
        table.add_row(label, *cells)
    return table


def _print_dry_run(config: Config) -> None:
    """The resolved config, the sites and the memory estimate: everything checked, nothing run."""
    from gossiplab.assembly import build_data_and_model, check_run_memory

    federation, module = build_data_and_model(config, errors)
    estimate = check_run_memory(config, federation, module)
    console.print(config.to_toml(), highlight=False, markup=False)
    parameters = sum(p.numel() for p in module.parameters())
    console.print(
        f"ok: {federation.num_sites} sites, {federation.num_classes} classes, {int(federation.train_sizes.sum())} "
        f"training samples, {parameters:,} parameters per site, about {sum(estimate.values()) / 2**30:.2f} GiB"
    )


def _fail(problem: str | BaseException, code: int = 2) -> NoReturn:
    """One line on standard error and exit `code`; with --debug, a plug-in's traceback first."""
    if isinstance(problem, BaseException) and problem.__cause__ is not None and debugging():
        traceback.print_exception(problem.__cause__)
    errors.print(f"[bold red]error:[/] {escape(str(problem))}", highlight=False)
    raise typer.Exit(code)


def _print_version(asked: bool) -> None:
    if asked:
        console.print(f"gossiplab {__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    debug: Annotated[
        bool, typer.Option("--debug", help="when a plug-in fails, show its own traceback (also: GOSSIPLAB_DEBUG=1)")
    ] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_print_version, is_eager=True, help="print the version and exit")
    ] = False,
) -> None:
    """gossiplab: decentralized (gossip) deep learning on PyTorch."""
    DEBUG_OPTION[0] = debug


@app.command()
def run(
    overrides: Annotated[
        list[str] | None, typer.Argument(help="key=value overrides, e.g. gossip.topology=ring")
    ] = None,
    preset: Annotated[
        str, typer.Option("--preset", "-p", help="named experiment (see 'gossiplab presets')")
    ] = "default",
    config_file: Annotated[
        Path | None, typer.Option("--config", help="a config.toml to run (e.g. from an earlier run directory)")
    ] = None,
    run_dir_text: Annotated[
        str | None, typer.Option("--run-dir", help="where to write results (default runs/NAME-TIME)")
    ] = None,
    resume: Annotated[Path | None, typer.Option(help="continue the interrupted run in this directory")] = None,
    quiet: Annotated[bool, typer.Option(help="no progress bar")] = False,
    dry_run: Annotated[
        bool, typer.Option(help="check the config and data, print it with a memory estimate, run nothing")
    ] = False,
) -> None:
    """Run an experiment: the embedded default, or a preset with key=value overrides."""
    from gossiplab.launch import launched_distributed, rank_of_process, relaunched_by_torchrun

    comm = None
    if run_dir_text is not None and not run_dir_text.strip():
        _fail("--run-dir is empty: name the folder for the run's results (or leave the option out)")
    run_dir = Path(run_dir_text) if run_dir_text is not None else None
    if relaunched_by_torchrun(run_dir):  # torchrun --max-restarts: the same command continues the run
        resume, run_dir, overrides, preset, config_file = run_dir, None, None, "default", None
    try:
        if dry_run and resume is not None:
            _fail("--dry-run checks a new run; it takes no --resume")
        if resume is None and config_file is not None and preset != "default":
            _fail("give either --preset or --config, not both")
        # a new run's config first: a typo is answered before PyTorch is imported (seconds)
        config = build_config(preset, overrides, config_file) if resume is None else None
    except ConfigError as error:
        _fail(error)
    from gossiplab.communicator import PeerLost
    from gossiplab.distributed import JoinRefused, ProcessGroup, ResumeError
    from gossiplab.report import Plots
    from gossiplab.rundir import WRITE_PROBE, claim_new_dir
    from gossiplab.runner import DivergenceError, RunInterrupted, Runner, load_run_config

    try:
        if dry_run:
            _print_dry_run(config)
            return
        if resume is not None:
            if overrides or preset != "default" or run_dir is not None or config_file is not None:
                _fail("--resume takes no preset, --config, overrides or --run-dir: the run's own config.toml is used")
            config = load_run_config(resume, rank=rank_of_process())
            target = resume
            if launched_distributed():
                comm = ProcessGroup(config)
        else:
            if launched_distributed():
                comm = ProcessGroup(config)
            try:
                target = run_dir
                if target is None and (comm is None or comm.writes):  # a fresh name, never another run's
                    target = claim_new_dir(Path("runs") / f"{config.name}-{time.strftime('%Y%m%d-%H%M%S')}")
                if comm is not None:
                    target = Path(comm.share("run-dir", str(target)))  # rank 0 names the run
                target.mkdir(parents=True, exist_ok=True)
                probe = target / f"{WRITE_PROBE}-{os.getpid()}"
                probe.write_bytes(b"")
                probe.unlink()
            except OSError as error:
                _fail(f"run directory {target} cannot be written ({error.strerror or error})")
        runner = Runner(config, target, resume=resume is not None, console=errors, show_progress=not quiet, comm=comm)
    except user_errors() as error:
        if comm is not None:
            comm.close(together=False)
        _fail(error)
    previous = signal.signal(signal.SIGINT, lambda *_: runner.request_stop())
    try:
        summary = runner.run(callbacks=[Plots()])
    except RunInterrupted as stop:
        errors.print(f"[yellow]interrupted:[/] {stop}")
        raise typer.Exit(130) from None
    except (DivergenceError, PeerLost, JoinRefused) as error:  # the run stopped: what it wrote stays
        _fail(str(error), code=1)
    except ResumeError as error:
        _fail(error)
    finally:
        signal.signal(signal.SIGINT, previous)
        if comm is not None:
            comm.close(together=False)
    if summary.get("rank"):  # another process of a distributed run: rank 0 prints the results
        return
    console.print(summary_table(summary))
    console.print(f"run directory: {target}")


@app.command()
def compare(
    paths: Annotated[list[Path], typer.Argument(help="finished run directories and/or sweep directories")],
    out: Annotated[
        Path, typer.Option(help="folder for compare_curves.png, compare_time.png and compare_cost.png")
    ] = Path("."),
    csv: Annotated[
        Path | None,
        typer.Option(help="also write every run's metrics to this CSV file, one row per run, step and metric"),
    ] = None,
) -> None:
    """One table of final metrics across runs (grouped by the config keys that differ), overlay plots;
    --csv writes the runs' metrics as one tidy table (what gossiplab.load_runs returns)."""
    from gossiplab.compare import find_runs, group_runs, plot_cost, plot_curves, write_csv

    if out.exists() and not out.is_dir():
        _fail(f"--out {out} is a file: give a folder for compare_curves.png, compare_time.png and compare_cost.png")
    if csv is not None and csv.is_dir():
        _fail(f"--csv {csv} is a folder: give a file name such as {csv / 'runs.csv'}")
    try:
        runs = find_runs(paths, warn=lambda text: errors.print(f"[yellow]warning:[/] {escape(text)}"))
        groups = group_runs(runs)
        if csv is not None:
            console.print(f"wrote {write_csv(runs, csv)}")
    except (*user_errors(), FileNotFoundError) as error:
        _fail(error)
    console.print(paper_table(f"{sum(len(g) for g in groups.values())} runs in {len(groups)} groups", groups))
    out.mkdir(parents=True, exist_ok=True)
    for path in (plot_curves("merged vs local models", groups, out / "compare_curves.png"),
                 plot_curves("merged vs local models in simulated time", groups, out / "compare_time.png",
                             x="simulated_time_s"),
                 plot_cost("accuracy vs communication", groups, out / "compare_cost.png")):  # fmt: skip
        console.print(f"wrote {path}")


@app.command()
def presets() -> None:
    """List the named experiments."""
    console.print(
        _listing("presets (gossiplab run --preset NAME)", {n: load_preset(n).description for n in preset_names()})
    )


@app.command()
def parts(
    plugins: Annotated[list[str] | None, typer.Argument(help="plug-in modules whose parts to list as well")] = None,
) -> None:
    """List the parts a config can name: algorithms, topologies, mixing rules and models."""
    from gossiplab.catalogue import load_builtin_parts
    from gossiplab.plugins import import_plugins
    from gossiplab.registry import ALGORITHMS, MIXING_RULES, MODELS, TOPOLOGIES

    load_builtin_parts()
    try:
        import_plugins(plugins or [], untrusted=[])
    except ConfigError as error:
        _fail(error)
    titles = ("algorithms", "topologies", "mixing rules", "models")
    for title, registry in zip(titles, (ALGORITHMS, TOPOLOGIES, MIXING_RULES, MODELS), strict=True):
        rows = {}
        for name in registry.names():
            doc = (registry.get(name).__doc__ or "").strip().split("\n")[0].removesuffix(".")
            across = " (runs across processes)" if registry.property(name, "distributed", False) else ""
            rows[name] = f"{doc}{across}"
        console.print(_listing(f"{title} ({registry.field})", rows))


@app.command()
def report(run_dir: Annotated[Path, typer.Argument(help="a finished run directory")]) -> None:
    """Redraw a finished run's plots, write its self-contained report.html, print its final metrics."""
    from gossiplab.report import replot
    from gossiplab.rundir import read_summary

    try:
        written = replot(run_dir)
    except user_errors() as error:
        _fail(error)
    for path in written:
        console.print(f"wrote {path}")
    console.print(summary_table(read_summary(run_dir)))


data_app = typer.Typer(help="List the data sources, look at one, or see how a config spreads data over sites.")
app.add_typer(data_app, name="data")


@data_app.callback(invoke_without_command=True)
def data_list(context: typer.Context) -> None:
    """List the data sources with sizes, shapes, class counts and how to install each."""
    if context.invoked_subcommand is not None:  # `data show ...` (and its --help) imports what it needs
        return
    from gossiplab.data.sources import SOURCES, SourceMissingError, load_source

    table = Table(title="data sources (data.sources=NAME; a path to an .npz file or image folder also works)")
    for column in ("name", "train", "test", "shape", "classes", "description / install"):
        table.add_column(column)
    for name, info in SOURCES.items():
        try:
            data = load_source(name)
        except SourceMissingError:
            table.add_row(name, "-", "-", "-", "-", f"[yellow]not installed:[/] {info.install}")
            continue
        shape = "x".join(str(s) for s in data.image_shape)
        table.add_row(
            name,
            str(len(data.train_y)),
            str(len(data.test_y)),
            shape,
            str(data.num_classes),
            f"{info.description} ({info.licence})",
        )
    console.print(table)


@data_app.command("show")
def data_show(
    target: Annotated[str, typer.Argument(help="a source name, a preset name, or a config .toml")],
    overrides: Annotated[list[str] | None, typer.Argument(help="key=value overrides for a preset or config")] = None,
    out: Annotated[Path | None, typer.Option(help="where to save the PNG (default data-TARGET.png)")] = None,
) -> None:
    """A source: save a grid of samples per class. A preset or config: print the sites and save a heatmap."""
    from gossiplab.data.federation import build_federation
    from gossiplab.data.show import sample_grid, site_class_heatmap, site_rows
    from gossiplab.data.sources import SOURCES, is_local, load_source

    stem = Path(target).stem.replace("/", "-")
    path = out or Path(f"data-{stem}.png")
    try:
        if target in SOURCES or (is_local(target) and not target.endswith(".toml")):
            if overrides:
                _fail("a source takes no overrides")
            console.print(f"wrote {sample_grid(load_source(target), path)}")
            return
        if target.endswith(".toml"):
            config = build_config(overrides=overrides, path=Path(target))
        elif target in preset_names():
            config = build_config(target, overrides)
        else:
            _fail(f"'{target}' is no source ({', '.join(SOURCES)}), preset ({', '.join(preset_names())}) or .toml file")
        federation = build_federation(config)
    except user_errors() as error:
        _fail(error)
    rows = site_rows(federation)
    table = Table(title=f"{config.name}: {federation.num_sites} sites, {federation.num_classes} classes in all")
    for column in rows[0]:
        table.add_column(column, justify="right" if column in ("site", "train", "val", "test") else "left")
    for row in rows:
        table.add_row(*(str(v) for v in row.values()))
    console.print(table)
    console.print(f"wrote {site_class_heatmap(federation, path, f'{config.name}: class shares per site')}")


@contextmanager
def _many_runs_failing(folder: str, resume: str) -> Iterator[None]:
    """A sweep's or the report's failures, one line each: a diverged run (exit 1), bad input, the folder."""
    from gossiplab.runner import DivergenceError
    from gossiplab.safeload import plain_error

    try:
        yield
    except DivergenceError as error:
        _fail(f"{error} (train.on_divergence=drop goes on without the site; {resume})", 1)
    except user_errors() as error:
        _fail(error)
    except OSError as error:
        _fail(f"{folder}: {plain_error(error)}")


@app.command()
def sweep(
    name: Annotated[str | None, typer.Argument(help="a sweep (none: list them)")] = None,
    overrides: Annotated[list[str] | None, typer.Argument(help="key=value overrides for every variant")] = None,
    sweep_dir: Annotated[
        Path | None, typer.Option(help="where to write (default runs/sweep-NAME-TIME); reuse to resume")
    ] = None,
    seeds: Annotated[int, typer.Option(help="seeds per variant: seed, seed+1, ...")] = 1,
    quiet: Annotated[bool, typer.Option(help="no progress bars")] = False,
    dry_run: Annotated[bool, typer.Option(help="check every variant's config, run nothing")] = False,
) -> None:
    """Run a sweep's variants side by side: a table in the paper's layout and comparison plots."""
    from gossiplab.rundir import claim_new_dir
    from gossiplab.sweep import load_sweep, run_sweep, sweep_names, variant_configs

    if name is None:
        console.print(_listing("sweeps (gossiplab sweep NAME)", {n: load_sweep(n).description for n in sweep_names()}))
        return
    try:
        if seeds < 1:
            raise ConfigError(f"--seeds {seeds}: must be >= 1")
        chosen = load_sweep(name)
        configs = variant_configs(chosen, overrides or [], seeds)
    except ConfigError as error:
        _fail(error)
    if dry_run:
        for (variant, seed), config in configs.items():
            console.print(f"ok: {variant} (seed {seed}): {config.gossip.topology}, schedule {config.gossip.schedule}, "
                          f"final merge {config.gossip.final_merge}")  # fmt: skip
        return
    target = sweep_dir or Path("runs") / f"sweep-{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    with _many_runs_failing(f"sweep directory {target}", "rerun with --sweep-dir to resume"):
        target = target if sweep_dir else claim_new_dir(target)  # a default name is never another sweep's
        target.mkdir(parents=True, exist_ok=True)
        results = run_sweep(chosen, target, overrides or [], seeds, console=errors, show_progress=not quiet)
    console.print(paper_table(f"{name}: {chosen.description}", results))
    written = ", ".join([*sorted(path.name for path in target.glob("*.png")), "sweep.json"])
    console.print(f"sweep directory: {target} ({written})")


MAX_SEEDS = 100
MAX_JOBS = 64


def check_output_folder(folder: Path, option: str) -> None:
    """Before anything runs (a dry run too): `folder` can be made or written, and is not a run's
    folder, whose files a report would overwrite or mix with its own."""
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{option} {folder} is a file: give a folder")
    if RunFolder(folder).holds_a_run():
        raise ConfigError(
            f"{option} {folder} is a run directory: its files would be overwritten; choose another folder"
        )
    existing = next(p for p in (folder, *folder.absolute().parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        why = "is not a folder" if not existing.is_dir() else "is not writable"
        raise ConfigError(f"{option} {folder} cannot be created: {existing} {why}")


def parse_claims(text: str) -> list[int]:
    """'1-3,5' -> [1, 2, 3, 5]; every number must name one of the report's claims."""
    from gossiplab.reproduce import CLAIMS

    chosen: set[int] = set()
    for part in text.split(","):
        low, _, high = part.strip().partition("-")
        try:
            first, last = int(low), int(high or low)
        except ValueError:
            raise ConfigError(f"--claims {text!r}: numbers and ranges like 1-3,5") from None
        if last < first:
            raise ConfigError(f"--claims {text!r}: the range {part.strip()} is empty; write it low-high, e.g. 1-3")
        chosen.update(range(first, last + 1))
    unknown = sorted(chosen - set(CLAIMS))
    if unknown or not chosen:
        raise ConfigError(f"--claims {text!r}: no claim {unknown}; the claims are 1-{max(CLAIMS)}")
    return sorted(chosen)


@app.command()
def reproduce(
    overrides: Annotated[list[str] | None, typer.Argument(help="key=value overrides for every run")] = None,
    out: Annotated[Path, typer.Option(help="the report's folder (one sweep folder per study); reuse to resume")] = Path(
        "reproduction"
    ),
    seeds: Annotated[int, typer.Option(help="seeds per variant: seed, seed+1, ...")] = 3,
    claims: Annotated[str, typer.Option(help="which claims, e.g. 1-3,5")] = "1-12",
    quiet: Annotated[bool, typer.Option(help="no progress bars")] = False,
    dry_run: Annotated[bool, typer.Option(help="check every run's config, run nothing")] = False,
    jobs: Annotated[
        int, typer.Option(help="runs at once, in worker processes (with train.threads=1: at most one per core)")
    ] = 1,
) -> None:
    """The papers' twelve claims on our data: run their studies over seeds, write report.md/report.html."""
    from gossiplab.reproduce import run_studies, studies_for, study_sweep, write_report
    from gossiplab.sweep import variant_configs

    try:
        if not 1 <= seeds <= MAX_SEEDS:
            raise ConfigError(f"--seeds {seeds}: must be in 1..{MAX_SEEDS} (every seed runs every variant of a study)")
        if not 1 <= jobs <= MAX_JOBS:
            raise ConfigError(f"--jobs {jobs}: must be in 1..{MAX_JOBS} (worker processes, each running one run)")
        check_output_folder(out, "--out")
        chosen = parse_claims(claims)
        configs = {name: variant_configs(study_sweep(name), overrides or [], seeds) for name in studies_for(chosen)}
    except ConfigError as error:
        _fail(error)
    if dry_run:
        for name, runs in configs.items():
            console.print(f"ok: {name}: {len(runs)} runs ({', '.join(sorted({v for v, _ in runs}))})")
        return
    with _many_runs_failing(f"report folder {out}", "the same --out resumes"):
        out.mkdir(parents=True, exist_ok=True)
        results = run_studies(chosen, out, seeds, overrides or [], console=errors, show_progress=not quiet, jobs=jobs)
        md, page, verdicts = write_report(chosen, results, out, seeds)
    table = Table(title=f"reproduction: {seeds} seed(s)")
    for column in ("#", "claim", "ours", "verdict"):
        table.add_column(column)
    for v in verdicts:
        table.add_row(str(v["claim"]), v["statement"], v["ours"], v["verdict"])
    console.print(table)
    console.print(f"wrote {md} and {page}")


@app.command()
def landscape(
    run_dir: Annotated[Path, typer.Argument(help="a run directory")],
    metric: Annotated[str, typer.Option(help="loss or accuracy")] = "loss",
    resolution: Annotated[int, typer.Option(help="grid points per axis")] = 31,
    samples: Annotated[int, typer.Option(help="global test samples evaluated per point")] = 1000,
    after_merge: Annotated[
        bool, typer.Option(help="use the final models, not the ones before the final merge")
    ] = False,
) -> None:
    """The loss/accuracy landscape of up to 16 sites' models on a Wachspress polygon (PNG)."""
    import torch

    from gossiplab.assembly import build_experiment
    from gossiplab.landscape import MAX_MODELS, plot_landscape
    from gossiplab.landscape import landscape as compute
    from gossiplab.runner import load_run_config
    from gossiplab.safeload import load_tensors

    if metric not in ("loss", "accuracy"):
        _fail(f"--metric {metric}: must be loss or accuracy")
    if resolution < 3 or samples < 1:
        _fail("--resolution must be >= 3 and --samples >= 1")
    files = RunFolder(run_dir)
    source = files.checkpoint if after_merge or not files.premerge_theta.is_file() else files.premerge_theta
    try:
        config = load_run_config(run_dir, finished_ok=True)
        experiment = build_experiment(config)
    except user_errors() as error:
        _fail(error)
    try:
        loaded = load_tensors(source, "checkpoint")
    except file_errors() as error:
        _fail(error)
    theta = loaded["theta"] if isinstance(loaded, dict) else loaded
    federation = experiment.federation
    chosen = torch.randperm(len(federation.test_y), generator=torch.Generator().manual_seed(0))[:samples]
    count = min(MAX_MODELS, len(theta))
    if count < 3:
        _fail(f"{run_dir} has {len(theta)} sites; the polygon needs at least 3")
    points, losses, accuracies = compute(
        experiment.population, theta[:count], federation.test_x[chosen], federation.test_y[chosen], resolution
    )
    values = losses if metric == "loss" else accuracies
    label = "before the final merge" if source == files.premerge_theta else "at the end"
    path = plot_landscape(
        points,
        values,
        [f"site {i}" for i in range(count)],
        run_dir / f"landscape_{metric}.png",
        f"{config.name}: {count} models {label}",
        metric,
    )
    centre = int(torch.argmin(points.norm(dim=1)))
    console.print(
        f"merged model (centre): loss {losses[centre]:.4f}, accuracy {accuracies[centre]:.4f}; "
        f"vertices: mean loss {losses[-count:].mean():.4f}, mean accuracy {accuracies[-count:].mean():.4f}"
    )
    console.print(f"wrote {path}")


@contextmanager
def _table_filled_live(table: Table) -> Iterator[None]:
    """In a terminal, `table` shows its rows as they are added; piped to a file or a CI log, it is
    printed whole at the end, at its natural width (rich would cut a wide table's cells to fit the
    console's columns, and a table with more columns than a fixed width wraps its headers)."""
    if console.is_terminal:
        with Live(table, console=console, refresh_per_second=2):
            yield
    else:
        yield
        Console(width=10_000).print(table)


def _bench_distributed(counts: list[int], rounds: int, json_path: Path | None) -> None:
    from gossiplab.bench_distributed import run as run_processes

    table = Table(title="one gossip round (local step + exchange) with the sites in K processes on loopback")
    for column in ("N", "topology", "K", "MAC", "ms/round", "vs K=1", "local step ms", "exchange ms",
                   "analytic MB", "payload MB", "loopback MB"):  # fmt: skip
        table.add_column(column, justify="right")
    results = []
    with _table_filled_live(table):
        for count in counts:
            for topology in ("ring", "complete"):
                single = None
                for processes, secret in ((1, False), (2, False), (2, True), (4, False), (4, True)):
                    row = run_processes(processes, topology, count, rounds, secret)
                    single = single or row["round_ms"]
                    results.append(row)
                    wire = row["loopback_bytes_per_round"]
                    table.add_row(
                        str(count),
                        topology,
                        str(processes),
                        "yes" if secret else "",
                        f"{row['round_ms']:.1f}",
                        f"{single / row['round_ms']:.2f}x",
                        f"{row['local_step_ms']:.1f}",
                        f"{row['exchange_ms']:.1f}",
                        f"{row['analytic_bytes_per_round'] / 1e6:.2f}",
                        f"{row['payload_bytes_per_round'] / 1e6:.2f}",
                        "-" if wire is None else f"{wire / 1e6:.2f}",
                    )
    console.print(
        f"\n{os.cpu_count()} cores shared by the K processes (cores/K threads each); 'vs K=1' above 1 is faster "
        "than one process. MAC: with a join secret, every payload carries an HMAC-SHA256 tag (sent, checked). "
        "MB per round: analytic = rows neighbours need x P x 4 bytes; payload = what the "
        "processes handed gloo; loopback = bytes that crossed lo (with headers, store and metric traffic)."
    )
    if json_path is not None:
        json_path.write_text(json.dumps(results, indent=2))
        console.print(f"wrote {json_path}")


def _bench_busy(repeats: int, seconds: float, json_path: Path | None) -> None:
    from gossiplab import OPENMP_SPIN_COUNT
    from gossiplab.bench_busy import SITES
    from gossiplab.bench_busy import run as run_busy

    table = Table(title=f"the default's step ({SITES}-site MLP, B = 32) by OpenMP spin count, each in a fresh process")
    for column in ("machine", "threads", "steps/s, libgomp's 300,000 spins", f"steps/s, {OPENMP_SPIN_COUNT} spins",
                   "ratio"):  # fmt: skip
        table.add_column(column, justify="right")
    with _table_filled_live(table):
        rows = run_busy(repeats, seconds)
        for row in rows:
            table.add_row(
                "one core busy" if row["busy_core"] else "idle",
                f"{row['threads']} of {row['cores']} cores",
                f"{row['stock_steps_per_s']:.1f}",
                f"{row['gossiplab_steps_per_s']:.1f}",
                f"{row['gossiplab_steps_per_s'] / row['stock_steps_per_s']:.2f}x",
            )
    console.print(
        "one core busy: another process spins on one core meanwhile. gossiplab sets GOMP_SPINCOUNT="
        f"{OPENMP_SPIN_COUNT} when imported before PyTorch, unless it is set"
    )
    if json_path is not None:
        json_path.write_text(json.dumps(rows, indent=2))
        console.print(f"wrote {json_path}")


def _bench_network(counts: list[int], steps: int, repeats: int, json_path: Path | None) -> None:
    from gossiplab.bench_network import VARIANTS
    from gossiplab.bench_network import run as run_network

    table = Table(title=f"the default's training step under a simulated network, gossip every step, {steps} steps "
                  "(ratios measured side by side)")  # fmt: skip
    table.add_column("N", justify="right")
    for name in VARIANTS:
        table.add_column(f"{name} steps/s", justify="right")
        if name != "synchronous":
            table.add_column("vs synchronous", justify="right")
    with _table_filled_live(table):
        rows = run_network(counts, steps, repeats)
        for row in rows:
            cells = [str(row["sites"])]
            for name in VARIANTS:
                cells.append(f"{row[name]['steps_per_s']:.1f}")
                if name != "synchronous":
                    cells.append(f"{row[name]['vs_synchronous']:.2f}x")
            table.add_row(*cells)
    console.print(
        "churn + loss: each step a site leaves with probability 0.01 and returns with 0.05, each message is lost "
        "with probability 0.5; CHOCO: top-10% of x - x_hat per message; AD-PSGD tick: one loop step of AD-PSGD "
        "over a ring"
    )
    if json_path is not None:
        json_path.write_text(json.dumps(rows, indent=2))
        console.print(f"wrote {json_path}")


@app.command("bench")
def bench_command(
    models: Annotated[str, typer.Option(help="comma-separated: mlp, cnn, head, linear-head")] = "mlp,cnn,head",
    sites: Annotated[
        str | None, typer.Option(help="comma-separated numbers of sites (default 4,16,64,256; --distributed: 16)")
    ] = None,
    repeats: Annotated[int, typer.Option(help="interleaved repeats per measurement (median)")] = 3,
    seconds: Annotated[float, typer.Option(help="minimum seconds per timing")] = 0.2,
    json_path: Annotated[Path | None, typer.Option("--json", help="also write the table as JSON here")] = None,
    distributed: Annotated[
        bool, typer.Option("--distributed", help="time a gossip round with the sites in 1, 2 and 4 processes")
    ] = False,
    rounds: Annotated[
        int, typer.Option(help="--distributed: timed rounds per measurement; --network: steps per run")
    ] = 20,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:K, mps or auto: where the engine runs")] = "cpu",
    busy: Annotated[
        bool,
        typer.Option("--busy", help="the default's step, idle and with one core busy, by OpenMP spin count"),
    ] = False,
    network: Annotated[
        bool,
        typer.Option("--network", help="the default's step under churn, message loss and CHOCO compression"),
    ] = False,
) -> None:
    """Engine vs per-site loop, GFLOP/s vs the shape-matched kernel limit, gossip vs one copy (one run)."""
    from gossiplab.bench import MODELS, as_json, bench

    chosen = [m.strip() for m in models.split(",") if m.strip()]
    unknown = [m for m in chosen if m not in MODELS]
    sites = sites or ("16" if distributed else "16,64" if network else "4,16,64,256")
    try:
        counts = [int(n) for n in sites.split(",")]
    except ValueError:
        counts = []
    if unknown or not chosen:
        _fail(f"--models {models}: allowed values are {', '.join(MODELS)}")
    if not counts or min(counts) < 1:
        _fail(f"--sites {sites}: must be comma-separated integers >= 1")
    if repeats < 1 or seconds <= 0 or rounds < 1:
        _fail("--repeats and --rounds must be >= 1 and --seconds > 0")
    from gossiplab.devices import device_problem, resolve_device

    if device_problem(device):
        _fail(f"--device {device}: {device_problem(device)}")
    if distributed and device != "cpu":
        _fail(f"--device {device}: --distributed times the CPU (gloo) runtime; leave --device at cpu")
    if json_path is not None and (json_path.is_dir() or not json_path.parent.is_dir()):
        _fail(f"--json {json_path}: must be a file path in an existing folder (checked before the benchmark runs)")
    if busy and (distributed or device != "cpu"):
        _fail("--busy times the CPU in fresh processes; leave out --distributed and --device")
    if network and (busy or distributed or device != "cpu"):
        _fail("--network times the simulated network on the CPU in this process; leave out --busy, --distributed "
              "and --device")  # fmt: skip
    if network:
        from gossiplab.bench_network import WARMUP_STEPS

        if rounds <= WARMUP_STEPS:
            _fail(f"--rounds {rounds}: --network times the steps after {WARMUP_STEPS} warm-up steps; give more")
        _bench_network(counts, rounds, repeats, json_path)
        return
    if busy:
        _bench_busy(repeats, seconds, json_path)
        return
    if distributed:
        if min(counts) < 4:
            _fail(f"--sites {sites}: --distributed splits the sites over up to 4 processes; give at least 4")
        _bench_distributed(counts, rounds, json_path)
        return
    target = resolve_device(device)
    table = Table(title=f"one training step on {target}, B = 32 per site (ratios measured side by side)")
    for column in (
        "model",
        "N",
        "strategy",
        "loop steps/s",
        "engine steps/s",
        "engine/loop",
        "other strategy",
        "optimizer share",
        "GFLOP/s",
        "of kernel limit",
        "of GEMM peak",
        "gossip ring / copy",
        "gossip complete / copy",
        "bytes / site",
        "resident GB",
    ):
        table.add_column(column, justify="right")

    def shown(value: float | None, form: str) -> str:
        return "-" if value is None else format(value, form)

    def add(row) -> None:
        other = (
            None if row.other_strategy_steps_per_s is None else row.other_strategy_steps_per_s / row.engine_steps_per_s
        )
        table.add_row(
            row.model,
            f"{row.sites:,}",
            row.strategy,
            shown(row.loop_steps_per_s, ".1f"),
            f"{row.engine_steps_per_s:.2f}",
            shown(row.speedup, ".2f") + "x" * (row.speedup is not None),
            shown(other, ".2f") + "x" * (other is not None),
            f"{row.optimizer_share:.0%}",
            f"{row.gflops:.1f}",
            shown(row.fraction_of_kernel_limit, ".0%"),
            f"{row.fraction_of_peak:.0%}",
            f"{row.gossip_ring_vs_copy:.2f}x",
            shown(row.gossip_complete_vs_copy, ".2f") + "x" * (row.gossip_complete_vs_copy is not None),
            f"{row.bytes_per_site:,}",
            f"{row.resident_gb:.2f}",
        )

    with _table_filled_live(table):
        rows, peak = bench(chosen, counts, repeats, seconds, on_row=add, device=target)
    console.print(
        f"square-GEMM peak (2048x2048) {peak:.1f} GFLOP/s with {__import__('torch').get_num_threads()} threads; "
        "'other strategy' is its speed relative to the one 'auto' picked"
    )
    if json_path is not None:
        json_path.write_text(json.dumps(as_json(rows, peak, str(target)), indent=1))
        console.print(f"wrote {json_path}")


BUG_REPORT = (
    "this is a bug in gossiplab {version} (torch {torch}, Python {python}), not a mistake of yours: please "
    "report it with the command you ran and the traceback above"
)


def main() -> None:
    """Every command's one rule: a user's mistake or a fault of the environment (a full disk, a file
    that cannot be read) is one line naming the input, exit code 2; anything else is a bug, shown
    with its traceback and how to report it (exit code 1)."""
    try:
        app()
    except SystemExit:  # click's own exit (--help, --version, a command's code): matched before the
        raise  # user errors below, whose modules import PyTorch
    except (*user_errors(), *file_errors()) as error:
        if error.__cause__ is not None and debugging():
            traceback.print_exception(error.__cause__)
        errors.print(f"[bold red]error:[/] {escape(str(error))}", highlight=False)
        sys.exit(2)
    except OSError as error:
        where = f"{error.filename}: " if error.filename else ""
        errors.print(f"[bold red]error:[/] {escape(where + (error.strerror or str(error)))}", highlight=False)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as error:
        fault = plugin_fault(error)  # raised in a plug-in's code: the plug-in's fault, named
        if fault is not None:
            if debugging():
                traceback.print_exception(error)
            errors.print(f"[bold red]error:[/] {escape(str(fault))}", highlight=False)
            sys.exit(2)
        import platform

        import torch

        errors.print_exception()
        errors.print(BUG_REPORT.format(version=__version__, torch=torch.__version__, python=platform.python_version()))
        sys.exit(1)


# the command tree as a click command (typer builds on click): the documentation's command-line
# reference is generated from it
click_command = typer.main.get_command(app)
