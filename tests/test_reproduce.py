"""The reproduction report: verdict rules on made-up measurements, the report's files, the command."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from gossiplab.cli import app, parse_claims
from gossiplab.config import ConfigError
from gossiplab.reproduce import CLAIMS, STUDIES, claim_5, claim_8, claim_10, paper_claims, study_sweep, write_report


def summaries(seeds: int = 3, **values) -> list[dict]:
    """One made-up summary per seed: `values` are [seeds] lists (or one number) per field."""
    rows = []
    for k in range(seeds):
        row = {"ala": 0.8, "aga": 0.5, "mmga": 0.6, "ala_aga_mean": 0.65, "gossip_gain": 10.0, "worst10_local": 0.4,
               "convergence_step": {"aga": 300}, "before_final_merge": {"aga": 0.3}, "matched_mmga": 0.5,
               "learned_weight_same_task": 0.2, "learned_weight_other_task": 0.05}  # fmt: skip
        for key, value in values.items():
            row[key] = value[k] if isinstance(value, list) else value
        rows.append(row)
    return rows


def made_up_results() -> dict:
    return {name: {variant: summaries() for variant in study_sweep(name).variants} for name in STUDIES}


def test_every_claim_has_its_paper_numbers_with_a_source_and_a_study():
    papers = paper_claims()
    assert sorted(papers) == sorted(CLAIMS) == list(range(1, 13))
    for number, paper in papers.items():
        assert paper["statement"] and paper["paper"] and paper["source"], number
        assert all(study in STUDIES for study in CLAIMS[number][0])


def test_a_u_shape_needs_an_interior_minimum_beyond_the_seeds_spread():
    def rounds(ala: list[float], noise: float) -> dict:
        return {
            "mazel-rounds": {
                f"MAZEL {r}": summaries(ala=[a - noise, a, a + noise]) for r, a in zip((1, 5, 43), ala, strict=True)
            }
        }

    assert claim_5(rounds([0.9, 0.8, 0.9], 0.01)).verdict == "holds"
    assert claim_5(rounds([0.9, 0.8, 0.9], 0.2)).verdict == "partly"  # within the seeds' spread
    assert claim_5(rounds([0.9, 0.85, 0.8], 0.01)).verdict == "does not hold"  # falls all the way


def test_close_to_full_communication_is_within_five_percent_in_every_seed():
    def budget(low: list[float]) -> dict:
        return {
            "merge-budget": {"R 0.2": summaries(aga=low), "complete": summaries(aga=0.8), "local-only": summaries()}
        }

    assert claim_8(budget([0.79, 0.78, 0.77])).verdict == "holds"
    assert claim_8(budget([0.8, 0.79, 0.73])).verdict == "partly"  # one seed 7 points short
    assert claim_8(budget([0.6, 0.6, 0.6])).verdict == "does not hold"


def test_one_peer_exponential_gossip_is_exact_for_powers_of_two():
    verdict = claim_10({})
    assert verdict.verdict == "holds"
    assert "N 12 one-peer-exponential" in verdict.ours


def test_the_report_sets_every_claim_beside_the_papers_numbers(tmp_path):
    md, page, verdicts = write_report(list(CLAIMS), made_up_results(), tmp_path, seeds=3)
    text = md.read_text()
    assert [v["claim"] for v in verdicts] == list(range(1, 13))
    assert all(v["verdict"] in ("holds", "partly", "does not hold") for v in verdicts)
    for paper in paper_claims().values():
        assert paper["source"] in text
    assert "DIMAT Table 2" in page.read_text() and "<table>" in page.read_text()
    assert json.loads((tmp_path / "claims.json").read_text()) == verdicts
    assert (tmp_path / "mazel-rounds" / "rounds.png").is_file()
    # the made-up numbers: equal AGA for DIMAT and WA, so claim 6's DIMAT >= WA holds
    assert verdicts[5]["verdict"] == "holds"
    assert np.isclose(float(verdicts[5]["ours"].split()[4]), 50.0)


@pytest.mark.parametrize(
    "text, expected", [("1-3,5", [1, 2, 3, 5]), ("12", [12]), ("2,2", [2])], ids=["ranges", "one", "repeat"]
)
def test_claims_are_chosen_by_number_and_range(text, expected):
    assert parse_claims(text) == expected


@pytest.mark.parametrize("text", ["0", "13", "1-x", ""])
def test_unknown_claims_are_refused_naming_the_range(text):
    with pytest.raises(ConfigError, match="--claims"):
        parse_claims(text)


def test_reproduce_dry_run_checks_every_study_and_refuses_bad_input():
    runner = CliRunner()
    result = runner.invoke(app, ["reproduce", "--dry-run"])
    assert result.exit_code == 0, result.output
    for name in STUDIES:
        assert f"ok: {name}:" in result.output
    assert "mazel-rounds: 24 runs" in result.output  # 8 round counts x 3 seeds
    refused = runner.invoke(app, ["reproduce", "--claims", "14", "--dry-run"])
    assert refused.exit_code == 2 and "the claims are 1-12" in refused.output
    bad = runner.invoke(app, ["reproduce", "train.lr=-1", "--dry-run"])
    assert bad.exit_code == 2 and "train.lr" in bad.output


def test_a_diverged_run_stops_the_report_with_its_message(tmp_path):
    args = ["reproduce", "train.steps=20", "eval.every=10", "--claims", "6", "--seeds", "1", "--out", str(tmp_path)]
    result = CliRunner().invoke(app, [*args, "train.lr=1e6", "--quiet"])
    assert result.exit_code == 1, result.output
    assert "training diverged" in result.output and "train.on_divergence=drop" in result.output
    assert "Traceback" not in result.output
