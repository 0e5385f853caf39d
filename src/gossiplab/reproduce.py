"""The reproduction report: the source papers' twelve claims, the published numbers and ours side by side.

`gossiplab reproduce` runs the studies the claims rest on (the sweeps of gossiplab/sweeps, each
needed variant over `seeds` seeds: seed, seed + 1, ...), measures every claim on them and writes
REPORT/report.md and REPORT/report.html: one verdict per claim, the paper's numbers with the table or
figure they come from (gossiplab/papers/claims.toml), ours as mean ± sd over the seeds (percent,
as the papers print them), each study's table and its plots. A rerun reuses finished runs and
resumes unfinished ones, so the report can be rebuilt, or extended to more seeds, cheaply.

Verdicts, each claim's rule stated with it: **holds** (the paper's direction in every seed, and the
size the claim states), **partly** (the direction on the mean but not in every seed, or short of the
stated size), **does not hold** (the mean goes the other way), **not enough seeds** (a rule about
every seed, or about the seeds' spread, needs at least MIN_SEEDS). Each claim is stated as its paper's
own table or figure shows it. Claim 10 is a theorem of the graph construction, not an empirical claim
of the papers: it is reported as a correctness check, apart from the claims' tally. Our data is scaled to 2 CPU cores
(Fashion-MNIST and small real multi-domain sets, frozen small encoders, MLP heads, a few thousand
steps), so a verdict says whether the claim's *direction* survives on our data, not its numbers.
"""

from __future__ import annotations

import dataclasses
import html
import json
import math
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console

from gossiplab.report import figure_html
from gossiplab.rundir import atomic_write
from gossiplab.sweep import Sweep, load_sweep, pending_runs, run_in_processes, run_sweep

MIN_SEEDS = 2  # "in every seed" and a seeds' spread mean nothing with one seed
CHECKS = {10}  # correctness checks (theorems), reported apart from the papers' claims
PERCENT = {"ala", "aga", "mmga", "ala_aga_mean", "matched_mmga", "worst10_local"}  # summary fields in [0, 1]
Results = dict[str, dict[str, list[dict[str, Any]]]]  # study -> variant -> one summary per seed


@dataclass(frozen=True)
class Study:
    """A sweep, or some of its variants, that claims are measured on."""

    sweep: str
    variants: tuple[str, ...] = ()  # empty: every variant


STUDIES = {
    "mazel-table1": Study(
        "mazel-table1",
        (
            "MDSL random uniform",
            "MDSL local",
            "MAZEL random uniform",
            "MAZEL local",
            "MAZEL random uniform cross-domain",
            "MAZEL local cross-domain",
        ),
    ),
    "mazel-table2": Study("mazel-table2", ("A+D+G", "A+D+E", "A+D+F", "A+D+F random")),
    "mazel-rounds": Study("mazel-rounds", tuple(f"MAZEL {r}" for r in (1, 2, 4, 5, 7, 10, 21, 43))),
    "dimat-table": Study(
        "dimat-table", ("DIMAT-MSGD full", "WA full", "SGP full", "CDSGD full", "DIMAT-MSGD ring", "WA ring")
    ),
    "merge-budget": Study("merge-budget", ("R 0.2", "complete", "local-only")),
    "merge-window": Study("merge-window"),
    "l2c-table": Study("l2c-table", ("Local SGD", "D-PSGD ring", "L2C", "L2C no pruning")),
}


@dataclass
class Verdict:
    ours: str  # our numbers, in the paper's terms
    verdict: str  # holds / partly / does not hold
    why: str  # the rule applied, and what decided it


def metric(results: Results, study: str, variant: str, key: str) -> np.ndarray:
    """One summary value per seed (`a.b` reads a nested field), in percent for accuracies."""
    values = []
    for summary in results[study][variant]:
        value: Any = summary
        for part in key.split("."):
            value = value[part]
        values.append(float(value))
    array = np.array(values)
    return array * 100 if key.removeprefix("before_final_merge.").removeprefix("start.") in PERCENT else array


def spread(values: np.ndarray, digits: int = 1) -> str:
    """mean ± sd over seeds (sd 0 for one seed)."""
    sd = float(values.std(ddof=1)) if len(values) > 1 else 0.0
    return f"{values.mean():.{digits}f} ± {sd:.{digits}f}"


def direction(better: np.ndarray, worse: np.ndarray) -> str:
    """holds: better > worse in every seed; partly: on the mean only; does not hold otherwise."""
    if bool((better > worse).all()):
        return "holds"
    return "partly" if better.mean() > worse.mean() else "does not hold"


def start_and_cross_domain(r: Results, variant: str, key: str) -> str:
    """MAZEL's simulated pre-training start (step-0 AGA) and the cross-domain variant's value of `key`."""
    start = metric(r, "mazel-table1", variant, "start.aga")
    cross = metric(r, "mazel-table1", f"{variant} cross-domain", key)
    cross_start = metric(r, "mazel-table1", f"{variant} cross-domain", "start.aga")
    return (
        f"MAZEL starts (step 0, simulated pre-training) at AGA {spread(start)}; pre-aligned cross-domain instead, "
        f"it starts at {spread(cross_start)} and ends at {spread(cross)}"
    )


def claim_1(r: Results) -> Verdict:
    mazel, mdsl = (metric(r, "mazel-table1", f"{s} local", "aga") for s in ("MAZEL", "MDSL"))
    gain = mazel.mean() / mdsl.mean() - 1
    verdict = direction(mazel, mdsl)
    if verdict == "holds" and gain < 0.28:
        verdict = "partly"
    return Verdict(
        f"local-only AGA: MAZEL {spread(mazel)} vs MDSL {spread(mdsl)} ({gain:+.0%}); "
        f"{start_and_cross_domain(r, 'MAZEL local', 'aga')}",
        verdict,
        "'far better': MAZEL above MDSL in every seed and by at least half the paper's relative gain "
        f"(paper +57%, so >= +28%); ours {gain:+.0%}",
    )


def claim_2(r: Results) -> Verdict:
    mazel, mdsl = (metric(r, "mazel-table1", f"{s} random uniform", "convergence_step.aga") for s in ("MAZEL", "MDSL"))
    start = metric(r, "mazel-table1", "MAZEL random uniform", "start.aga")
    end = metric(r, "mazel-table1", "MAZEL random uniform", "aga")
    verdict = direction(-mazel, -mdsl)
    vacuous = verdict == "holds" and bool((mazel == 0).all())
    return Verdict(
        f"steps to 95% of the best AGA, random uniform: MAZEL {spread(mazel, 0)} vs MDSL {spread(mdsl, 0)} "
        f"(MAZEL's AGA at step 0 {spread(start)}, at the end {spread(end)})",
        "partly" if vacuous else verdict,
        "MAZEL reaches 95% of its best AGA in fewer steps than MDSL, in every seed"
        + ("; partly: MAZEL's best AGA is its start in every seed (training only lowers it), so it 'converges' at "
           "step 0 without learning" if vacuous else ""),
    )  # fmt: skip


def claim_3(r: Results) -> Verdict:
    mazel, mdsl = (metric(r, "mazel-table1", f"{s} random uniform", "gossip_gain") for s in ("MAZEL", "MDSL"))
    small, large = mazel.mean() < 4, mdsl.mean() >= 21
    verdict = "holds" if small and large else "partly" if mazel.mean() < mdsl.mean() else "does not hold"
    cross = metric(r, "mazel-table1", "MAZEL random uniform cross-domain", "gossip_gain")
    return Verdict(
        f"Gossip Gain, random uniform: MAZEL {spread(mazel)}% vs MDSL {spread(mdsl)}% (MAZEL pre-aligned "
        f"cross-domain {spread(cross)}%)",
        verdict,
        "holds: MAZEL's mean < 4% and MDSL's >= 21%; partly: MAZEL's below MDSL's only",
    )


def claim_4(r: Results) -> Verdict:
    uniform, two_stage, cosine, cosine_random = (
        metric(r, "mazel-table2", v, "ala_aga_mean") for v in ("A+D+G", "A+D+E", "A+D+F", "A+D+F random")
    )
    return Verdict(
        f"(ALA+AGA)/2 at 9 rounds: two-stage {spread(two_stage)}, uniform {spread(uniform)}; cosine "
        f"{spread(cosine)}, cosine with random rounds {spread(cosine_random)}",
        direction(two_stage, uniform),
        "two-stage above uniform in every seed, as in the paper's Table 2 (78.06 vs 75.38); the paper's cosine "
        "column is below uniform (73.27), so cosine is shown, not judged",
    )


def claim_5(r: Results) -> Verdict:
    rounds = [int(v.split()[-1]) for v in r["mazel-rounds"]]
    ala = np.stack([metric(r, "mazel-rounds", f"MAZEL {k}", "ala") for k in rounds])  # [rounds, seeds]
    mean, sd = ala.mean(1), ala.std(1, ddof=1) if ala.shape[1] > 1 else np.zeros(len(rounds))
    low = int(mean.argmin())
    interior = 0 < low < len(rounds) - 1
    rise = min(mean[0], mean[-1]) - mean[low]
    noise = float(sd[low]) + 1e-9
    verdict = "holds" if interior and rise > 2 * noise else "partly" if interior else "does not hold"
    listing = ", ".join(f"{k}: {m:.1f}" for k, m in zip(rounds, mean, strict=True))
    return Verdict(
        f"MAZEL ALA by rounds ({listing}); lowest at {rounds[low]} rounds",
        verdict,
        f"holds: the lowest mean ALA at an interior round count, both ends above it by more than twice its "
        f"seed sd ({rise:.2f} vs {2 * noise:.2f} points)",
    )


def claim_6(r: Results) -> Verdict:
    full = metric(r, "dimat-table", "DIMAT-MSGD full", "aga"), metric(r, "dimat-table", "WA full", "aga")
    ring = metric(r, "dimat-table", "DIMAT-MSGD ring", "aga"), metric(r, "dimat-table", "WA ring", "aga")
    matched = metric(r, "dimat-table", "DIMAT-MSGD ring", "matched_mmga")
    on_par = full[0].mean() >= full[1].mean() - ON_PAR_POINTS
    far_above = bool((ring[0] - ring[1] >= FAR_ABOVE_POINTS).all())
    ring_direction = ring[0].mean() > ring[1].mean()
    verdict = "holds" if on_par and far_above else "partly" if ring_direction or on_par else "does not hold"
    return Verdict(
        f"AGA: ring DIMAT {spread(ring[0])} vs WA {spread(ring[1])} (matched merge of all models "
        f"{spread(matched)}); fully connected DIMAT {spread(full[0])} vs WA {spread(full[1])}",
        verdict,
        f"as the paper's Table 2 shows it: on the ring (the telling case) DIMAT at least {FAR_ABOVE_POINTS} points "
        f"above WA in every seed (paper 20.45 vs 8.00), and fully connected on par, its mean at most "
        f"{ON_PAR_POINTS} points below WA's (paper 62.05 vs 62.70); partly: one of the two, or the ring's "
        "direction on the mean",
    )


ON_PAR_POINTS = 2.0  # claim 6, fully connected: "on par" (the paper's DIMAT is 0.65 points below WA)
FAR_ABOVE_POINTS = 6.0  # claim 6, ring: "far above", half the paper's margin of 12.45 points


def claim_7(r: Results) -> Verdict:
    merged = [metric(r, "dimat-table", v, "aga") for v in ("DIMAT-MSGD full", "WA full")]
    mixed = [metric(r, "dimat-table", v, "aga") for v in ("SGP full", "CDSGD full")]
    margin = np.minimum(*merged) - np.maximum(*mixed)
    verdict = "holds" if bool((margin >= 10).all()) else "partly" if margin.mean() > 0 else "does not hold"
    return Verdict(
        f"AGA, fully connected: DIMAT {spread(merged[0])}, WA {spread(merged[1])}, SGP {spread(mixed[0])}, "
        f"CDSGD {spread(mixed[1])}",
        verdict,
        f"'far above': the lower of DIMAT/WA at least 10 points above the higher of SGP/CDSGD in every seed "
        f"(paper: about 50); ours {spread(margin)}",
    )


def claim_8(r: Results) -> Verdict:
    low = metric(r, "merge-budget", "R 0.2", "aga")
    before = metric(r, "merge-budget", "R 0.2", "before_final_merge.aga")
    full = metric(r, "merge-budget", "complete", "aga")
    alone = metric(r, "merge-budget", "local-only", "aga")
    gap = full - low
    recovered = (low - before) / np.maximum(full - before, 1e-9)
    if bool((gap <= 0.05 * full).all()):
        verdict = "holds"
    else:  # the report's own definitions: the right direction (the merge brings R 0.2 towards full) is 'partly'
        verdict = "partly" if low.mean() > before.mean() else "does not hold"
    return Verdict(
        f"AGA after the final merge: R 0.2 {spread(low)} (before it {spread(before)}), full communication "
        f"{spread(full)}, no communication {spread(alone)}; the merge closes {recovered.mean():.0%} of the gap "
        "between R 0.2's models and full communication",
        verdict,
        f"holds: 'close', within 5% (relative) of full communication in every seed; partly: the merge raises R "
        f"0.2's AGA towards full communication (on the mean) but not that close; the gap is {spread(gap)} points",
    )


def claim_9(r: Results) -> Verdict:
    early, middle, late = (
        metric(r, "merge-window", v, "before_final_merge.aga")
        for v in ("early [1, 300]", "middle [1401, 1700]", "late [2701, 3000]")
    )
    merged = [metric(r, "merge-window", v, "aga") for v in ("early [1, 300]", "late [2701, 3000]")]
    return Verdict(
        f"AGA at the end, before the merge: early {spread(early)}, middle {spread(middle)}, late {spread(late)}; "
        f"after the merge early {spread(merged[0])}, late {spread(merged[1])}",
        direction(late, early),
        "the late window's AGA at the end of training (the paper's metric: no merge) above the early one's, in "
        "every seed",
    )


def exact_average_rounds(num_sites: int, topology: str, rounds: int) -> float:
    """Largest distance to the exact average after `rounds` rounds of uniform gossip (float64)."""
    from gossiplab.mixing import uniform
    from gossiplab.topology import build_adjacency

    x = torch.randn(num_sites, 1000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    target = x.mean(0)
    for round_index in range(rounds):
        x = uniform(build_adjacency(topology, num_sites, round_index, seed=0)).double() @ x
    return float((x - target).abs().max())


def claim_10(r: Results) -> Verdict:
    rows = {
        (n, topology): exact_average_rounds(n, topology, math.ceil(math.log2(n)))
        for n in (16, 64, 12)
        for topology in ("one-peer-exponential", "random-one-peer", "ring")
    }
    powers = [rows[(n, "one-peer-exponential")] for n in (16, 64)]
    verdict = "holds" if max(powers) < 1e-12 else "does not hold"
    listing = "; ".join(f"N {n} {t}: {d:.1e}" for (n, t), d in rows.items())
    return Verdict(
        f"largest distance to the exact average after ceil(log2 N) rounds ({listing})",
        verdict,
        "exact (< 1e-12 in float64) for N a power of two; N = 12 shows the condition matters",
    )


def claim_11(r: Results) -> Verdict:
    """Measured without pruning: pruned to 3 neighbours, the weights on the others are 0 by construction."""
    same = metric(r, "l2c-table", "L2C no pruning", "learned_weight_same_task")
    other = metric(r, "l2c-table", "L2C no pruning", "learned_weight_other_task")
    pruned = metric(r, "l2c-table", "L2C", "learned_weight_other_task")
    ratio = same / np.maximum(other, 1e-6)
    verdict = "holds" if bool((ratio >= 2).all()) else "partly" if same.mean() > other.mean() else "does not hold"
    return Verdict(
        f"L2C without pruning, mean learned weight on a site sharing a class {spread(same, 3)} vs on the others "
        f"{spread(other, 3)} ({spread(ratio)}x); pruned to 3 neighbours, weight left on other-task sites "
        f"{spread(pruned, 3)}",
        verdict,
        "'concentrate': a site sharing a class gets at least twice the weight of one that does not, in every seed",
    )


def claim_12(r: Results) -> Verdict:
    l2c = metric(r, "l2c-table", "L2C", "ala"), metric(r, "l2c-table", "L2C", "worst10_local")
    local = metric(r, "l2c-table", "Local SGD", "ala"), metric(r, "l2c-table", "Local SGD", "worst10_local")
    dpsgd = metric(r, "l2c-table", "D-PSGD ring", "ala")
    verdicts = [direction(l2c[0] + 1e-9, dpsgd), direction(l2c[0] + 1e-9, local[0]), direction(l2c[1] + 1e-9, local[1])]
    verdict = "holds" if set(verdicts) == {"holds"} else "does not hold" if set(verdicts) == {
        "does not hold"} else "partly"  # fmt: skip
    return Verdict(
        f"mean local accuracy: L2C {spread(l2c[0])}, D-PSGD {spread(dpsgd)}, local SGD {spread(local[0])}; "
        f"worst 10%: L2C {spread(l2c[1])}, local SGD {spread(local[1])}",
        verdict,
        f"as the paper's Tables 2 and 3 report it: L2C >= D-PSGD on the mean ({verdicts[0]}), L2C >= local SGD on "
        f"the mean ({verdicts[1]}: the telling comparison, 90.14 vs 87.50 in the paper) and on the worst 10% "
        f"({verdicts[2]}; the paper reports no worst 10% for D-PSGD), each in every seed",
    )


CLAIMS: dict[int, tuple[tuple[str, ...], Callable[[Results], Verdict]]] = {
    1: (("mazel-table1",), claim_1),
    2: (("mazel-table1",), claim_2),
    3: (("mazel-table1",), claim_3),
    4: (("mazel-table2",), claim_4),
    5: (("mazel-rounds",), claim_5),
    6: (("dimat-table",), claim_6),
    7: (("dimat-table",), claim_7),
    8: (("merge-budget",), claim_8),
    9: (("merge-window",), claim_9),
    10: ((), claim_10),
    11: (("l2c-table",), claim_11),
    12: (("l2c-table",), claim_12),
}


def paper_claims() -> dict[int, dict[str, Any]]:
    """The published side of every claim: statement, numbers and their source (claims.toml)."""
    text = (resources.files("gossiplab") / "papers" / "claims.toml").read_text()
    return {int(k): v for k, v in tomllib.loads(text).items()}


def studies_for(claims: list[int]) -> list[str]:
    """The studies the claims are measured on, each once."""
    return sorted({study for claim in claims for study in CLAIMS[claim][0]})


def study_sweep(name: str) -> Sweep:
    """The study's sweep, restricted to the variants it needs."""
    study = STUDIES[name]
    sweep = load_sweep(study.sweep)
    if study.variants:
        sweep = dataclasses.replace(sweep, variants={v: sweep.variants[v] for v in study.variants})
    return sweep


def run_studies(
    claims: list[int],
    out: Path,
    seeds: int,
    extra: list[str],
    console: Console | None = None,
    show_progress: bool = True,
    jobs: int = 1,
) -> Results:
    """Run (or finish) every study the claims need, each in out/STUDY; return the summaries.
    With `jobs` > 1 the unfinished runs of all the studies first run in that many processes."""
    if jobs > 1:
        runs = [
            run for name in studies_for(claims) for run in pending_runs(study_sweep(name), out / name, extra, seeds)
        ]
        run_in_processes(runs, jobs, console)
    return {
        name: run_sweep(study_sweep(name), out / name, extra, seeds, console=console, show_progress=show_progress)
        for name in studies_for(claims)
    }


def study_table(results: dict[str, list[dict[str, Any]]]) -> tuple[list[str], list[list[str]]]:
    """Each variant's final metrics, mean ± sd over seeds, in percent."""
    keys = [("ALA", "ala"), ("AGA", "aga"), ("MMGA", "mmga"), ("Gossip Gain (%)", "gossip_gain")]
    header = ["variant", "seeds", *(label for label, _ in keys)]
    rows = []
    for variant, summaries in results.items():
        row = [variant, str(len(summaries))]
        for _, key in keys:
            values = np.array([s[key] for s in summaries], dtype=float)
            row.append(spread(values * (100 if key in PERCENT else 1)))
        rows.append(row)
    return header, rows


def plot_rounds(results: dict[str, list[dict[str, Any]]], path: Path) -> Path:
    """Claim 5's figure: ALA, AGA and MMGA against gossip rounds, mean and sd over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [int(v.split()[-1]) for v in results]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for key, label in (("ala", "ALA"), ("aga", "AGA"), ("mmga", "MMGA")):
        values = np.array([[s[key] * 100 for s in results[v]] for v in results])
        sd = values.std(1, ddof=1) if values.shape[1] > 1 else np.zeros(len(rounds))
        ax.errorbar(rounds, values.mean(1), yerr=sd, marker="o", capsize=3, label=label)
    ax.set(xscale="log", xlabel="gossip rounds", ylabel="accuracy (%)", title="MAZEL 8-site: metrics vs rounds")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(claims: list[int], results: Results, out: Path, seeds: int) -> tuple[Path, Path, list[dict]]:
    """report.md, report.html and claims.json in `out`; returns their paths and the verdict rows."""
    papers = paper_claims()
    verdicts = []
    for number in claims:
        measured = CLAIMS[number][1](results)
        studies = CLAIMS[number][0]
        if studies and seeds < MIN_SEEDS:
            measured.why += f" (with {seeds} seed the rule gave '{measured.verdict}'; it needs {MIN_SEEDS} or more)"
            measured.verdict = "not enough seeds"
        verdicts.append({"claim": number, "check": number in CHECKS, **papers[number], **dataclasses.asdict(measured)})
    figures: dict[str, list[Path]] = {}
    for name in results:
        figures[name] = [p for p in (out / name / "curves.png", out / name / "merged_vs_bytes.png") if p.is_file()]
    if "mazel-rounds" in results:
        (out / "mazel-rounds").mkdir(parents=True, exist_ok=True)
        figures["mazel-rounds"].insert(0, plot_rounds(results["mazel-rounds"], out / "mazel-rounds" / "rounds.png"))
    blocks = report_blocks(verdicts, results, figures, out, seeds)
    md = out / "report.md"
    atomic_write(md, render_markdown(blocks).encode())
    page = out / "report.html"
    atomic_write(page, render_html(blocks).encode())
    atomic_write(out / "claims.json", json.dumps(verdicts, indent=1).encode())
    return md, page, verdicts


Block = tuple[str, Any]  # (kind, content): h1, h2, p, table (header, rows), img (path, report folder)


def report_blocks(
    verdicts: list[dict], results: Results, figures: dict[str, list[Path]], out: Path, seeds: int
) -> list[Block]:
    """The report as (kind, content) blocks, rendered to Markdown and to HTML alike."""
    blocks: list[Block] = [
        ("h1", "gossiplab reproduction report"),
        ("p", f"Each claim of the four source papers set against our measurements on our data: mean ± sd over "
              f"{seeds} seed(s), accuracies in percent. Regenerate with `gossiplab reproduce`. Verdicts: holds, "
              "partly, does not hold; each row states its rule. Our studies are scaled to 2 CPU cores "
              "(gossiplab/sweeps/*.toml say how), so a verdict is about the claim's direction on our data."),
    ]  # fmt: skip
    claims = [v for v in verdicts if not v["check"]]
    tally = ", ".join(
        f"{sum(v['verdict'] == k for v in claims)} {k}" for k in dict.fromkeys(v["verdict"] for v in claims)
    )
    summary = [[str(v["claim"]), v["statement"], v["paper"], v["ours"], f"**{v['verdict']}**"] for v in claims]
    blocks += [("p", f"The papers' claims: {tally}."), ("table", (["#", "claim", "paper", "ours", "verdict"], summary))]
    checks = [[str(v["claim"]), v["statement"], v["ours"], f"**{v['verdict']}**"] for v in verdicts if v["check"]]
    if checks:
        blocks += [
            ("p", "Correctness checks: theorems the tools rest on, not claims of the papers' experiments."),
            ("table", (["#", "check", "ours", "verdict"], checks)),
        ]
    for v in verdicts:
        blocks += [
            ("h2", f"Claim {v['claim']}: {v['statement']}"),
            ("p", f"**Verdict: {v['verdict']}.** {v['why']}."),
            ("p", f"Paper: {v['paper']} ({v['source']})."),
            ("p", f"The paper's protocol: {v['protocol']}."),
            ("p", f"Ours differs: {v['deviations']}."),
            ("p", f"Ours: {v['ours']}."),
        ]
    for name, study in results.items():
        blocks += [
            ("h2", f"Study {name}"),
            ("p", load_sweep(STUDIES[name].sweep).description),
            ("table", study_table(study)),
        ]
        blocks += [("img", (path, out)) for path in figures.get(name, [])]
    return blocks


def render_markdown(blocks: list[Block]) -> str:
    lines = []
    for kind, content in blocks:
        if kind in ("h1", "h2"):
            lines += [f"{'#' if kind == 'h1' else '##'} {content}", ""]
        elif kind == "p":
            lines += [content, ""]
        elif kind == "table":
            header, rows = content
            lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            lines += ["| " + " | ".join(cell.replace("|", "/") for cell in row) + " |" for row in rows] + [""]
        elif kind == "img":
            path, out = content
            lines += [f"![{path.stem}]({path.relative_to(out)})", ""]
    return "\n".join(lines)


def render_html(blocks: list[Block]) -> str:
    """One self-contained page (figures inlined), readable without the run folders."""

    def inline(text: str) -> str:
        """**bold** and `code`, the only Markdown the blocks use."""
        parts = html.escape(text).split("**")
        bold = "".join(f"<b>{p}</b>" if i % 2 else p for i, p in enumerate(parts))
        return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(bold.split("`")))

    body = []
    for kind, content in blocks:
        if kind in ("h1", "h2"):
            body.append(f"<{kind}>{html.escape(content)}</{kind}>")
        elif kind == "p":
            body.append(f"<p>{inline(content)}</p>")
        elif kind == "table":
            header, rows = content
            head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
            cells = "".join("<tr>" + "".join(f"<td>{inline(c)}</td>" for c in row) + "</tr>" for row in rows)
            body.append(f"<table><tr>{head}</tr>{cells}</table>")
        elif kind == "img":
            path, _ = content
            body.append(figure_html(path, f"{path.parent.name}: {path.stem}"))
    style = ("body{font-family:sans-serif;max-width:70em;margin:2em auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:top}img{max-width:100%}")  # fmt: skip
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>gossiplab reproduction report</title>"
            f"<style>{style}</style></head><body>{''.join(body)}</body></html>")  # fmt: skip
