"""Shared fixtures: the real Fashion-MNIST source, and small configs that run in seconds."""

from __future__ import annotations

import os
import random
import sys

import numpy as np
import pytest
import torch

from gossiplab.catalogue import build_config
from gossiplab.data.sources import FASHION_MNIST_DIR


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--long", action="store_true", help="also run the tests marked long (CI runs them: CI=true)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `long` (full-length end-to-end runs) run in CI (CI=true, as CI sets it) or with
    --long; `make test` alone stays under 10 minutes on 2 cores."""
    if config.getoption("--long") or os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        return
    skip = pytest.mark.skip(reason="long: runs in CI (CI=true) or with --long")
    for item in items:
        if "long" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def _real_data_installed():
    if not FASHION_MNIST_DIR.is_dir():
        pytest.exit(
            "Fashion-MNIST is missing: apt-get install -y dataset-fashion-mnist (the Makefile's install does it)"
        )


@pytest.fixture(autouse=True)
def _seeded_global_generators():
    """Every test starts from the same global random state, whatever ran before it in the process:
    a test's draws (torch.randn without a generator) never depend on the order or selection of tests."""
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)


@pytest.fixture
def small_config():
    """The default experiment, shortened: 8 sites, 120 steps, evaluated every 40."""

    def make(preset: str = "default", *overrides: str):
        return build_config(preset, ["num_sites=8", "train.steps=120", "eval.every=40", *overrides])

    return make


@pytest.fixture
def gossiplab_main(capsys, monkeypatch):
    """The `gossiplab` command in this process, through its real entry point `main()` (exit codes and
    the one-line error rule included): (exit code, stdout, stderr with rich's wrapping undone)."""
    from gossiplab.cli import main

    def call(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        monkeypatch.setattr(sys, "argv", ["gossiplab", *args])
        try:
            main()
            code = 0
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else 1
        captured = capsys.readouterr()
        return code, captured.out, " ".join(captured.err.split())

    return call
