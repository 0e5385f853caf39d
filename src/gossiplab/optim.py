"""Optimizers written once for the whole population: one update of the flat [N, P] tensor.

Each equals `torch.optim` applied to every row separately (tests prove it to 1e-5), with its
state held in preallocated [N, P] buffers so that `state_dict()` can be saved and resumed exactly.
Optimizer state is local to each site and is never gossiped, as in DSGD.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch

from gossiplab.config import TrainConfig

Device = torch.device | str


def on_contiguous_rows(step: Callable) -> Callable:
    """torch's fused kernels read and write their tensors as contiguous memory: a strided view
    (the parameter columns of a population whose rows also hold buffers) came back with its rows
    shifted. Such a view is updated through a contiguous copy."""

    @functools.wraps(step)
    def update(self, theta: torch.Tensor, grad: torch.Tensor) -> None:
        if theta.is_contiguous():
            return step(self, theta, grad)
        work = theta.contiguous()
        step(self, work, grad)
        theta.copy_(work)
        return None

    return update


class StackedSGD:
    """SGD with optional heavy-ball momentum and L2 weight decay (torch.optim.SGD, dampening 0).

    g <- g + wd * theta;  b <- mu * b + g  (b starts at 0, so b = g after the first step);
    theta <- theta - lr * b
    """

    def __init__(
        self, shape: torch.Size, lr: float, momentum: float = 0.0, weight_decay: float = 0.0, device: Device = "cpu"
    ):
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        self.shape = torch.Size(shape)
        self.momentum_buffer = torch.zeros(shape, device=device) if momentum > 0 else None

    @torch.no_grad()
    @on_contiguous_rows
    def step(self, theta: torch.Tensor, grad: torch.Tensor) -> None:
        """One fused pass over [N, P] (torch's fused CPU/GPU SGD kernel): three separate in-place
        ops would each stream all of theta, grad and the buffer through memory again."""
        buffers = [] if self.momentum_buffer is None else [self.momentum_buffer]
        torch._fused_sgd_(
            [theta],
            [grad],
            buffers,
            weight_decay=self.weight_decay,
            momentum=self.momentum,
            lr=self.lr,
            dampening=0.0,
            nesterov=False,
            maximize=False,
            is_first_step=False,  # the buffer starts at 0, so b = g after the first step either way
        )

    def reset_rows(self, rows: torch.Tensor) -> None:
        """Forget the state of some sites (a site dropped for divergence)."""
        if self.momentum_buffer is not None:
            self.momentum_buffer[rows] = 0.0

    def reset(self) -> None:
        """Every site's state as a new optimizer's (train.reset_optimizer)."""
        if self.momentum_buffer is not None:
            self.momentum_buffer.zero_()

    def state_dict(self) -> dict:
        return {"momentum_buffer": self.momentum_buffer}

    def load_state_dict(self, state: dict) -> None:
        if self.momentum_buffer is not None:
            self.momentum_buffer.copy_(state["momentum_buffer"])


class StackedAdam:
    """Adam (Kingma & Ba 2015) or, with `decoupled_weight_decay`, AdamW (Loshchilov & Hutter 2019).

    m <- b1 m + (1 - b1) g;  v <- b2 v + (1 - b2) g^2;
    theta <- theta - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
    """

    def __init__(
        self,
        shape: torch.Size,
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        decoupled_weight_decay: bool = False,
        device: Device = "cpu",
    ):
        self.lr, self.betas, self.eps = lr, betas, eps
        self.weight_decay, self.decoupled = weight_decay, decoupled_weight_decay
        self.shape = torch.Size(shape)
        self.steps = 0
        self.exp_avg = torch.zeros(shape, device=device)
        self.exp_avg_sq = torch.zeros(shape, device=device)

    @torch.no_grad()
    @on_contiguous_rows
    def step(self, theta: torch.Tensor, grad: torch.Tensor) -> None:
        """One fused pass over [N, P] (torch's fused Adam / AdamW kernel, the update above)."""
        self.steps += 1
        fused = torch._fused_adamw_ if self.decoupled else torch._fused_adam_
        fused(
            [theta],
            [grad],
            [self.exp_avg],
            [self.exp_avg_sq],
            [],
            [torch.tensor(float(self.steps), device=theta.device)],
            lr=self.lr,
            beta1=self.betas[0],
            beta2=self.betas[1],
            weight_decay=self.weight_decay,
            eps=self.eps,
            amsgrad=False,
            maximize=False,
        )

    def reset_rows(self, rows: torch.Tensor) -> None:
        """Forget the state of some sites (a site dropped for divergence)."""
        self.exp_avg[rows] = 0.0
        self.exp_avg_sq[rows] = 0.0

    def reset(self) -> None:
        """Every site's state as a new optimizer's (train.reset_optimizer): moments and step count."""
        self.steps = 0
        self.exp_avg.zero_()
        self.exp_avg_sq.zero_()

    def state_dict(self) -> dict:
        return {"steps": self.steps, "exp_avg": self.exp_avg, "exp_avg_sq": self.exp_avg_sq}

    def load_state_dict(self, state: dict) -> None:
        self.steps = state["steps"]
        self.exp_avg.copy_(state["exp_avg"])
        self.exp_avg_sq.copy_(state["exp_avg_sq"])


def site_state(optimizer: StackedSGD | StackedAdam) -> list[torch.Tensor]:
    """The optimizer's per-site buffers (rows like theta's), read from its state_dict."""
    return [value for value in optimizer.state_dict().values() if isinstance(value, torch.Tensor) and value.dim() == 2]


@torch.no_grad()
def clip_site_gradients(grad: torch.Tensor, max_norm: float) -> None:
    """Each site's gradient (a row of [N, P]) scaled to L2 norm at most `max_norm`, as
    torch.nn.utils.clip_grad_norm_ does for one model (same 1e-6 guard)."""
    norms = torch.linalg.vector_norm(grad, dim=1, keepdim=True)
    grad.mul_((max_norm / (norms + 1e-6)).clamp(max=1.0))


def learning_rate(config: TrainConfig, step: int) -> float:
    """The learning rate of step t (1-indexed) under `train.lr_schedule` (MAZEL Table 2, C and D).

    constant: lr. warmup-constant (MAZEL's "uniform with warmup"): lr t / W for t <= W, then lr.
    cosine: lr (1 + cos(pi (t - 1) / T)) / 2. warmup-cosine: the warmup, then the cosine over the
    remaining T - W steps.
    """
    warmup = config.warmup_steps if config.lr_schedule.startswith("warmup") else 0
    if step <= warmup:
        return config.lr * step / warmup
    if config.lr_schedule.endswith("cosine"):
        progress = (step - 1 - warmup) / (config.steps - warmup)
        return config.lr * 0.5 * (1 + math.cos(math.pi * progress))
    return config.lr


def build_optimizer(config: TrainConfig, shape: torch.Size, device: Device = "cpu") -> StackedSGD | StackedAdam:
    """The stacked optimizer of `train.optimizer`, its state on `device` (the population's)."""
    if config.optimizer == "sgd":
        return StackedSGD(shape, config.lr, config.momentum, config.weight_decay, device)
    return StackedAdam(
        shape,
        config.lr,
        (config.beta1, config.beta2),
        config.eps,
        config.weight_decay,
        decoupled_weight_decay=config.optimizer == "adamw",
        device=device,
    )
