"""DIMAT's matched merge (Saadati et al. 2024): each neighbour's hidden units permuted onto the
receiver's before averaging, the permutations found by activation matching (DIMAT eq. 2-3) or by
Git Re-Basin's weight matching (Ainsworth et al. 2023). What may be permuted is the model's
`PermutationSpec` (gossiplab.permutation, declared with the architecture); the matching is here.
"""

from __future__ import annotations

import torch
from torch import nn

from gossiplab.permutation import Axis, PermutationSpec, permuted_index


def assignment(similarity: torch.Tensor, blocks: int) -> torch.Tensor:
    """The permutation p maximising sum_k similarity[k, p[k]] (scipy's linear_sum_assignment)
    among those GroupNorm allows: every (block a, block b) pair matched unit to unit, then the
    blocks matched to each other on those pairs' best totals. Exact over that set: a block's
    total depends only on which block it takes."""
    from scipy.optimize import linear_sum_assignment

    similarity = similarity.cpu()  # scipy's solver works on the CPU; the permutations index any device
    width = len(similarity) // blocks
    scores = torch.empty(blocks, blocks, dtype=torch.float64)
    inner: dict[tuple[int, int], torch.Tensor] = {}
    for a in range(blocks):
        for b in range(blocks):
            part = similarity[a * width : (a + 1) * width, b * width : (b + 1) * width].double()
            rows, columns = linear_sum_assignment(part.numpy(), maximize=True)
            scores[a, b] = part[rows, columns].sum()
            inner[a, b] = torch.from_numpy(columns)
    _, taken = linear_sum_assignment(scores.numpy(), maximize=True)
    return torch.cat([inner[a, int(b)] + int(b) * width for a, b in enumerate(taken)])


def activations(module: nn.Module, spec: PermutationSpec, params: dict, x: torch.Tensor) -> list[torch.Tensor]:
    """Each group's activations [samples, units] of the model with `params` on inputs x; a
    convolutional unit contributes one sample per image and spatial position."""
    captured: dict[str, torch.Tensor] = {}
    hooks = [
        module.get_submodule(g.activation).register_forward_hook(
            lambda _m, _i, out, name=g.activation: captured.__setitem__(name, out)
        )
        for g in spec.groups
    ]
    try:
        with torch.no_grad():
            torch.func.functional_call(module, params, (x,))
    finally:
        for hook in hooks:
            hook.remove()
    return [captured[g.activation].movedim(1, -1).reshape(-1, g.size) for g in spec.groups]


def correlation(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pearson correlation [units_a, units_b] between the columns of a and b (DIMAT eq. 3)."""
    a = (a - a.mean(0)) / (a.std(0) + 1e-8)
    b = (b - b.mean(0)) / (b.std(0) + 1e-8)
    return a.T @ b / len(a)


def match_activations(
    reference: list[torch.Tensor], other: list[torch.Tensor], spec: PermutationSpec
) -> list[torch.Tensor]:
    """Per group, the permutation of `other`'s units that best correlates them with `reference`'s
    (DIMAT eq. 2-3). Activations of a unit do not depend on how other layers are permuted, so
    every layer is matched independently."""
    return [assignment(correlation(a, b), g.blocks) for a, b, g in zip(reference, other, spec.groups, strict=True)]


def match_weights(
    spec: PermutationSpec,
    names: list[str],
    shapes: list[torch.Size],
    reference: torch.Tensor,
    other: torch.Tensor,
    max_iterations: int = 100,
) -> list[torch.Tensor]:
    """Git Re-Basin weight matching (Ainsworth et al. 2023, Algorithm 1): coordinate ascent on
    sum over parameters of <W_ref, P(W_other)>, one group's permutation at a time by linear
    assignment with the others fixed, until no permutation changes. Data-free."""
    perms = [torch.arange(g.size) for g in spec.groups]
    shape_of = dict(zip(names, shapes, strict=True))
    offset_of = dict(zip(names, torch.tensor([0, *[s.numel() for s in shapes[:-1]]]).cumsum(0).tolist(), strict=True))

    def param(flat: torch.Tensor, axis: Axis, units: int) -> torch.Tensor:
        shape = shape_of[axis.name]
        value = flat[offset_of[axis.name] : offset_of[axis.name] + shape.numel()].view(shape)
        return value.movedim(axis.axis, 0).reshape(units, -1)

    for _ in range(max_iterations):
        changed = False
        for g, group in enumerate(spec.groups):
            others = [p if k != g else torch.arange(group.size) for k, p in enumerate(perms)]
            permuted = other[permuted_index(spec, names, shapes, others)]
            similarity = sum(param(reference, a, group.size) @ param(permuted, a, group.size).T for a in group.axes)
            new = assignment(similarity, group.blocks)
            if not torch.equal(new, perms[g]):
                changed = True
                perms[g] = new
        if not changed:
            break
    return perms


class MatchedMerge:
    """DIMAT's merge (Saadati et al. 2024, eq. 2-4): theta_i <- sum_j W_ij P_ij(theta_j), P_ij the
    permutation of j's hidden units that aligns them with i's, found by `method`:
    - "activation-matching": correlations of i's and j's activations on a fixed sample of inputs
      (`match_inputs[i]`: of the global training set, as DIMAT's code, or of i's own data), one
      linear assignment per layer;
    - "weight-matching": Git Re-Basin's data-free weight matching;
    - "identity": no alignment (plain weight averaging through the same merge, DIMAT's WA).
    P_ii is the identity, so with W = I nothing changes. When every row of W is the same (a complete
    graph with uniform weights) every site receives one model, as in DIMAT's code: all rows aligned
    to the first sender's units and averaged with that row's weights (exact consensus); aligning
    each receiver separately would leave N different unit orders of the same average. The linear
    assignments run in scipy, one per (receiver, neighbour, layer): that part is sequential;
    gathering the permuted rows and the weighted sum are tensor operations on whole parameter vectors.
    """

    def __init__(self, population, spec, method: str, match_inputs: torch.Tensor | None = None):
        self.population, self.spec, self.method = population, spec, method
        self.match_inputs = match_inputs

    def alignments(self, theta: torch.Tensor, receiver: int, senders: list[int]) -> list[torch.Tensor]:
        """[P] indices that permute each sender's parameter vector onto the receiver's units."""
        population, spec = self.population, self.spec
        if self.method == "identity":
            return [torch.arange(theta.shape[1], device=theta.device) for _ in senders]
        if self.method == "weight-matching":
            perms = [
                match_weights(spec, population.names, population.shapes, theta[receiver], theta[j]) for j in senders
            ]
        else:
            x = self.match_inputs[receiver].to(theta.device)
            with population.evaluating():  # BatchNorm on running statistics, which it must not update
                reference = activations(population.module, spec, population.views(theta[receiver]), x)
                perms = [
                    match_activations(
                        reference, activations(population.module, spec, population.views(theta[j]), x), spec
                    )
                    for j in senders
                ]
        return [permuted_index(spec, population.names, population.shapes, p) for p in perms]

    def aligned_rows(self, theta: torch.Tensor, reference: int, rows: list[int]) -> torch.Tensor:
        """theta's `rows` [len(rows), P], each permuted onto `reference`'s units (that row as it is)."""
        others = [j for j in rows if j != reference]
        index = dict(zip(others, self.alignments(theta, reference, others), strict=True))
        return torch.stack([theta[j] if j == reference else theta[j][index[j]] for j in rows])

    @torch.no_grad()
    def merged_model(self, theta: torch.Tensor, active: torch.Tensor | None = None) -> torch.Tensor:
        """The population's merged model [1, P] in a common frame: every (active) row aligned to the
        first one, then averaged. Under a matched merge each site keeps its own unit order, so
        the plain mean of rows would average misaligned units."""
        rows = (torch.arange(len(theta)) if active is None else active.nonzero().flatten()).tolist()
        return self.aligned_rows(theta, rows[0], rows).mean(0, keepdim=True)

    @torch.no_grad()
    def __call__(self, theta: torch.Tensor, weights: torch.Tensor) -> None:
        if len(weights) > 1 and bool((weights == weights[:1]).all()):
            senders = weights[0].nonzero().flatten().tolist()
            merged = weights[0, senders].to(theta) @ self.aligned_rows(theta, senders[0], senders)
            theta.copy_(merged.expand_as(theta))
            return
        mixed = torch.empty_like(theta)
        for receiver in range(len(weights)):
            senders = weights[receiver].nonzero().flatten().tolist()
            mixed[receiver] = weights[receiver, senders].to(theta) @ self.aligned_rows(theta, receiver, senders)
        theta.copy_(mixed)
