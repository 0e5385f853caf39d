"""Local training only: no site ever receives another's parameters, whatever the schedule says
(the label-skew baseline; MAZEL's "local" rows)."""

from __future__ import annotations

from typing import Any

import torch

from gossiplab.algorithms.base import Algorithm, Sent
from gossiplab.communicator import Communicator
from gossiplab.registry import ALGORITHMS
from gossiplab.sparse import identity


@ALGORITHMS.register("local")
class Local(Algorithm):
    """Local training only: no site receives another's parameters."""

    distributed = True

    def mixing(self, round_index: int, adjacency: torch.Tensor, state: dict[str, Any]) -> torch.Tensor:
        return identity(len(adjacency), like=adjacency)

    def communicate(self, weights: torch.Tensor, state: dict[str, Any], comm: Communicator) -> Sent:
        return Sent(messages=0, bytes=0)
