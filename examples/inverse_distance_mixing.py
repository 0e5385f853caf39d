"""(a) A mixing rule that uses the current parameters: site i weighs each neighbour j (and itself)
in proportion to 1 / (1 + ||theta_i - theta_j||), so far-apart models mix less.

Name it in a config, with this module as a plug-in, and config.toml re-runs it:

    plugins = ["inverse_distance_mixing"]
    [gossip]
    mixing = "inverse-distance"
"""

import torch

from gossiplab.registry import MIXING_RULES


@MIXING_RULES.register("inverse-distance")
def inverse_distance(adjacency: torch.Tensor, experiment) -> torch.Tensor:
    theta = experiment.population.theta
    closeness = 1.0 / (1.0 + torch.cdist(theta, theta))
    closed = adjacency | torch.eye(len(adjacency), dtype=torch.bool)
    weights = torch.where(closed, closeness, 0.0)
    return weights / weights.sum(1, keepdim=True)
