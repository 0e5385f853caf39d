"""Every example in the README runs: Python blocks as they are, the command-line walk through in
order (with `train.steps=20 eval.every=10` appended to each `gossiplab run`, a smaller data subset
to runs of the frozen-encoder presets, and `--dry-run` added to `gossiplab sweep NAME`), so the
docs cannot rot."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from gossiplab.bench_distributed import free_port
from gossiplab.cli import app
from gossiplab.data.sources import SOURCES

README = (Path(__file__).parent.parent / "README.md").read_text()
BLOCKS = re.findall(r"```(\w+)\n(.*?)```", README, re.S)
SHORTEN = ["train.steps=20", "eval.every=10"]
# runs of a frozen-encoder preset embed every image once: on test_mazel.py's subset, whose cached
# features then serve both (the presets' 17,000 images took a minute to embed on a fresh machine)
FEATURE_SUBSET = ["data.train_per_source=400", "data.test_per_source=150"]


def cli_lines(program: str = "gossiplab") -> list[list[str]]:
    lines = []
    for language, code in BLOCKS:
        for line in code.replace("\\\n", " ").splitlines() if language == "bash" else []:
            words = shlex.split(line, comments=True)
            if words[:1] == [program]:
                lines.append(words)
    return lines


def test_the_readme_has_examples():
    assert len(cli_lines()) >= 10
    assert sum(1 for language, _ in BLOCKS if language == "python") >= 3


def test_command_line_walk_through(tmp_path, monkeypatch):
    """In this process, through the CLI's own command definitions (each line as a subprocess spent
    most of its time starting Python and loading the data again); the subprocess entry point is
    tested in test_config.py and test_security.py."""
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    for words in cli_lines():
        args = words[1:]
        if args[:1] == ["run"] and "--dry-run" not in args:
            args += [*SHORTEN, "--quiet"]
            if any(a.startswith("mazel-") for a in args):
                args += FEATURE_SUBSET
        if args[:1] == ["sweep"] and len(args) > 1 and "--dry-run" not in args:
            args += ["--dry-run"]
        result = CliRunner().invoke(app, args)
        torch.set_num_threads(threads)  # a command may pin torch's threads for the rest of its process
        assert result.exit_code == 0, f"{shlex.join(words)}\n{result.output}\n{result.exception!r}"
    assert (tmp_path / "runs" / "demo" / "report.html").is_file()
    assert (tmp_path / "runs" / "merge" / "landscape_loss.png").is_file()
    assert (tmp_path / "runs" / "demo" / "metrics.jsonl").read_bytes() == (
        tmp_path / "runs" / "demo-again" / "metrics.jsonl"
    ).read_bytes()


@pytest.mark.parametrize("index", [i for i, (language, _) in enumerate(BLOCKS) if language == "python"])
def test_python_example(index, tmp_path, monkeypatch):
    """Each block as a script of its own, run in this process (a fresh namespace, its own folder);
    what a block registers (a plug-in's data source) is taken back afterwards."""
    code = (
        BLOCKS[index][1]
        .replace('"train.steps=300"', '"train.steps=20"')
        .replace('"train.steps=200"', '"train.steps=20"')
    )
    monkeypatch.chdir(tmp_path)
    sources = dict(SOURCES)
    threads = torch.get_num_threads()
    try:
        exec(compile(code, f"README.md python block {index}", "exec"), {"__name__": "__main__"})
    finally:
        SOURCES.clear()
        SOURCES.update(sources)
        torch.set_num_threads(threads)


def test_one_machine_torchrun_example(tmp_path):
    """The README's single-machine launch (a free port instead of torchrun's default 29500)."""
    words = next(w for w in cli_lines("torchrun") if "--nnodes" not in w and "--resume" not in w)
    port = str(free_port())
    command = [sys.executable, "-m", "torch.distributed.run", "--master-port", port, *words[1:], *SHORTEN, "--quiet"]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{shlex.join(words)}\n{result.stderr}"
    run_dir = tmp_path / words[words.index("--run-dir") + 1]
    assert (run_dir / "summary.json").is_file() and (run_dir / "rank3" / "checkpoint.pt").is_file()
