"""Learning to collaborate (L2C, Li et al. 2022, Algorithm 1): mixing weights learned from data.

Each site i keeps logits alpha_i over its candidate neighbours (itself included); its weights are
w_i = softmax(alpha_i) over the candidates (all sites stacked as one [N, N] tensor with a mask).
A round, after the local steps took theta_j^t to theta_j^(t+1/2):
    Delta_j = theta_j^t - theta_j^(t+1/2)                         (the update j sends)
    theta_i^(t+1) = theta_i^t - sum_j w_ij Delta_j                 (aggregation, L2C eq. 2)
    alpha <- alpha - lr grad_alpha sum_i L(theta_i^(t+1)(alpha); D_i^val)   (L2C eq. 3, Adam)
the last differentiated through the aggregation with torch.func (one vmapped forward of all sites
on their own validation batches). At round T0 each site keeps only its K0 largest-weight
neighbours (the learned sparse topology); later rounds send along those edges only.

meta-L2C (L2C section 3.3) replaces the free logits by an attention module shared by all sites:
    w_ij = softmax_j <E(Delta_i), E(Delta_j)> / sqrt(d)   over i's candidates     (eq. 4-5)
    Delta_i = theta_i^(t+1/2) - theta_i^0                   (the change since initialisation)
    E(theta) = [phi_1, ..., phi_L], phi_l = [E_l(theta_l,1), ..., E_l(theta_l,C)]   (eq. 7-8)
E_l a two-layer fully connected network (widths 10, 5) applied to every output channel of layer l
(each channel's update scaled to unit norm), trained by the same validation loss (eq. 6). It has no
per-site parameters, so a trained encoder serves new sites and new tasks (`l2c.meta_encoder`).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from gossiplab.data.federation import Federation, sample_held_out
from gossiplab.population import Population
from gossiplab.safeload import load_tensors


class LearnedMixing:
    """L2C's learned aggregation: `weights()`, the current learned W, and `__call__`, the update
    aggregation and one step on the weights (the L2C algorithm, this package's __init__, runs it)."""

    def __init__(
        self,
        population: Population,
        federation: Federation,
        candidates: torch.Tensor,
        *,
        lr: float,
        weight_decay: float,
        prune_round: int,
        keep: int,
        val_batch: int,
        seed: int,
    ):
        num_sites = population.num_sites
        self.population, self.federation = population, federation
        self.mask = candidates | torch.eye(num_sites, dtype=torch.bool)
        self.optimizer = torch.optim.Adam(self.learnable(), lr=lr, weight_decay=weight_decay)
        self.prune_round, self.keep, self.val_batch, self.seed = prune_round, keep, val_batch, seed
        self.round_start = population.theta.clone()  # theta^t of every site
        self.rounds = 0
        self.history: list[torch.Tensor] = []

    def learnable(self) -> list[torch.Tensor]:
        """What the validation loss trains: L2C's logits alpha [N, N], zero (uniform weights) at first."""
        self.alpha = torch.zeros(len(self.mask), len(self.mask), requires_grad=True)
        return [self.alpha]

    def scores(self, theta: torch.Tensor) -> torch.Tensor:
        """Logits [N, N] of the weights of the models theta (theta^(t+1/2)); L2C: alpha itself."""
        return self.alpha

    def weights(self, theta: torch.Tensor | None = None) -> torch.Tensor:
        """W [N, N] = row-wise softmax of the scores over each site's candidates (zero elsewhere)."""
        theta = self.population.theta if theta is None else theta
        return torch.softmax(self.scores(theta).masked_fill(~self.mask, -torch.inf), dim=1)

    def aggregate(self, theta: torch.Tensor) -> torch.Tensor:
        """theta^(t+1) = theta^t - W Delta, differentiable in the learnable parameters (theta holds
        theta^(t+1/2))."""
        return self.round_start - self.weights(theta).to(theta.device) @ (self.round_start - theta)

    def validation_loss(self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """sum_i L(theta_i^(t+1)(alpha); validation batch of i): L2C eq. 3's objective."""
        return self.population.site_losses(self.aggregate(theta), x, y).sum()

    def validation_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Each site's validation batch of this round, a function of (seed, round): resumable."""
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.rounds)
        f = self.federation
        return sample_held_out(f.val_x, f.val_y, f.val_site, f.num_sites, self.val_batch, generator)

    def __call__(self, theta: torch.Tensor, _weights: torch.Tensor) -> None:
        """Aggregate with the current weights, then one Adam step on alpha (Algorithm 1, 13-18)."""
        x, y = self.validation_batch()
        aggregated = self.aggregate(theta.detach())
        loss = self.population.site_losses(aggregated, x, y).sum()
        self.optimizer.zero_grad()
        loss.backward()
        with torch.no_grad():
            self.history.append(self.weights(theta))
            theta.copy_(aggregated)
            self.round_start.copy_(theta)
        self.optimizer.step()
        self.rounds += 1
        if self.rounds == self.prune_round:
            self.prune()

    def state_dict(self) -> dict:
        return {
            "learnable": [p.detach() for group in self.optimizer.param_groups for p in group["params"]],
            "mask": self.mask,
            "optimizer": self.optimizer.state_dict(),
            "round_start": self.round_start,
            "rounds": self.rounds,
            "history": torch.stack(self.history) if self.history else torch.empty(0),
        }

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            for parameter, saved in zip(self.optimizer.param_groups[0]["params"], state["learnable"], strict=True):
                parameter.copy_(saved)
        self.mask = state["mask"].clone()
        self.optimizer.load_state_dict(state["optimizer"])
        self.round_start.copy_(state["round_start"])
        self.rounds = state["rounds"]
        self.history = list(state["history"])

    def prune(self) -> None:
        """Keep each site's `keep` largest-weight neighbours (and itself): L2C Algorithm 1, line 21
        (for meta-L2C, by the weights it gives the models of this round)."""
        with torch.no_grad():
            scores = self.weights().masked_fill(torch.eye(len(self.mask), dtype=torch.bool), -1.0)
            kept = scores.topk(min(self.keep, len(scores) - 1), dim=1).indices
            self.mask = torch.eye(len(self.mask), dtype=torch.bool)
            self.mask.scatter_(1, kept, True)

    def summarize(self, run_dir: Path) -> dict:
        """Write learned_weights.pt ([rounds, N, N]) and learned_weights.png; return how much weight
        sites put on neighbours that share a class with them against the others (L2C Fig. 4/7).
        A run that never communicated (gossip.schedule = "none") learned nothing: only its round
        count is reported, not the untrained uniform start as if it were a result."""
        if not self.history:
            return {"learned_rounds": 0}
        history = torch.stack(self.history)
        torch.save(history, run_dir / "learned_weights.pt")
        counts = self.federation.train_label_counts() > 0
        same_task = (counts.float() @ counts.float().T) > 0
        off_diagonal = ~torch.eye(len(same_task), dtype=torch.bool)
        final = history[-1]
        same, other = final[same_task & off_diagonal], final[~same_task & off_diagonal]
        plot_learned_weights(final, counts, run_dir / "learned_weights.png")
        return {
            "learned_rounds": len(history),
            "learned_weight_same_task": float(same.mean()) if len(same) else None,
            "learned_weight_other_task": float(other.mean()) if len(other) else None,
            "learned_self_weight": float(final.diagonal().mean()),
        }


class MetaLearnedMixing(LearnedMixing):
    """meta-L2C: the weights come from a channel-shared encoder of each site's change since its
    initialisation (module docstring, L2C eq. 4-8), trained by the validation loss like L2C."""

    WIDTHS = (10, 5)  # the two layers of E_l (L2C section 4)

    def __init__(self, population: Population, *args, encoder_path: str = "", **kwargs):
        self.initial = population.theta.clone()  # theta^0 of every site
        self.layers = [(n, s, shape) for n, s, shape in zip(population.names, population.slices, population.shapes,
                       strict=True) if len(shape) >= 2]  # fmt: skip
        hidden, out = self.WIDTHS
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(kwargs["seed"])
            self.encoders = nn.ModuleList(
                nn.Sequential(nn.Linear(math.prod(shape[1:]), hidden), nn.ReLU(), nn.Linear(hidden, out))
                for _, _, shape in self.layers
            )
        if encoder_path:
            self.encoders.load_state_dict(load_tensors(Path(encoder_path), "meta-L2C encoder"))
        super().__init__(population, *args, **kwargs)

    def learnable(self) -> list[torch.Tensor]:
        return list(self.encoders.parameters())

    def represent(self, theta: torch.Tensor) -> torch.Tensor:
        """E(theta - theta^0) [N, d]: every layer's output channels, each scaled to unit norm, encoded by E_l."""
        change = theta - self.initial
        parts = []
        for (_, columns, shape), encoder in zip(self.layers, self.encoders, strict=True):
            channels = F.normalize(change[:, columns].reshape(len(theta), shape[0], -1), dim=-1)
            parts.append(encoder(channels).flatten(1))
        return torch.cat(parts, dim=1)

    def scores(self, theta: torch.Tensor) -> torch.Tensor:
        """f(theta_i, theta_j) = <E(Delta_i), E(Delta_j)> / sqrt(d) (dot-product attention, eq. 5)."""
        representation = self.represent(theta)
        return representation @ representation.T / math.sqrt(representation.shape[1])

    def state_dict(self) -> dict:
        return {**super().state_dict(), "initial": self.initial}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.initial.copy_(state["initial"])

    def summarize(self, run_dir: Path) -> dict:
        """L2C's summary, and the trained encoder (learned_encoder.pt) for new sites or tasks."""
        if self.history:
            torch.save(self.encoders.state_dict(), run_dir / "learned_encoder.pt")
        return super().summarize(run_dir)


def plot_learned_weights(weights: torch.Tensor, classes: torch.Tensor, path: Path) -> Path:
    """The final learned W as a heatmap, sites ordered by their classes so that sites sharing a
    task sit next to each other (a good run shows blocks on the diagonal)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [tuple(row.nonzero().flatten().tolist()) for row in classes]
    order = sorted(range(len(keys)), key=lambda i: keys[i])
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    image = ax.imshow(weights[order][:, order].numpy(), cmap="Blues", vmin=0)
    fig.colorbar(image, ax=ax, label="learned W[i, j]")
    labels = ["/".join(map(str, keys[i])) for i in order]
    if len(order) <= 40:
        ax.set_xticks(range(len(order)), labels, rotation=90, fontsize=6)
        ax.set_yticks(range(len(order)), labels, fontsize=6)
    ax.set(xlabel="sender j (its classes)", ylabel="receiver i (its classes)", title="L2C learned mixing weights")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
