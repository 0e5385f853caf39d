"""(e) A new algorithm with its own state: gradient tracking (DIGing, Nedic et al. 2017; Qu & Li 2018).

Each site keeps a tracker y_i of the average gradient:
    x_i <- sum_j W_ij x_j - lr y_i
    y_i <- sum_j W_ij y_j + g_i(new) - g_i(old)
With a doubly stochastic W and a constant step it converges to the exact minimiser of the average
loss, where DSGD stops at a distance that grows with the sites' heterogeneity.

In the loop: the gradient g_i(x_t) is computed at x_t, `communicate` (before the step) mixes x and
y, `adjust_gradients` adds g_i(x_t) - g_i(x_{t-1}) to the tracker and hands the tracker to the
optimizer, whose step is then x <- W x - lr y (plain SGD: no momentum, no weight decay).
Gossip every step: gossip.every = 1.
"""

import torch

from gossiplab.algorithms import Algorithm, Sent
from gossiplab.registry import ALGORITHMS


@ALGORITHMS.register("gradient-tracking")
class GradientTracking(Algorithm):
    distributed = True
    communicate_before_step = True

    @staticmethod
    def problems(config) -> list[str]:
        train = config.train
        if train.optimizer == "sgd" and train.momentum == 0 and train.weight_decay == 0:
            return []
        return ["field 'train.optimizer': gradient-tracking needs plain SGD (train.momentum = 0, weight_decay = 0)"]

    def init(self) -> dict:
        theta = self.experiment.population.parameters
        return {"tracker": torch.zeros_like(theta), "previous_gradient": torch.zeros_like(theta)}

    def communicate(self, weights, state, comm) -> Sent:
        super().communicate(weights, state, comm)  # x <- W x
        comm.mix(state["tracker"], weights, self.averager(state["tracker"]))  # y <- W y
        width = self.experiment.population.theta.shape[1] + state["tracker"].shape[1]
        return Sent.vectors(weights, width)  # x and y travel together on every edge

    def adjust_gradients(self, x, y, state) -> None:
        gradient = self.experiment.population.grad
        state["tracker"].add_(gradient).sub_(state["previous_gradient"])
        state["previous_gradient"].copy_(gradient)
        gradient.copy_(state["tracker"])
