"""`gossiplab bench`: the engine against the per-site loop on the same work, in one process.

For each model and number of sites N, one training step (B samples per site, forward, backward,
optimizer update) is timed three ways, interleaved so that machine noise hits all alike:
- loop: what the papers' code does: N nn.Module copies, a torch.optim optimizer each, a Python
  loop over sites;
- engine: gossiplab's Population + stacked optimizer with the strategy `auto` picks;
- another engine strategy (vmap where `auto` picked linear or the loop; the loop where it picked
  vmap), to show that `auto` picked the faster.
Reported: steps/s, engine / loop, the share of the engine's step spent in its optimizer update
(a pass over theta, grad and the optimizer state, bound by memory bandwidth, not by the matmuls),
achieved GFLOP/s (the work done: forward, dW, and dX past the first layer) against the
shape-matched kernel limit (the bare batched matmuls of that work at the same shapes, timed in the
same run) and against square-GEMM peak; and gossip time per round against one `copy_` of Theta (a
memory-bandwidth bound), for a sparse (ring) and a dense (complete) graph; and the memory a site
costs (its parameters, gradient and optimizer state) and the process's resident memory. At scale
(beyond LOOP_SITES sites) the per-site loop, the other strategy and the kernel limit are left out
(the loop would hold N modules and take minutes a step), and the complete graph beyond
SPARSE_FROM_SITES (its dense W alone is 40 GB at 100,000 sites). Nothing here is asserted by
tests. `device` runs all of it on that device (torch-only gossip kernels off the CPU), each timed
call ending in a synchronisation, so that queued GPU work is counted.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from gossiplab.config import ModelConfig, TrainConfig
from gossiplab.merge import GossipAverager
from gossiplab.mixing import uniform
from gossiplab.models import build_model
from gossiplab.optim import build_optimizer
from gossiplab.population import Population
from gossiplab.sparse import SPARSE_FROM_SITES
from gossiplab.topology import build_adjacency

BATCH = 32
# model -> (input shape, model config, optimizer): the three families
MODELS: dict[str, tuple[tuple[int, ...], ModelConfig, TrainConfig]] = {
    "mlp": ((1, 28, 28), ModelConfig(name="mlp", hidden=[200, 200]), TrainConfig(optimizer="sgd", lr=0.05)),
    "cnn": ((1, 28, 28), ModelConfig(name="cnn", channels=[16, 32]), TrainConfig(optimizer="sgd", lr=0.05)),
    "head": ((384,), ModelConfig(name="mlp", hidden=[256]), TrainConfig(optimizer="adam", lr=1e-3)),
    # the scale goal's model: a linear head on 384-d frozen features, 3,850 parameters (15 KB) a site
    "linear-head": ((384,), ModelConfig(name="mlp", hidden=[]), TrainConfig(optimizer="sgd", lr=0.05)),
}
LOOP_SITES = 4096  # the per-site loop (N modules and optimizers) is timed up to this many sites


@dataclass
class Row:
    model: str
    sites: int
    parameters: int
    strategy: str
    loop_steps_per_s: float | None
    engine_steps_per_s: float
    other_strategy_steps_per_s: float | None
    speedup: float | None
    optimizer_share: float
    gflops: float
    kernel_limit_gflops: float | None
    fraction_of_kernel_limit: float | None
    fraction_of_peak: float
    gossip_ring_vs_copy: float
    gossip_complete_vs_copy: float | None
    gossip_ring_ms: float
    bytes_per_site: int
    resident_gb: float


def timed(fn: Callable[[], object], min_seconds: float = 0.2) -> float:
    """Seconds per call: calls repeated until min_seconds have passed."""
    fn()
    calls, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < min_seconds or calls < 2:
        fn()
        calls += 1
    return elapsed / calls


def synchronized(fn: Callable[[], object], device: torch.device) -> Callable[[], object]:
    """`fn`, then a wait for the device's queued work (nothing to wait for on the CPU)."""
    if device.type == "cpu":
        return fn

    def call() -> None:
        fn()
        torch.get_device_module(device.type).synchronize(device)

    return call


def interleaved(
    functions: dict[str, Callable[[], object]], repeats: int, min_seconds: float, device: torch.device | None = None
) -> dict[str, float]:
    """Median seconds per call of each function, measured in alternation."""
    device = device or torch.device("cpu")
    samples: dict[str, list[float]] = {k: [] for k in functions}
    for _ in range(repeats):
        for name, fn in functions.items():
            samples[name].append(timed(synchronized(fn, device), min_seconds))
    return {k: statistics.median(v) for k, v in samples.items()}


def training_flops(module: nn.Module, input_shape: tuple[int, ...]) -> int:
    """FLOPs (2 x multiply-adds) of one training step on one sample through the Linear and Conv2d
    layers: the forward pass, dW of every layer, and dX of every layer but the first, whose input
    is the data and needs no gradient (neither the engine nor the loop computes it)."""
    forward: list[int] = []

    def count(layer, _inputs, output):
        if isinstance(layer, nn.Linear):
            forward.append(2 * layer.in_features * layer.out_features)
        else:
            forward.append(2 * output[0].numel() * layer.in_channels * layer.kernel_size[0] * layer.kernel_size[1])

    hooks = [m.register_forward_hook(count) for m in module.modules() if isinstance(m, nn.Linear | nn.Conv2d)]
    with torch.no_grad():
        module(torch.zeros(1, *input_shape))
    for hook in hooks:
        hook.remove()
    return 3 * sum(forward) - forward[0]


def kernel_limit(module: nn.Module, sites: int, repeats: int, min_seconds: float, device: torch.device) -> float | None:
    """GFLOP/s of the bare batched matmuls a linear stack's training step needs, at its own shapes
    and memory layouts (nn.Linear's weight is [out, in]): forward x @ W^T, dW = g^T @ x and, past
    the first layer, dX = g @ W, for [N, B, in] inputs x and [N, B, out] output gradients g."""
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    if any(isinstance(m, nn.Conv2d) for m in module.modules()):
        return None
    flops, seconds = 0, 0.0
    for depth, layer in enumerate(linears):
        i, o = layer.in_features, layer.out_features
        x, w, g = (
            torch.randn(*shape, device=device) for shape in ((sites, BATCH, i), (sites, o, i), (sites, BATCH, o))
        )
        outs = tuple(
            torch.empty(*shape, device=device) for shape in ((sites, BATCH, o), (sites, BATCH, i), (sites, o, i))
        )
        kernels = {
            "forward": lambda x=x, w=w, out=outs[0]: torch.bmm(x, w.transpose(1, 2), out=out),
            "dw": lambda x=x, g=g, out=outs[2]: torch.bmm(g.transpose(1, 2), x, out=out),
        }
        if depth > 0:
            kernels["dx"] = lambda g=g, w=w, out=outs[1]: torch.bmm(g, w, out=out)
        seconds += sum(interleaved(kernels, repeats, min_seconds, device).values())
        flops += len(kernels) * 2 * sites * BATCH * i * o
    return flops / seconds / 1e9


def square_gemm_peak(device: torch.device, size: int = 2048) -> float:
    a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
    out = torch.empty(size, size, device=device)
    return 2 * size**3 / timed(synchronized(lambda: torch.mm(a, b, out=out), device), 0.5) / 1e9


def per_site_loop(module: nn.Module, theta: torch.Tensor, train: TrainConfig) -> Callable:
    """The papers' code: one nn.Module and one torch.optim optimizer per site, a loop over sites."""
    models = []
    for row in theta:
        model = copy.deepcopy(module).to(theta.device)
        torch.nn.utils.vector_to_parameters(row, model.parameters())
        models.append(model)
    if train.optimizer == "sgd":
        optimizers = [torch.optim.SGD(m.parameters(), lr=train.lr, momentum=train.momentum) for m in models]
    else:
        optimizers = [torch.optim.Adam(m.parameters(), lr=train.lr) for m in models]

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        for i, (model, optimizer) in enumerate(zip(models, optimizers, strict=True)):
            optimizer.zero_grad()
            F.cross_entropy(model(x[i]), y[i]).backward()
            optimizer.step()

    return step


def engine(
    module: nn.Module, sites: int, train: TrainConfig, strategy: str, device: torch.device
) -> tuple[Population, Callable, dict, int]:
    """The engine's population, its training step, the seconds the step has spent in total and
    in its optimizer update, timed inside the real step: updates timed alone, repeated on one fixed
    gradient, drove the models to where their gradients held denormal floats, and the engine's
    steps timed after them ran up to 2x slower; and the bytes a site holds (its row of theta, its
    gradient and its optimizer state)."""
    population = Population(copy.deepcopy(module), sites, seed=0, strategy=strategy, device=device)
    optimizer = build_optimizer(train, population.parameters.shape, population.theta.device)
    seconds = {"step": 0.0, "update": 0.0}

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        start = time.perf_counter()
        population.compute_gradients(x, y)
        middle = time.perf_counter()
        synchronized(lambda: optimizer.step(population.parameters, population.grad), device)()
        end = time.perf_counter()
        seconds["step"] += end - start
        seconds["update"] += end - middle

    state = [t for t in optimizer.state_dict().values() if isinstance(t, torch.Tensor)]
    floats = population.theta.shape[1] + population.num_parameters * (1 + len(state))
    return population, step, seconds, 4 * floats


def gossip_vs_copy(theta: torch.Tensor, repeats: int, min_seconds: float) -> dict[str, float]:
    """Seconds of one copy_ of theta into an existing tensor and of one gossip round on a ring (and,
    below SPARSE_FROM_SITES sites, on the complete graph)."""
    sites = len(theta)
    averager = GossipAverager(theta.shape, device=theta.device)
    target = torch.empty_like(theta)
    graphs = ("ring", "complete") if sites < SPARSE_FROM_SITES else ("ring",)
    work = theta.clone()
    weights = {t: uniform(build_adjacency(t, sites, 0, seed=0)) for t in graphs}
    rounds = {t: (lambda w=w: averager(work, w)) for t, w in weights.items()}
    return interleaved({"copy": lambda: target.copy_(theta), **rounds}, repeats, min_seconds, theta.device)


def resident_gb() -> float:
    """The process's resident memory now (Linux; 0 elsewhere), in GB."""
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) / 1e6 for line in status if line.startswith("VmRSS:"))
    except (OSError, StopIteration):
        return 0.0


def bench(
    models: list[str],
    sites: list[int],
    repeats: int = 3,
    min_seconds: float = 0.2,
    on_row: Callable | None = None,
    device: torch.device | None = None,
) -> tuple[list[Row], float]:
    """Every (model, N) row, and the square-GEMM peak in GFLOP/s measured in the same run, on `device`."""
    device = device or torch.device("cpu")
    peak = square_gemm_peak(device)
    rows = []
    generator = torch.Generator().manual_seed(0)
    for name in models:
        shape, model_config, train = MODELS[name]
        module = build_model(model_config, shape, 10)
        flops_per_sample = training_flops(module, shape)
        for n in sites:
            x = torch.randn(n, BATCH, *shape, generator=generator).to(device)
            y = torch.randint(0, 10, (n, BATCH), generator=generator).to(device)
            population, engine_step, engine_seconds, bytes_per_site = engine(module, n, train, "auto", device)
            steps = {"engine": lambda s=engine_step, x=x, y=y: s(x, y)}
            if n <= LOOP_SITES:
                other = "loop" if population.strategy == "vmap" else "vmap"
                _, other_step, _, _ = engine(module, n, train, other, device)
                loop_step = per_site_loop(module, population.theta, train)
                steps["loop"] = lambda s=loop_step, x=x, y=y: s(x, y)
                steps["other"] = lambda s=other_step, x=x, y=y: s(x, y)
            times = interleaved(steps, repeats, min_seconds, device)
            gflops = flops_per_sample * n * BATCH / times["engine"] / 1e9
            limit = kernel_limit(module, n, repeats, min_seconds / 4, device) if n <= LOOP_SITES else None
            gossip = gossip_vs_copy(population.theta, repeats, min_seconds / 4)
            row = Row(
                model=name,
                sites=n,
                parameters=population.num_parameters,
                strategy=population.strategy,
                loop_steps_per_s=1 / times["loop"] if "loop" in times else None,
                engine_steps_per_s=1 / times["engine"],
                other_strategy_steps_per_s=1 / times["other"] if "other" in times else None,
                speedup=times["loop"] / times["engine"] if "loop" in times else None,
                optimizer_share=engine_seconds["update"] / engine_seconds["step"],
                gflops=gflops,
                kernel_limit_gflops=limit,
                fraction_of_kernel_limit=None if limit is None else gflops / limit,
                fraction_of_peak=gflops / peak,
                gossip_ring_vs_copy=gossip["ring"] / gossip["copy"],
                gossip_complete_vs_copy=gossip["complete"] / gossip["copy"] if "complete" in gossip else None,
                gossip_ring_ms=gossip["ring"] * 1e3,
                bytes_per_site=bytes_per_site,
                resident_gb=resident_gb(),
            )
            rows.append(row)
            if on_row is not None:
                on_row(row)
    return rows, peak


def as_json(rows: list[Row], peak: float, device: str = "cpu") -> dict:
    return {
        "device": device,
        "batch_per_site": BATCH,
        "threads": torch.get_num_threads(),
        "square_gemm_peak_gflops": peak,
        "rows": [asdict(r) for r in rows],
    }
