"""Loss / accuracy landscape of up to 16 models on a polygon (single-merge paper, Fig. 1c).

The models sit at the vertices of a regular polygon. Every point x inside it is the convex
combination sum_i lambda_i(x) theta_i with Wachspress barycentric coordinates (Wachspress 1975):

    w_i(x) = A(v_{i-1}, v_i, v_{i+1}) * prod_{j not in {i-1, i}} A_j(x),   lambda_i = w_i / sum_k w_k

where A_j(x) = area(x, v_j, v_{j+1}) is the signed area of x with edge j. The product form needs no
division by the edge areas, so it is defined on the boundary too. The coordinates are non-negative
and sum to 1 inside the polygon, reproduce the vertices, and are linear-precise (sum_i lambda_i v_i
= x), so the centre is the uniform average: the merged model.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from gossiplab.plots import plt
from gossiplab.population import Population

MAX_MODELS = 16


def polygon(num_vertices: int) -> torch.Tensor:
    """Vertices [n, 2] of a regular polygon on the unit circle, counter-clockwise, first at the top."""
    angles = math.pi / 2 + 2 * math.pi * torch.arange(num_vertices, dtype=torch.float64) / num_vertices
    return torch.stack([angles.cos(), angles.sin()], dim=1)


def _area(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    return 0.5 * ((b[..., 0] - a[..., 0]) * (c[..., 1] - a[..., 1]) - (c[..., 0] - a[..., 0]) * (b[..., 1] - a[..., 1]))


def wachspress(points: torch.Tensor, vertices: torch.Tensor) -> torch.Tensor:
    """Wachspress coordinates [M, n] of points [M, 2] in the convex polygon `vertices` [n, 2] (CCW)."""
    n = len(vertices)
    following = vertices.roll(-1, 0)
    edge_areas = _area(points[:, None, :], vertices[None], following[None])  # [M, n]: A_j(x)
    corner = _area(vertices.roll(1, 0), vertices, following)  # [n]: A(v_{i-1}, v_i, v_{i+1})
    weights = torch.empty(len(points), n, dtype=points.dtype)
    for i in range(n):
        others = [j for j in range(n) if j not in (i, (i - 1) % n)]
        weights[:, i] = corner[i] * edge_areas[:, others].prod(1)
    return weights / weights.sum(1, keepdim=True)


def inside(points: torch.Tensor, vertices: torch.Tensor, tolerance: float = 1e-12) -> torch.Tensor:
    edge_areas = _area(points[:, None, :], vertices[None], vertices.roll(-1, 0)[None])
    return (edge_areas >= -tolerance).all(1)


@torch.no_grad()
def landscape(
    population: Population,
    models: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    resolution: int = 41,
    chunk: int = 32,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Grid points inside the polygon [M, 2], and the loss [M] and accuracy [M] of each combination."""
    vertices = polygon(len(models))
    axis = torch.linspace(-1, 1, resolution, dtype=torch.float64)
    grid = torch.cartesian_prod(axis, axis)
    points = torch.cat([grid[inside(grid, vertices)], vertices])
    coordinates = wachspress(points, vertices).float()
    losses, accuracies = [], []
    for start in range(0, len(points), chunk):
        combined = coordinates[start : start + chunk] @ models
        logits = population.logits(combined, x)
        targets = y.expand(len(combined), -1)
        losses.append(
            F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view_as(targets).mean(1)
        )
        accuracies.append((logits.argmax(-1) == targets).float().mean(1))
    return points, torch.cat(losses), torch.cat(accuracies)


def plot_landscape(
    points: torch.Tensor, values: torch.Tensor, labels: list[str], path: Path, title: str, metric: str
) -> Path:
    """The polygon coloured by `values` (log scale for loss), vertices labelled, centre = merged model."""
    vertices = polygon(len(labels))
    fig, ax = plt.subplots(figsize=(6.4, 5.6))
    shown = (values.log10() if metric == "loss" else values).numpy()
    contour = ax.tricontourf(
        points[:, 0].numpy(),
        points[:, 1].numpy(),
        shown,
        levels=30,
        cmap="viridis_r" if metric == "loss" else "viridis",
    )
    fig.colorbar(contour, ax=ax, label="log10 test loss" if metric == "loss" else "test accuracy")
    closed = torch.cat([vertices, vertices[:1]])
    ax.plot(closed[:, 0], closed[:, 1], color="black", linewidth=0.8)
    for (vx, vy), label in zip(vertices.tolist(), labels, strict=True):
        ax.annotate(label, (vx, vy), xytext=(vx * 1.1, vy * 1.1), ha="center", va="center", fontsize=8)
    ax.plot([0], [0], marker="*", color="red", markersize=12, label="uniform average (merged model)")
    ax.set_aspect("equal")
    ax.set_xlim(-1.25, 1.25)
    ax.set_ylim(-1.25, 1.25)
    ax.axis("off")
    ax.legend(loc="lower center", fontsize=8, bbox_to_anchor=(0.5, -0.08))
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
