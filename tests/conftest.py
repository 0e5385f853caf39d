"""Shared fixtures: the real Fashion-MNIST source, and small configs that run in seconds."""

from __future__ import annotations

import pytest

from gossiplab.config import build_config
from gossiplab.data.sources import FASHION_MNIST_DIR


@pytest.fixture(scope="session", autouse=True)
def _real_data_installed():
    if not FASHION_MNIST_DIR.is_dir():
        pytest.exit(
            "Fashion-MNIST is missing: apt-get install -y dataset-fashion-mnist (the Makefile's install does it)"
        )


@pytest.fixture
def small_config():
    """The default experiment, shortened: 8 sites, 120 steps, evaluated every 40."""

    def make(preset: str = "default", *overrides: str):
        return build_config(preset, ["num_sites=8", "train.steps=120", "eval.every=40", *overrides])

    return make
