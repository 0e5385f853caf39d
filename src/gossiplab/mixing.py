"""Mixing rules: the weights W (N x N, rows sum to 1) of gossip averaging theta_i <- sum_j W_ij theta_j.

The rules are pure functions of the graph (and of what they score). Each is registered under its
`gossip.mixing` name as `rule(adjacency, experiment) -> W` (dense, or sparse for a sparse graph:
gossiplab.sparse), the experiment giving rules that depend on the training (influence, FOMO) the
population, optimizer and data; `distributed=True` marks the rules computed from the graph alone,
which run when the sites are spread over processes.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from gossiplab.config import Config, FomoConfig
from gossiplab.data.federation import sample_held_out
from gossiplab.registry import MIXING_RULES
from gossiplab.sparse import dense, entries, matrix


def uniform(adjacency: torch.Tensor) -> torch.Tensor:
    """Equal weight over the closed in-neighbourhood: W_ij = 1 / (|N_in(i)| + 1) for j in N_in(i) and j = i.

    Row stochastic always; doubly stochastic on regular symmetric graphs (complete, ring,
    matchings) and circulant ones (exponential), not on irregular graphs (use Metropolis there).
    A sparse graph gives a sparse W (gossiplab.sparse).
    """
    num_sites = len(adjacency)
    if adjacency.is_sparse:
        rows, columns, _ = entries(adjacency)
        sites = torch.arange(num_sites)
        rows, columns = torch.cat([rows, sites]), torch.cat([columns, sites])
        count = torch.bincount(rows, minlength=num_sites).float()
        return matrix(rows, columns, 1.0 / count[rows], num_sites)
    closed = adjacency | torch.eye(len(adjacency), dtype=torch.bool)
    weights = closed.float()
    return weights / weights.sum(1, keepdim=True)


def metropolis(adjacency: torch.Tensor) -> torch.Tensor:
    """Metropolis-Hastings weights (Xiao & Boyd 2004) on the undirected graph A | A^T.

    W_ij = 1 / (1 + max(d_i, d_j)) for each edge, W_ii = 1 - sum_j W_ij: symmetric and doubly
    stochastic on any graph, so the population mean is preserved. A sparse graph gives a sparse W.
    """
    if adjacency.is_sparse:
        num_sites = len(adjacency)
        rows, columns, _ = entries(adjacency)
        both = torch.cat([rows, columns]), torch.cat([columns, rows])
        undirected = matrix(*both, torch.ones(2 * len(rows)), num_sites)
        rows, columns, _ = entries(undirected)
        degree = torch.bincount(rows, minlength=num_sites).float()
        values = 1.0 / (1.0 + torch.maximum(degree[rows], degree[columns]))
        own = 1.0 - torch.zeros(num_sites).index_add_(0, rows, values)
        sites = torch.arange(num_sites)
        return matrix(torch.cat([rows, sites]), torch.cat([columns, sites]), torch.cat([values, own]), num_sites)
    undirected = adjacency | adjacency.T
    degree = undirected.sum(1).float()
    weights = torch.where(undirected, 1.0 / (1.0 + torch.maximum(degree[:, None], degree[None, :])), 0.0)
    weights.diagonal().copy_(1.0 - weights.sum(1))
    return weights


def influence(adjacency: torch.Tensor, grad: torch.Tensor, temperature: float) -> torch.Tensor:
    """Influence-weighted mixing, MAZEL section 4.1's "Random (softmax)" after DICE (Zhu et al., ICLR 2025).

    DICE's first-order one-hop influence of candidate j's latest local update on receiver i's loss
    is I_ij = lr <g_i, g_j> (g the sites' gradients of their own losses at the latest step,
    `grad` [N, P]); the candidates are i's peers of the round and i itself (I_ii = lr ||g_i||^2).
    Each score is taken relative to the site's own, s_ij = I_ij / I_ii = <g_i, g_j> / ||g_i||^2
    (the step size cancels, so one temperature fits every run), and
        W_i = softmax(s_i / temperature) over the candidates, 0 elsewhere.
    With one peer a round the weights still follow the scores' size: a peer whose update helps i
    as much as i's own gets half; an orthogonal one exp(-1/T) / (1 + exp(-1/T)) (0.27 at T = 1).
    T -> infinity is uniform mixing. Rows sum to 1; W is not symmetric, so the mean is not preserved.
    MAZEL gives no formula for its softmax, so this rule is a reconstruction (the division by the
    site's own score and T = 1 are ours); `influence-dice` is DICE's raw score as DICE defines it.
    """
    closed = adjacency | torch.eye(len(adjacency), dtype=torch.bool, device=adjacency.device)
    rows, cols = closed.nonzero(as_tuple=True)
    # dense graphs: one Gram matrix instead of |E| row products
    dense = len(rows) > 2 * len(adjacency)
    dots = (grad @ grad.T)[rows, cols] if dense else torch.linalg.vecdot(grad[rows], grad[cols])
    own = grad.square().sum(1).clamp(min=torch.finfo(grad.dtype).tiny)
    scores = torch.full(adjacency.shape, -torch.inf, dtype=grad.dtype, device=grad.device)
    scores[rows, cols] = dots / own[rows] / temperature
    return torch.softmax(scores, dim=1)


def influence_share(weights: torch.Tensor, grad: torch.Tensor, lr: float) -> torch.Tensor:
    """The earlier influence rule: W_ii kept, the rest shared in proportion to positive influence.

    DICE's one-hop influence of neighbour j on receiver i, to first order, is the decrease of i's
    loss caused by j's latest local update reaching i through W_ij:
        I_ij = lr * W_ij * <g_i, g_j>,
    g_i, g_j the sites' gradients of their own losses at the latest step (`grad` [N, P]). Each row
    keeps its self-weight W_ii and shares the rest, 1 - W_ii, among its neighbours in proportion to
    their positive influence, max(I_ij, 0); a site whose neighbours all have I_ij <= 0 keeps its
    own model (W_ii = 1). Rows sum to 1; W is not symmetric, so the mean is not preserved.
    """
    off_diagonal = weights.clone()
    off_diagonal.diagonal().zero_()
    rows, cols = off_diagonal.nonzero(as_tuple=True)
    scores = torch.zeros_like(weights)
    # dense graphs: one Gram matrix instead of |E| row products
    dense = len(rows) > len(weights)
    dots = (grad @ grad.T)[rows, cols] if dense else torch.linalg.vecdot(grad[rows], grad[cols])
    scores[rows, cols] = (lr * off_diagonal[rows, cols] * dots).clamp(min=0)
    total = scores.sum(1, keepdim=True)
    share = torch.where(total > 0, scores / total.clamp(min=torch.finfo(total.dtype).tiny), 0.0)
    mixed = share * (1 - weights.diagonal())[:, None]
    mixed.diagonal().copy_(1 - mixed.sum(1))
    return mixed


def fomo(adjacency: torch.Tensor, losses: torch.Tensor, distances: torch.Tensor) -> torch.Tensor:
    """FOMO's first-order model-optimisation weights (Zhang et al., ICLR 2021, eq. 6-7).

    losses[i, j] = site i's validation loss of site j's model; distances[i, j] = ||theta_j - theta_i||.
    w_ij = max(L_ii - L_ij, 0) / ||theta_j - theta_i|| for the neighbours j of i, normalised to sum
    to 1; theta_i <- theta_i + sum_j w_ij (theta_j - theta_i). A site no neighbour improves keeps its
    own model. Rows sum to 1; not symmetric.
    """
    gain = (losses.diagonal()[:, None] - losses).clamp(min=0) / distances.clamp(min=torch.finfo(distances.dtype).tiny)
    gain = torch.where(adjacency & ~torch.eye(len(adjacency), dtype=torch.bool), gain, 0.0)
    total = gain.sum(1, keepdim=True)
    weights = torch.where(total > 0, gain / total.clamp(min=torch.finfo(total.dtype).tiny), 0.0)
    weights.diagonal().copy_(1 - weights.sum(1))
    return weights


def mixing_matrix(adjacency: torch.Tensor, rule: str) -> torch.Tensor:
    """W of a registered rule computed from the graph alone (uniform, metropolis)."""
    return MIXING_RULES.get(rule)(adjacency, None)


@MIXING_RULES.register("uniform", distributed=True)
def uniform_rule(adjacency: torch.Tensor, experiment: Any) -> torch.Tensor:
    """Equal weights over the closed in-neighbourhood."""
    return uniform(adjacency)


@MIXING_RULES.register("metropolis", distributed=True)
def metropolis_rule(adjacency: torch.Tensor, experiment: Any) -> torch.Tensor:
    """Metropolis-Hastings weights (Xiao & Boyd 2004): symmetric and doubly stochastic on any graph."""
    return metropolis(adjacency)


@MIXING_RULES.register("influence")
def influence_rule(adjacency: torch.Tensor, experiment: Any) -> torch.Tensor:
    """MAZEL's "Random (softmax)": a softmax over the DICE influence scores of the site and its peers."""
    grad = experiment.population.grad
    return influence(dense(adjacency).to(grad.device), grad, experiment.config.gossip.influence_temperature).cpu()


def dice_influence(adjacency: torch.Tensor, held_out: torch.Tensor, grad: torch.Tensor, lr: float,
                   temperature: float) -> torch.Tensor:  # fmt: skip
    """DICE's raw one-hop influence (Zhu et al., ICLR 2025), softmaxed as MAZEL's "Random (softmax)".

    I_ij = lr W_ij <g'_i, g_j>: the first-order decrease of receiver i's held-out loss (g'_i, the
    gradient of i's loss on its own validation sample) caused by candidate j's latest local update
    (g_j, j's gradient on its own batch) reaching i with the uniform weight W_ij of the round's
    graph; the candidates are i's peers and i itself. W_i = softmax(I_i / temperature) over them.
    The scores are raw, so the temperature is in units of loss decrease (lr 1e-3 and gradient
    products of order 1 give scores of order 1e-3): unlike `influence`, it must be set per run.
    """
    weights = uniform(adjacency)
    rows, cols = weights.nonzero(as_tuple=True)
    scores = torch.full(adjacency.shape, -torch.inf, dtype=grad.dtype, device=grad.device)
    dots = torch.linalg.vecdot(held_out[rows], grad[cols])
    scores[rows, cols] = lr * weights[rows, cols].to(grad) * dots / temperature
    return torch.softmax(scores, dim=1)


def dice_problems(config: Config) -> list[str]:
    """The receiver's held-out gradient needs validation data; computing it must not move BatchNorm statistics."""
    problems = []
    if config.data.val_fraction <= 0:
        problems.append(
            f"field 'data.val_fraction' = {config.data.val_fraction}: must be > 0 with gossip.mixing = "
            "'influence-dice' (each receiver's held-out gradient comes from its validation data)"
        )
    if config.model.norm == "batch" and config.model.name in ("cnn", "resnet20"):
        problems.append(
            "field 'gossip.mixing' = 'influence-dice': not with model.norm = 'batch' (the held-out "
            "gradient would update the BatchNorm statistics); use `influence`"
        )
    return problems


@MIXING_RULES.register("influence-dice", problems=dice_problems)
def dice_influence_rule(adjacency: torch.Tensor, experiment: Any) -> torch.Tensor:
    """DICE's raw one-hop score with the receiver's held-out gradient, softmaxed at `gossip.dice_temperature`.

    The held-out sample is `fomo.val_batch` validation images per site, drawn from the seed and the
    same every round; the sites' training gradients are left as they were."""
    config, federation, population = experiment.config, experiment.federation, experiment.population
    generator = torch.Generator().manual_seed(config.seed + 3)
    batch = config.section(FomoConfig).val_batch
    x, y = sample_held_out(federation.val_x, federation.val_y, federation.val_site, config.num_sites, batch, generator)
    training = population.grad.clone()
    population.compute_gradients(x, y)
    held_out = population.grad.clone()
    population.grad.copy_(training)
    graph = dense(adjacency).to(training.device)
    return dice_influence(graph, held_out, training, experiment.optimizer.lr, config.gossip.dice_temperature).cpu()


@MIXING_RULES.register("influence-share")
def influence_share_rule(adjacency: torch.Tensor, experiment: Any) -> torch.Tensor:
    """Self-weight kept, the rest shared by positive DICE influence (with one peer: 50/50 or nothing)."""
    return influence_share(uniform(dense(adjacency)), experiment.population.grad, experiment.optimizer.lr)


def fomo_problems(config: Config) -> list[str]:
    """FOMO scores models on validation data, so the sites must hold some."""
    if config.data.val_fraction > 0:
        return []
    return [f"field 'data.val_fraction' = {config.data.val_fraction}: must be > 0 with gossip.mixing = 'fomo' "
            "(the weights come from each site's validation loss of its neighbours' models)"]  # fmt: skip


@MIXING_RULES.register("fomo", problems=fomo_problems)
def fomo_rule(adjacency: torch.Tensor, experiment: Any) -> torch.Tensor:
    """FOMO (Zhang et al. 2021): weights from each neighbour's first-order gain on validation data.

    Every model is scored on every site's fixed validation sample (`fomo.val_batch` images
    each, drawn from the seed, the same sample every round)."""
    config, federation, population = experiment.config, experiment.federation, experiment.population
    num_sites, batch = config.num_sites, config.section(FomoConfig).val_batch
    generator = torch.Generator().manual_seed(config.seed + 2)
    x, y = sample_held_out(federation.val_x, federation.val_y, federation.val_site, num_sites, batch, generator)
    x, y = x.flatten(0, 1), y.flatten()
    owner = torch.arange(num_sites).repeat_interleave(batch)
    theta = population.theta
    logits = population.logits(theta, x)  # [models, samples, classes]
    if population.class_mask is not None:
        logits.masked_fill_(~population.class_mask[owner], -torch.inf)
    ce = F.cross_entropy(logits.transpose(1, 2), y.expand(len(theta), -1), reduction="none")
    losses = ce.view(len(theta), num_sites, batch).mean(2).T  # [site i, model j]
    parameters = population.parameters
    return fomo(dense(adjacency), losses.cpu(), torch.cdist(parameters, parameters).cpu())


def spectral_gap(weights: torch.Tensor) -> float:
    """1 - |lambda_2(W)|: how fast repeated gossip with this W reaches consensus (0 = never)."""
    moduli = torch.linalg.eigvals(weights.double()).abs().sort(descending=True).values
    return float(1.0 - moduli[1]) if len(moduli) > 1 else 1.0
