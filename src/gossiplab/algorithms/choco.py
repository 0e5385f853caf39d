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
Under message loss ([network]) a lost message's weight leaves the round's W as for DSGD, while
the sender's public copy still moves for every holder: a receiver left with a stale copy of its
neighbour is not modelled.
The draws of random-k and qsgd come from a stream of the run's seed and the round, so a run
resumes exactly.

Across processes (torchrun) each process keeps every site's public copy and sends its sites'
compressed messages, as they travel (top-k: float32 values and int32 indices; random-k: the
values; qsgd: the norm and the entries' sign and level bits, packed into bytes), to
every other process (`comm.gather(..., payload=True)`, counted in `payload_bytes_sent`); each
then updates every public copy and mixes its own sites from the copies they read (the block and
its neighbours, not all N). Every process draws the same random indices and quantization draws
(those of all N sites), so the run equals the single-process one (to rounding: a block's mix
may take another kernel path than the whole population's).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from gossiplab.algorithms.base import BYTES_PER_NUMBER, Algorithm, Sent
from gossiplab.communicator import Communicator
from gossiplab.config import ChocoConfig
from gossiplab.merge import mix_block
from gossiplab.registry import ALGORITHMS
from gossiplab.sparse import entries

CHOCO_STREAM = 0x43686F  # offsets the run's seed for the compressors' draws ("Cho")


@dataclass(frozen=True)
class Compressed:
    """The messages of a block of sites as they travel (`parts`, one row per site), the bytes one
    message counts, and how a receiver turns rows of `parts` (any sites') back into Q(x - x_hat)."""

    parts: tuple[torch.Tensor, ...]
    message_bytes: int
    decode: Callable[..., torch.Tensor]
    pack: Callable[..., tuple[torch.Tensor, ...]] = lambda *parts: parts  # parts -> the bytes that travel
    unpack: Callable[..., tuple[torch.Tensor, ...]] = lambda *wire: wire  # and back, exactly

    def correction(self) -> torch.Tensor:
        """Q(x - x_hat) of the sites compressed here."""
        return self.decode(*self.parts)


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Non-negative integer codes [rows, n], each < 2^bits, as bytes [rows, ceil(n bits / 8)]: the
    codes' bits one after the other, most significant first, the last byte padded with zeros."""
    rows, n = codes.shape
    shifts = torch.arange(bits - 1, -1, -1, device=codes.device)
    stream = ((codes.long()[..., None] >> shifts) & 1).to(torch.uint8).reshape(rows, n * bits)
    stream = torch.nn.functional.pad(stream, (0, -(n * bits) % 8))
    place = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8, device=codes.device)
    return (stream.reshape(rows, -1, 8) * place).sum(-1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """The inverse of `pack_bits`: the n codes of every row, as int64."""
    shifts = torch.arange(7, -1, -1, device=packed.device)
    stream = ((packed.long()[..., None] >> shifts) & 1).reshape(len(packed), -1)[:, : n * bits]
    place = 2 ** torch.arange(bits - 1, -1, -1, device=packed.device)
    return (stream.reshape(len(packed), n, bits) * place).sum(-1)


Compressor = Callable[[torch.Tensor, ChocoConfig, torch.Generator, slice, int], Compressed]


def kept_count(options: ChocoConfig, width: int) -> int:
    return math.ceil(options.kept * width)


def top_k(
    difference: torch.Tensor, options: ChocoConfig, generator: torch.Generator, sites: slice = slice(None),
    num_sites: int = 0,
) -> Compressed:  # fmt: skip
    """Each row's k entries of largest magnitude; k values and k indices."""
    width = difference.shape[1]
    k = kept_count(options, width)
    kept = difference.abs().topk(k, dim=1, sorted=False).indices  # unsorted: half the time of sorted

    def decode(values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        return torch.zeros(len(values), width, dtype=values.dtype, device=values.device).scatter_(
            1, indices.long(), values
        )

    return Compressed((difference.gather(1, kept), kept.to(torch.int32)), 2 * k * BYTES_PER_NUMBER, decode)


def random_k(
    difference: torch.Tensor, options: ChocoConfig, generator: torch.Generator, sites: slice = slice(None),
    num_sites: int = 0,
) -> Compressed:  # fmt: skip
    """k entries drawn uniformly without replacement, the same k for every site in a round (each
    site's Q is still CHOCO's rand_k; one draw of P indices costs a fifth of one per row); k values
    and the 8-byte seed."""
    width = difference.shape[1]
    k = kept_count(options, width)
    kept = torch.randperm(width, generator=generator, device=difference.device)[:k]

    def decode(values: torch.Tensor) -> torch.Tensor:
        correction = torch.zeros(len(values), width, dtype=values.dtype, device=values.device)
        correction[:, kept.to(values.device)] = values
        return correction

    return Compressed((difference[:, kept],), k * BYTES_PER_NUMBER + 8, decode)


def qsgd(
    difference: torch.Tensor, options: ChocoConfig, generator: torch.Generator, sites: slice = slice(None),
    num_sites: int = 0,
) -> Compressed:  # fmt: skip
    """||x|| sign(x) xi(x) / (s tau), xi rounding s|x|/||x|| up or down at random (unbiased before
    1/tau); the draws are those of all `num_sites` sites (taken for the rows `sites`; 0: `difference`
    holds every site), so a block draws what the whole population would."""
    width, levels = difference.shape[1], options.levels
    norm = torch.linalg.vector_norm(difference, dim=1, keepdim=True)
    scaled = levels * difference.abs() / norm.clamp_min(torch.finfo(difference.dtype).tiny)
    lower = scaled.floor()
    draw = torch.rand((num_sites or len(difference), width), generator=generator, device=difference.device)[sites]
    level = lower + (draw < scaled - lower).to(difference.dtype)
    signed = torch.int8 if levels <= 127 else torch.int16 if levels <= 32767 else torch.int32
    tau = 1 + min(width / levels**2, math.sqrt(width) / levels)
    bits = 1 + math.ceil(math.log2(levels + 1))  # per entry: a sign bit and the level's

    def decode(norms: torch.Tensor, signed_levels: torch.Tensor) -> torch.Tensor:
        return norms * signed_levels.to(norms.dtype) / (levels * tau)

    def pack(norms: torch.Tensor, signed_levels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Code 2 |level| + (level < 0) per entry, in `bits` bits."""
        return norms, pack_bits(2 * signed_levels.long().abs() + (signed_levels < 0), bits)

    def unpack(norms: torch.Tensor, packed: torch.Tensor) -> tuple[torch.Tensor, ...]:
        codes = unpack_bits(packed, bits, width)
        return norms, ((codes >> 1) * (1 - 2 * (codes & 1))).to(signed)

    message_bytes = BYTES_PER_NUMBER + math.ceil(width * bits / 8)
    return Compressed((norm, (difference.sign() * level).to(signed)), message_bytes, decode, pack, unpack)


COMPRESSORS: dict[str, Compressor] = {"top-k": top_k, "random-k": random_k, "qsgd": qsgd}


@ALGORITHMS.register("choco-sgd")
class ChocoSGD(Algorithm):
    """CHOCO-SGD: a local step, then a round of compressed corrections to public copies."""

    distributed = True

    def init(self) -> dict[str, Any]:
        theta, num_sites = self.experiment.population.theta, self.experiment.config.num_sites
        public = torch.zeros(num_sites, theta.shape[1], dtype=theta.dtype, device=theta.device)  # every site's
        return {"public": public, "rounds": torch.zeros((), dtype=torch.long)}

    @torch.no_grad()
    def communicate(self, weights: torch.Tensor, state: dict[str, Any], comm: Communicator) -> Sent:
        theta, public = self.experiment.population.theta, state["public"]
        config = self.experiment.config
        options = config.section(ChocoConfig)
        state["rounds"] += 1
        seed = (config.seed + CHOCO_STREAM + int(state["rounds"])) % 2**63
        generator = torch.Generator(device=theta.device).manual_seed(seed)
        compress = COMPRESSORS[options.compressor]
        message = compress(theta - public[comm.sites], options, generator, comm.sites, config.num_sites)
        if comm.world_size > 1:  # the messages travel, as packed as the bytes they are charged
            wire = tuple(comm.gather(part, payload=True).to(theta.device) for part in message.pack(*message.parts))
            correction = message.decode(*message.unpack(*wire))  # every site's Q(x - x_hat)
        else:
            correction = message.correction()
        rows, columns, _ = entries(weights)
        between = rows != columns  # the round's messages: j = columns[k] sends to i = rows[k]
        sends = torch.zeros(config.num_sites, dtype=torch.bool, device=theta.device)
        sends[columns[between].to(theta.device)] = True
        correction[~sends] = 0.0  # a site that sent nothing this round leaves its public copy
        public.add_(correction)  # x_hat_i += q_i
        if comm.world_size > 1:  # sum_j W_ij x_hat_j for this process's sites, from the copies they read
            averagers = self.__dict__.setdefault("_block_averagers", {})
            mixed = mix_block(public, weights, comm.sites, averagers, config.train.kernels)
        else:
            mixed = public.clone()
            self.averager(mixed)(mixed, weights)
        theta.add_(mixed - public[comm.sites], alpha=options.gamma)
        messages = int(between.sum())
        return Sent(messages, messages * message.message_bytes)
