"""Commands keep what is written: bad input is refused before anything runs, in one line naming the
input (exit 2), and no command overwrites or half-finishes a run's results."""

from __future__ import annotations

import pytest
import torch

from gossiplab.catalogue import build_config
from gossiplab.config import ConfigError
from gossiplab.data.partition import listed_sites
from gossiplab.optim import clip_site_gradients

TINY = ["num_sites=4", "train.steps=4", "eval.every=2", "data.test_per_source=500", "--quiet"]


@pytest.fixture
def finished_run(gossiplab_main, tmp_path):
    run_dir = tmp_path / "run"
    code, _, err = gossiplab_main("run", *TINY, "--run-dir", str(run_dir))
    assert code == 0, err
    return run_dir


def test_reproduce_refuses_a_run_folder_as_out_and_leaves_it_as_it_was(gossiplab_main, finished_run):
    before = {p.name: p.read_bytes() for p in finished_run.iterdir() if p.is_file()}
    for extra in ([], ["--dry-run"]):
        code, _, err = gossiplab_main("reproduce", "--claims", "10", "--seeds", "1", "--out", str(finished_run), *extra)
        assert code == 2 and f"--out {finished_run} is a run directory" in err, err
    assert {p.name: p.read_bytes() for p in finished_run.iterdir() if p.is_file()} == before


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--claims", "3-1"], "--claims '3-1': the range 3-1 is empty; write it low-high"),
        (["--seeds", "100000000", "--dry-run"], "--seeds 100000000: must be in 1..100"),
        (["--out", "{file}/report", "--dry-run"], "--out {file}/report cannot be created: {file} is not a folder"),
        (["--out", "{file}", "--dry-run"], "--out {file} is a file: give a folder"),
    ],
)
def test_reproduce_refuses_bad_options_before_any_run(args, message, gossiplab_main, tmp_path):
    (tmp_path / "a-file").write_text("")
    file = str(tmp_path / "a-file")
    code, _, err = gossiplab_main("reproduce", *[a.format(file=file) for a in args])
    assert code == 2 and message.format(file=file) in err and "Traceback" not in err, err


def test_a_source_named_twice_and_hidden_run_names_are_refused():
    with pytest.raises(ConfigError, match=r"data\.sources.*names \['fashion-mnist'\] more than once"):
        build_config("default", ["data.sources=['fashion-mnist', 'fashion-mnist']"])
    for name in (".", ".hidden", "study/.b"):
        with pytest.raises(ConfigError, match=r"field 'name'.*must not be hidden"):
            build_config("default", [f"name={name}"])
    assert build_config("default", ["name=study/run.1"]).name == "study/run.1"


def test_run_dir_empty_or_holding_other_files_is_refused_saying_what_it_is(gossiplab_main, tmp_path):
    code, _, err = gossiplab_main("run", *TINY, "--run-dir", "")
    assert code == 2 and "--run-dir is empty" in err, err
    (tmp_path / "notes.txt").write_text("mine")
    code, _, err = gossiplab_main("run", *TINY, "--run-dir", str(tmp_path))
    assert code == 2 and "is not empty and holds no run (1 entries, e.g. 'notes.txt')" in err, err
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_resuming_a_run_whose_metrics_were_deleted_is_refused(gossiplab_main, finished_run):
    (finished_run / "summary.json").unlink()  # as if killed after its last checkpoint
    (finished_run / "metrics.jsonl").unlink()
    checkpoint = (finished_run / "checkpoint.pt").read_bytes()
    code, _, err = gossiplab_main("run", "--resume", str(finished_run), "--quiet")
    assert code == 2 and "metrics.jsonl lacks the rows of steps 0, 2, 4 (deleted or cut short)" in err, err
    assert not (finished_run / "summary.json").exists()
    assert (finished_run / "checkpoint.pt").read_bytes() == checkpoint


def test_clipping_scales_each_sites_gradient_as_torch_does_for_one_model():
    grad = torch.randn(5, 40) * torch.tensor([0.01, 0.5, 1.0, 3.0, 100.0])[:, None]
    clipped = grad.clone()
    clip_site_gradients(clipped, 1.0)
    for row, expected in zip(clipped, grad.clone(), strict=True):
        parameter = torch.nn.Parameter(torch.zeros(40))
        parameter.grad = expected
        torch.nn.utils.clip_grad_norm_([parameter], 1.0)
        torch.testing.assert_close(row, parameter.grad, rtol=1e-6, atol=1e-7)
    assert torch.equal(clipped[0], grad[0])  # under the norm: untouched


def test_a_message_about_thousands_of_sites_names_a_few_and_the_count(gossiplab_main):
    assert listed_sites([3, 5]) == "sites [3, 5]"
    assert listed_sites(list(range(5000))) == "5,000 sites (0, 1, 2, 3, 4, 5, 6, 7, ...)"
    args = ["num_sites=3000", "data.min_site_samples=4", "data.partition=iid", "data.val_fraction=0"]
    code, _, err = gossiplab_main("run", "--dry-run", *args)
    assert code == 2 and " sites (" in err and "received no test samples" in err and len(err) < 400, err
    code, _, err = gossiplab_main("run", "--dry-run", *args, "eval.local_test=class-weighted")  # no test set needed
    assert code == 0, err
