"""DSGD / D-PSGD (Lian et al. 2017): a local step, then theta <- W theta. Local training only is
the same with no gossip (`gossip.schedule = "none"`); FedAvg's averaging is the complete graph
with uniform weights; CDSGD mixes before the step."""

from __future__ import annotations

from gossiplab.algorithms.base import Algorithm
from gossiplab.registry import ALGORITHMS


@ALGORITHMS.register("dsgd")
class DSGD(Algorithm):
    """D-PSGD (Lian et al. 2017): a local step, then theta <- W theta."""

    distributed = True


@ALGORITHMS.register("cdsgd")
class CDSGD(Algorithm):
    """Consensus-based distributed SGD (Jiang et al. 2017): gossip between the gradient and the step.

    x_i <- sum_j W_ij x_j - lr g_i(x_i), the gradient taken at the point before mixing."""

    communicate_before_step = True
