"""CHOCO-SGD (Koloskova, Stich & Jaggi 2019, Algorithm 1): gossip with compressed messages.

Every site i keeps a public copy x_hat_i of its model, which its neighbours hold too. A round
sends only a compressed correction q_i = Q(x_i - x_hat_i) and moves each model towards its
neighbours' public copies:

    q_i <- Q(x_i - x_hat_i);   x_hat_i <- x_hat_i + q_i   (every holder of x_hat_i adds q_i)
    x_i <- x_i + gamma sum_j W_ij (x_hat_j - x_hat_i)

What Q leaves out is not lost: it stays in x_i - x_hat_i and goes out in a later round (the error
feedback that lets biased compressors converge). gamma is the consensus step size. Compressors
(`choco.compressor`), with the bytes a message carries:

    top-k      the k = ceil(kept P) entries of largest magnitude: k float32 values, k int32 indices
    random-k   k entries drawn uniformly, unscaled (CHOCO's rand_k; one draw per round for all
               sites): k values and an 8-byte seed from which the receiver draws the same indices
    qsgd       stochastic quantization to `levels` levels (Alistarh et al. 2017), scaled by 1/tau,
               tau = 1 + min(P / s^2, sqrt(P) / s), as CHOCO's qsgd_s: the norm (4 bytes), and
               per entry a sign bit and ceil(log2(s + 1)) bits for its level

top-k with kept = 1 and gamma = 1 is DSGD's round (x_hat = x, then x <- W x). One public copy per
site stands for every neighbour's: a site that sends nothing in a round (no neighbour in that
round's graph, offline) leaves it as it is; over a graph that changes between rounds this assumes
its corrections reach the sites it will mix with later (bytes count only the round's messages).
The draws of random-k and qsgd come from a stream of the run's seed and the round, so a run
resumes exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from gossiplab.algorithms.base import BYTES_PER_NUMBER, Algorithm, Sent
from gossiplab.communicator import Communicator
from gossiplab.config import ChocoConfig
from gossiplab.registry import ALGORITHMS
from gossiplab.sparse import entries

CHOCO_STREAM = 0x43686F  # offsets the run's seed for the compressors' draws ("Cho")
Compressor = Callable[[torch.Tensor, ChocoConfig, torch.Generator], tuple[torch.Tensor, int]]


def kept_count(options: ChocoConfig, width: int) -> int:
    return math.ceil(options.kept * width)


def top_k(difference: torch.Tensor, options: ChocoConfig, generator: torch.Generator) -> tuple[torch.Tensor, int]:
    """Each row's k entries of largest magnitude; k values and k indices."""
    k = kept_count(options, difference.shape[1])
    kept = difference.abs().topk(k, dim=1, sorted=False).indices  # unsorted: half the time of sorted
    return torch.zeros_like(difference).scatter_(1, kept, difference.gather(1, kept)), 2 * k * BYTES_PER_NUMBER


def random_k(difference: torch.Tensor, options: ChocoConfig, generator: torch.Generator) -> tuple[torch.Tensor, int]:
    """k entries drawn uniformly without replacement, the same k for every site in a round (each
    site's Q is still CHOCO's rand_k; one draw of P indices costs a fifth of one per row); k values
    and the 8-byte seed."""
    k = kept_count(options, difference.shape[1])
    kept = torch.randperm(difference.shape[1], generator=generator, device=difference.device)[:k]
    correction = torch.zeros_like(difference)
    correction[:, kept] = difference[:, kept]
    return correction, k * BYTES_PER_NUMBER + 8


def qsgd(difference: torch.Tensor, options: ChocoConfig, generator: torch.Generator) -> tuple[torch.Tensor, int]:
    """||x|| sign(x) xi(x) / (s tau), xi rounding s|x|/||x|| up or down at random (unbiased before 1/tau)."""
    width, levels = difference.shape[1], options.levels
    norm = torch.linalg.vector_norm(difference, dim=1, keepdim=True)
    scaled = levels * difference.abs() / norm.clamp_min(torch.finfo(difference.dtype).tiny)
    lower = scaled.floor()
    draw = torch.rand(difference.shape, generator=generator, device=difference.device)
    level = lower + (draw < scaled - lower).to(difference.dtype)
    tau = 1 + min(width / levels**2, math.sqrt(width) / levels)
    bits = width * (1 + math.ceil(math.log2(levels + 1)))
    return norm * difference.sign() * level / (levels * tau), BYTES_PER_NUMBER + math.ceil(bits / 8)


COMPRESSORS: dict[str, Compressor] = {"top-k": top_k, "random-k": random_k, "qsgd": qsgd}


@ALGORITHMS.register("choco-sgd")
class ChocoSGD(Algorithm):
    """CHOCO-SGD: a local step, then a round of compressed corrections to public copies."""

    def init(self) -> dict[str, Any]:
        theta = self.experiment.population.theta
        return {"public": torch.zeros_like(theta), "rounds": torch.zeros((), dtype=torch.long)}

    @torch.no_grad()
    def communicate(self, weights: torch.Tensor, state: dict[str, Any], comm: Communicator) -> Sent:
        theta, public = self.experiment.population.theta, state["public"]
        config = self.experiment.config
        options = config.choco
        state["rounds"] += 1
        seed = (config.seed + CHOCO_STREAM + int(state["rounds"])) % 2**63
        generator = torch.Generator(device=theta.device).manual_seed(seed)
        correction, message_bytes = COMPRESSORS[options.compressor](theta - public, options, generator)
        rows, columns, _ = entries(weights)
        between = rows != columns  # the round's messages: j = columns[k] sends to i = rows[k]
        sends = torch.zeros(len(theta), dtype=torch.bool, device=theta.device)
        sends[columns[between].to(theta.device)] = True
        correction[~sends] = 0.0  # a site that sent nothing this round leaves its public copy
        public.add_(correction)  # x_hat_i += q_i
        mixed = public.clone()
        comm.mix(mixed, weights, self.averager(mixed))  # sum_j W_ij x_hat_j
        theta.add_(mixed - public, alpha=options.gamma)
        messages = int(between.sum())
        return Sent(messages, messages * message_bytes)
