"""DIMAT (Saadati et al. 2024): gossip that merges neighbours by aligning their hidden units first.

theta_i <- sum_j W_ij P_ij(theta_j) (DIMAT eq. 2-4), P_ij the permutation of j's units that best
matches i's (`matching.MatchedMerge`, in this package): by activations on a fixed sample of the
global training set, as DIMAT's code does at every merge, or of i's own data (`dimat.match_on`) ("dimat",
activation matching), or by weights alone ("weight-matching", Git Re-Basin). On a complete graph
every agent receives the one merged model (exact consensus, as in DIMAT's code). "merge-average"
is weight averaging (WA) through the same merge with the units left as they are: DIMAT's baseline
with nothing else changed. MMGA stays the
uniform mean of the models (Definition 1); the matched merge of all of them, every row aligned to
the first, is reported beside it as `matched_mmga`.
"""

from __future__ import annotations

from typing import Any

import torch

from gossiplab.algorithms.base import Algorithm, Sent
from gossiplab.algorithms.dimat.matching import MatchedMerge
from gossiplab.communicator import Communicator
from gossiplab.config import DimatConfig
from gossiplab.permutation import permutation_spec
from gossiplab.registry import ALGORITHMS


@ALGORITHMS.register("dimat")
class ActivationMatching(Algorithm):
    """DIMAT (Saadati et al. 2024): neighbours' units aligned by activation matching, then averaged."""

    method = "activation-matching"

    def init(self) -> dict[str, Any]:
        experiment = self.experiment
        population, federation, config = experiment.population, experiment.federation, experiment.config
        options = config.section(DimatConfig)
        spec = permutation_spec(population.module, federation.image_shape)
        match_inputs = None
        if self.method == "activation-matching":  # a fixed sample, drawn once from the seed
            generator = torch.Generator().manual_seed(config.seed + 1)
            if options.match_on == "own":
                match_inputs, _ = federation.sample_batch(options.match_samples, generator)
            else:
                pool = federation.train_index.cpu()
                chosen = pool[torch.randint(len(pool), (options.match_samples,), generator=generator)]
                images = federation.normalise(federation.pool_x[chosen.to(federation.pool_x.device)])
                match_inputs = images.expand(config.num_sites, *images.shape)
        self.merge = MatchedMerge(population, spec, self.method, match_inputs)
        return {"rounds": torch.zeros((), dtype=torch.long)}

    def communicate(self, weights: torch.Tensor, state: dict[str, Any], comm: Communicator) -> Sent:
        """The matched merge; then, for BatchNorm models, each site's statistics recomputed on
        `dimat.reestimate_batches` batches of its own training data (drawn from the seed and the
        round: resumable)."""
        population, config = self.experiment.population, self.experiment.config
        comm.mix(population.theta, weights, self.merge)
        state["rounds"] += 1
        reestimate = config.section(DimatConfig).reestimate_batches
        if population.num_buffers and reestimate:
            generator = torch.Generator().manual_seed(config.seed * 100_003 + int(state["rounds"]))
            batches = [self.statistics_batch(generator, comm) for _ in range(reestimate)]
            population.reestimate_statistics(batches)
        return Sent.vectors(weights, population.theta.shape[1])

    def statistics_batch(self, generator: torch.Generator, comm: Communicator) -> torch.Tensor:
        """[N, B, ...] images BatchNorm statistics are recomputed on: each site's own, or one batch
        of the global training set for every site (`dimat.reestimate_on`)."""
        federation, config = self.experiment.federation, self.experiment.config
        if config.section(DimatConfig).reestimate_on == "own":
            return federation.sample_batch(config.train.batch_size, generator, comm.sites)[0]
        pool = federation.train_index.cpu()
        chosen = pool[torch.randint(len(pool), (config.train.batch_size,), generator=generator)]
        images = federation.normalise(federation.pool_x[chosen.to(federation.pool_x.device)])
        return images.expand(self.experiment.population.num_sites, *images.shape)

    def merged_model(self, active: torch.Tensor, state: dict[str, Any], comm: Communicator) -> torch.Tensor:
        return self.merge.merged_model(self.experiment.population.theta, active)


@ALGORITHMS.register("weight-matching")
class WeightMatching(ActivationMatching):
    """Weight matching (Git Re-Basin, Ainsworth et al. 2023): units aligned from the weights alone, then averaged."""

    method = "weight-matching"


@ALGORITHMS.register("merge-average")
class PlainMerge(ActivationMatching):
    """WA inside DIMAT's protocol: the same merge with no alignment (every permutation the
    identity), so that it differs from DIMAT in nothing else (one model for every agent on a
    complete graph, BatchNorm statistics recomputed after each merge, `dimat.*` alike)."""

    method = "identity"
