"""(d) A link of the local step's gradient chain: Gaussian noise on every site's gradient (the noise
step of DP-SGD, Abadi et al. 2016, without its per-example clipping or privacy accounting),
    g_i <- g_i + sigma N(0, I),
drawn from the run's seed by a generator kept in the link's state, so a resumed run draws the same
noise. sigma is in the config section [noise]. Name the link in train.gradient_transforms, alone
or chained with others (["proximal", "gaussian-noise"]), under any algorithm.
"""

from dataclasses import dataclass

import torch

from gossiplab.config import documented, register_section
from gossiplab.gradients import GradientTransform
from gossiplab.registry import GRADIENT_TRANSFORMS


@dataclass
class NoiseConfig:
    sigma: float = documented(0.01, "standard deviation of the noise added to every gradient entry")

    def problems(self, config) -> list[str]:
        return [] if self.sigma >= 0 else [f"field 'noise.sigma' = {self.sigma}: must be >= 0"]


register_section("noise", NoiseConfig)


@GRADIENT_TRANSFORMS.register("gaussian-noise")
class GaussianNoise(GradientTransform):
    def init(self) -> dict:
        return {"generator": torch.Generator().manual_seed(self.experiment.config.seed + 17).get_state()}

    def update(self, grad, state, step) -> None:
        generator = torch.Generator()
        generator.set_state(state["generator"])
        noise = torch.randn(grad.shape, generator=generator).to(grad.device)
        grad.add_(noise, alpha=self.experiment.config.section(NoiseConfig).sigma)
        state["generator"].copy_(generator.get_state())
