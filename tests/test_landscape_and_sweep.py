"""Wachspress coordinates, the landscape of merged models, and sweeps."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from gossiplab.compare import table_rows
from gossiplab.config import ConfigError
from gossiplab.landscape import inside, polygon, wachspress
from gossiplab.sweep import Sweep, load_sweep, run_sweep, variant_configs


@pytest.mark.parametrize("n", [3, 5, 8, 16])
def test_wachspress_coordinates_are_barycentric_inside_and_reproduce_the_vertices(n):
    vertices = polygon(n)
    grid = torch.cartesian_prod(
        torch.linspace(-1, 1, 61, dtype=torch.float64), torch.linspace(-1, 1, 61, dtype=torch.float64)
    )
    points = grid[inside(grid, vertices)]
    coordinates = wachspress(points, vertices)
    assert (coordinates >= -1e-12).all()
    torch.testing.assert_close(coordinates.sum(1), torch.ones(len(points), dtype=torch.float64))
    torch.testing.assert_close(coordinates @ vertices, points)  # linear precision
    torch.testing.assert_close(wachspress(vertices, vertices), torch.eye(n, dtype=torch.float64))
    centre = wachspress(torch.zeros(1, 2, dtype=torch.float64), vertices)
    torch.testing.assert_close(centre, torch.full((1, n), 1 / n, dtype=torch.float64))  # the uniform average
    midpoint = (vertices[0] + vertices[1]) / 2
    edge = wachspress(midpoint[None], vertices)[0]
    torch.testing.assert_close(edge[:2], torch.tensor([0.5, 0.5], dtype=torch.float64))
    assert edge[2:].abs().max() < 1e-12


def test_sweep_files_load_and_every_variant_validates():
    for name in ("merge-budget", "merge-window"):
        sweep = load_sweep(name)
        configs = variant_configs(sweep, [], seeds=2)
        assert len(configs) == 2 * len(sweep.variants)
        assert {c.gossip.final_merge for c in configs.values()} == {"exact"}
    with pytest.raises(ConfigError, match="unknown sweep 'nope'"):
        load_sweep("nope")
    with pytest.raises(ConfigError, match=r"gossip\.p"):
        variant_configs(load_sweep("merge-budget"), ["gossip.p=7"], seeds=1)


def test_a_small_sweep_runs_resumes_and_tabulates(tmp_path):
    sweep = Sweep(
        "tiny", "two budgets", "default",
        ["num_sites=4", "train.steps=40", "eval.every=20", "gossip.final_merge=exact"],
        {"R 1": [], "local-only": ["gossip.schedule=none"]},
        plot_against="gossip_rounds",
    )  # fmt: skip
    results = run_sweep(sweep, tmp_path, [], seeds=2, show_progress=False)
    assert [len(v) for v in results.values()] == [2, 2]
    assert {s["name"] for s in results["R 1"]} == {"tiny/R 1"}
    assert results["local-only"][0]["communication"]["gossip_bytes"] == 0
    assert results["R 1"][0]["communication"]["peers_per_round_R"] == pytest.approx(1.0)
    assert results["R 1"][0]["before_final_merge"]["aga"] < 1.0
    for path in (
        "sweep.json",
        "curves.png",
        "merged_vs_bytes.png",
        "metrics_vs_gossip_rounds.png",
        "r-1/seed-0/summary.json",
        "r-1/seed-1/summary.json",
    ):
        assert (tmp_path / path).is_file()
    rows = dict(table_rows(results))
    merge_only_mb = 2 * (4 - 1) * results["local-only"][0]["num_parameters"] * 4 / 1e6
    assert "+-" in rows["ALA"][0] and rows["MB sent (all sites)"][1] == f"{merge_only_mb:.1f} +- 0"
    before = (tmp_path / "r-1" / "seed-0" / "metrics.jsonl").read_bytes()
    again = run_sweep(sweep, tmp_path, [], seeds=2, show_progress=False)  # finished runs are reused
    assert (tmp_path / "r-1" / "seed-0" / "metrics.jsonl").read_bytes() == before
    assert json.dumps(again, sort_keys=True) == json.dumps(results, sort_keys=True)


@pytest.mark.long
def test_cli_landscape_of_a_run_before_its_final_merge(tmp_path):
    run = subprocess.run(
        [sys.executable, "-m", "gossiplab", "run", "--preset", "final-merge-only", "num_sites=5", "train.steps=60",
         "eval.every=60", "--quiet", "--run-dir", str(tmp_path / "r")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    result = subprocess.run(
        [sys.executable, "-m", "gossiplab", "landscape", str(tmp_path / "r"), "--resolution", "9", "--samples", "300"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "merged model (centre)" in result.stdout
    assert (tmp_path / "r" / "landscape_loss.png").stat().st_size > 5000


def test_variants_whose_names_share_a_folder_are_refused_before_anything_runs(tmp_path):
    """'A+D+F' and 'A+D+F~' both slug to a-d-f: the second would have read the first's results."""
    sweep = Sweep("s", "", "default", ["train.steps=2"], {"A+D+F": [], "A+D+F~": ["gossip.every=5"]})
    with pytest.raises(ConfigError, match="'A\\+D\\+F' and 'A\\+D\\+F~' share the folder 'a-d-f'"):
        run_sweep(sweep, tmp_path, [], show_progress=False)
    assert not any(tmp_path.iterdir())
