"""All N sites' models as one [N, P] tensor, trained by one engine call.

`theta[i]` is site i's flat parameter vector; each layer's weights are reshaped views of a slice
of it, so gossip and merging are row operations on one tensor (MAZEL Algorithm 1, line 7) while
the forward pass sees ordinary parameter shapes through `torch.func.functional_call`.

Gradients are computed by one of three strategies into the preallocated [N, P] `grad` buffer;
where autograd is used, its leaves are the per-parameter stacked views of theta (slicing one
flat leaf would materialise a full [N, P] zero gradient per slice):
- "vmap": one vmapped forward over [N, B, ...] batches and one `autograd.grad` of the summed site
  losses; since sites share no parameters, each row's gradient is that site's own. The fresh
  per-parameter gradients are copied into their views of `grad`, one strided pass each
  (accumulating them into those views after zeroing `grad` streamed [N, P] three times).
  Used for non-convolutional models other than plain linear stacks (MAZEL's text head).
- "linear": for plain linear stacks (Flatten, Linear, ReLU, ..., Linear: the MLPs), the forward
  and backward pass written out as batched matmuls over a chunk of sites, with the weight
  gradients dW = g^T h written straight into their views of `grad` (vmap's autograd produces
  them transposed, and copying them back cost as much as the matmul) and no autograd graph.
  Fastest for MLPs on CPU.
- "loop": a Python loop over sites, each calling the model on views of its own row and writing
  its gradient into its own row of `grad`. Fastest
  for convolutions on CPU, where grouped/vmapped convolutions lose about 2x (DESIGN section 2).

A model's buffers (BatchNorm's running statistics) are per site too: each row of `theta` is the
site's whole state, its P parameters then its B buffers, so gossip, merges, checkpoints and the
distributed runtime carry the statistics with the weights; `parameters` is the [N, P] part the
optimizer steps and `grad` matches it. Training runs the module in train mode (BatchNorm updates
the statistics in place, in their columns of theta), evaluation in eval mode. Random layers
(dropout) draw from per-site random streams in the loop strategy, so site i's draws are those of a
lone `nn.Module` whose generator holds stream i; vmap draws for all its sites from one stream
(`randomness="different"`): reproducible, independent across sites, but not per-site streams.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap

from gossiplab.models import has_convolutions, has_random_layers
from gossiplab.registry import LOSSES

LossFunction = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
LOSSES.register("cross-entropy", F.cross_entropy)


def resolve_vector_math_dispatch() -> None:
    """Call each of torch's MKL vector-math functions once, on one number, before anything in the
    process calls them on several threads at once.

    oneMKL 2024.2 (in the torch 2.13 wheels) picks a function's kernel on its first call, and
    concurrent first calls from torch's worker threads could run one thread's share with a
    low-accuracy kernel (pytorch/pytorch#188792, whose fix is this warm-up). Seen here: the first
    torch.exp of a run gave the second thread's half 1.5e-4 relative error in about 3% of
    processes, and the same seed then gave another run."""
    for dtype in (torch.float32, torch.float64):
        one = torch.full((1,), 0.5, dtype=dtype)
        for function in (torch.acos, torch.asin, torch.atan, torch.cos, torch.erf, torch.erfc, torch.erfinv,
                         torch.exp, torch.expm1, torch.log, torch.log10, torch.log1p, torch.log2, torch.sin,
                         torch.sqrt, torch.tan, torch.tanh):  # fmt: skip
            function(one)


resolve_vector_math_dispatch()  # at import: gossiplab's package import runs it before any work


def is_linear_stack(module: nn.Module) -> bool:
    """Whether `module` is Flatten, (Linear, ReLU)*, Linear with biases: what models.mlp builds."""
    layers = list(module) if isinstance(module, nn.Sequential) else []
    if len(layers) < 2 or not isinstance(layers[0], nn.Flatten) or len(layers) % 2:
        return False
    kinds = [nn.Linear if k % 2 == 0 else nn.ReLU for k in range(len(layers) - 1)]
    return all(isinstance(m, kind) for m, kind in zip(layers[1:], kinds, strict=True)) and all(
        m.bias is not None for m in layers[1::2]
    )


def choose_strategy(module: nn.Module, requested: str, loss: LossFunction = F.cross_entropy) -> str:
    """'auto' picks the per-site loop for convolutional models on CPU and for models with random
    layers (per-site random streams), the written-out batched matmuls for linear stacks trained on
    cross-entropy (their backward pass is written for it) and vmap otherwise."""
    linear = is_linear_stack(module) and loss is F.cross_entropy
    if requested == "linear" and not linear:
        raise ValueError(
            "train.engine = 'linear' needs a plain linear stack (Linear and ReLU layers) and the cross-entropy loss"
        )
    if requested != "auto":
        return requested
    if has_convolutions(module) or has_random_layers(module):
        return "loop"
    return "linear" if linear else "vmap"


def state_entries(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """What a site's row holds: every parameter, then every persistent floating-point buffer and
    BatchNorm's step counter (held as a float): the model's state, what its `state_dict` saves.
    Non-persistent buffers (MAZEL's frozen class-name embeddings) and other integer buffers are
    constants of the architecture, held once in the module."""
    persistent = module.state_dict(keep_vars=True)
    buffers = [
        (name, b)
        for name, b in module.named_buffers()
        if name in persistent and (b.is_floating_point() or name.endswith("num_batches_tracked"))
    ]
    return [*module.named_parameters(), *buffers]


def initial_parameters(module: nn.Module, seed: int) -> torch.Tensor:
    """The module's default initialisation drawn under `seed`, flattened to [P + B] (its buffers
    reset too: BatchNorm's statistics to mean 0, variance 1, count 0)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for layer in module.modules():
            if hasattr(layer, "reset_parameters"):
                layer.reset_parameters()
            elif hasattr(layer, "reset_running_stats"):
                layer.reset_running_stats()
    return torch.cat(
        [value.detach().to(torch.get_default_dtype()).flatten().cpu() for _, value in state_entries(module)]
    )


def site_seed(seed: int, purpose: int, site: int) -> int:
    """A 32-bit seed for one site of the run and one purpose (1: its initialisation, 2: its random
    stream), the same wherever the site is held."""
    return int(np.random.SeedSequence([seed, purpose, site]).generate_state(1)[0])


def random_stream(seed: int, device: torch.device) -> torch.Tensor:
    """The state of `device`'s generator seeded with `seed`: one site's random stream."""
    return torch.Generator(device).manual_seed(seed).get_state()


@contextlib.contextmanager
def drawing_from(stream: torch.Tensor, device: torch.device) -> Iterator[None]:
    """Random layers inside draw from `stream` (a generator state, advanced in place); the
    process's own random state is left as it was."""
    with torch.random.fork_rng(devices=[] if device.type == "cpu" else [device], device_type=device.type):
        if device.type == "cpu":
            torch.set_rng_state(stream.clone())
        else:
            torch.get_device_module(device.type).set_rng_state(stream.clone(), device)
        yield
        after = (
            torch.get_rng_state()
            if device.type == "cpu"
            else torch.get_device_module(device.type).get_rng_state(device)
        )
        stream.copy_(after)


class Population:
    """N copies of one architecture: each site's parameters and buffers in a row of `theta: [N, P + B]`,
    its gradient in `grad: [N, P]`."""

    # vmap over chunks of sites whose parameters total about this many floats: a chunk's
    # parameters, gradients and activations stay in cache (measured with gossiplab bench)
    VMAP_CHUNK_FLOATS = 2**21
    LINEAR_CHUNK_FLOATS = 2**24  # measured best of 2**19..2**26 (larger chunks: bigger matmuls)
    EVAL_CHUNK_INPUTS = 4096  # inputs per forward pass when evaluating one model at a time

    @classmethod
    def sites_at_once(cls, strategy: str, num_sites: int, num_parameters: int) -> int:
        """How many sites one forward and backward pass trains (their activations live together)."""
        if strategy == "linear":
            return -(-num_sites // cls._linear_chunk_count(num_sites, num_parameters))
        if strategy == "vmap":
            return max(1, min(num_sites, cls.VMAP_CHUNK_FLOATS // num_parameters))
        return 1

    @classmethod
    def _linear_chunk_count(cls, num_sites: int, num_parameters: int) -> int:
        """Equal chunks of sites, as few as keep each chunk's parameters within LINEAR_CHUNK_FLOATS."""
        return -(-num_sites * num_parameters // cls.LINEAR_CHUNK_FLOATS)

    def __init__(
        self,
        module: nn.Module,
        num_sites: int,
        *,
        seed: int,
        init: str = "shared",
        strategy: str = "auto",
        class_mask: torch.Tensor | None = None,
        first_site: int = 0,
        loss: LossFunction = F.cross_entropy,
        device: torch.device | str = "cpu",
        model_name: str = "",
    ):
        self.device = torch.device(device)
        self.module = module.to(self.device).train()
        self.model_name = model_name  # the config's model.name it was built from ('' when a user made it)
        self.loss = loss  # loss(logits [B, C], targets [B]) -> the batch's mean loss, a scalar
        # [N, C] bool: the classes each site may predict (its own label space, MAZEL); None: all.
        self.class_mask = None if class_mask is None else class_mask.to(self.device)
        self.num_sites = num_sites
        entries = state_entries(module)
        self.names = [name for name, _ in entries]
        self.shapes = [value.shape for _, value in entries]
        sizes = [math.prod(s) for s in self.shapes]
        self.slices = [slice(o, o + n) for o, n in zip(np.cumsum([0, *sizes[:-1]]).tolist(), sizes, strict=True)]
        self.num_parameters = sum(p.numel() for p in module.parameters())
        self.parameter_names = [name for name, _ in module.named_parameters()]  # the first entries of a row
        self.num_buffers = sum(sizes) - self.num_parameters
        self.theta = torch.empty(num_sites, sum(sizes), device=self.device)
        # the trainable part; the same tensor as theta when the model has no buffers
        self.parameters = self.theta[:, : self.num_parameters] if self.num_buffers else self.theta
        self.grad = torch.zeros(num_sites, self.num_parameters, device=self.device)
        self._buffer_pairs: list[tuple[torch.Tensor, torch.Tensor]] = []  # (view of theta, the forward's own copy)
        if init == "shared":
            self.theta.copy_(initial_parameters(module, seed).expand(num_sites, -1))
        else:
            for i in range(num_sites):  # site first_site + i of the run, wherever it is held
                self.theta[i] = initial_parameters(module, site_seed(seed, 1, first_site + i))
        self.strategy = choose_strategy(module, strategy, loss)
        # per-site random streams (the loop), or one for all sites (vmap); none without random layers
        streams = (num_sites if self.strategy == "loop" else 1) if has_random_layers(module) else 0
        self.random_streams = torch.empty(0, dtype=torch.uint8)
        if streams:
            sites = range(first_site, first_site + streams)
            self.random_streams = torch.stack([random_stream(site_seed(seed, 2, s), self.device) for s in sites])
        if self.strategy == "linear":
            bounds = torch.arange(num_sites).tensor_split(self._linear_chunk_count(num_sites, self.num_parameters))
            self._linear_chunks = [slice(int(b[0]), int(b[-1]) + 1) for b in bounds if len(b)]
            weights = [n for n in self.names if n.endswith(".weight")]
            self._linear_layers = [(w, w.removesuffix("weight") + "bias") for w in weights]  # input to output
        elif self.strategy == "vmap":
            size = self.sites_at_once(self.strategy, num_sites, self.theta.shape[1])
            self._chunks = [
                (sites, self._make_leaves(sites), list(self.views(self.grad[sites]).values()))
                for sites in (slice(a, a + size) for a in range(0, num_sites, size))
            ]
        else:
            self._site_leaves = [self._make_leaves(i) for i in range(num_sites)]

    def views(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """Views of rows [M, W] as name -> [M, *shape] (or of one row [W] as name -> shape): of
        parameters and buffers for rows of theta, of parameters only for rows of `grad`."""
        lead = rows.shape[:-1]
        return {
            n: rows[..., s].view((*lead, *shape))
            for n, s, shape in zip(self.names, self.slices, self.shapes, strict=True)
            if s.stop <= rows.shape[-1]
        }

    def _make_leaves(self, sites: int | slice) -> dict[str, torch.Tensor]:
        """Per-parameter views of theta's `sites` rows as autograd leaves: the forward pass reads
        theta in place. Each buffer is a tensor of its own instead, which BatchNorm updates in
        place during the forward pass (an in-place write into theta, or into any storage several
        buffers share, bumps the version counter that tensors saved for the backward share, and
        autograd refuses the backward); `_buffers_updated` copies them from and back to theta."""
        rows = self.theta[sites].detach()
        leaves = {}
        for name, view in self.views(rows).items():
            if name in self.parameter_names:
                leaves[name] = view.requires_grad_()
            else:
                leaves[name] = view.clone()
                self._buffer_pairs.append((view, leaves[name]))
        return leaves

    @contextlib.contextmanager
    def _buffers_updated(self) -> Iterator[None]:
        """Inside, each buffer's own copy holds its values from theta; after, theta holds the
        values the forward passes left in them."""
        if not self._buffer_pairs:
            yield
            return
        in_theta, own = (list(t) for t in zip(*self._buffer_pairs, strict=True))
        torch._foreach_copy_(own, in_theta)
        yield
        torch._foreach_copy_(in_theta, own)

    def normalization_columns(self) -> torch.Tensor:
        """Columns of theta that belong to normalisation layers (BatchNorm, GroupNorm, LayerNorm,
        InstanceNorm): their affine parameters and running statistics."""
        norms = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
        prefixes = tuple(f"{name}." for name, m in self.module.named_modules() if isinstance(m, norms))
        columns = [
            torch.arange(s.start, s.stop)
            for n, s in zip(self.names, self.slices, strict=True)
            if n.startswith(prefixes)
        ]
        return torch.cat(columns) if columns else torch.empty(0, dtype=torch.long)

    @contextlib.contextmanager
    def keeping_local(self, columns: torch.Tensor) -> Iterator[None]:
        """What happens inside leaves theta's `columns` as they were: FedBN's local normalisation
        layers (Li et al. 2021) under any algorithm's communication."""
        columns = columns.to(self.device)
        kept = self.theta[:, columns].clone() if len(columns) else None
        yield
        if kept is not None:
            self.theta[:, columns] = kept

    @torch.no_grad()
    def reestimate_statistics(self, batches: list[torch.Tensor]) -> None:
        """Reset every site's BatchNorm statistics and recompute them on its own batches
        ([N, B, ...] each), as the cumulative average (momentum None) of their batch statistics:
        DIMAT's code does this after each matched merge, whose averaged statistics belong to no
        network. BatchNorm layers run in train mode, every other layer (dropout) in eval mode."""
        norms = [m for m in self.module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        if not norms:
            return
        prefixes = tuple(f"{name}." for name, m in self.module.named_modules() if m in norms)
        momenta = [m.momentum for m in norms]
        self.module.eval()
        for norm in norms:
            norm.momentum = None
            norm.train()
        try:
            for name, view in self.views(self.theta).items():
                if name.startswith(prefixes) and not name.endswith(("weight", "bias")):
                    view.fill_(1.0 if name.endswith("running_var") else 0.0)
            for x in batches:
                x = x.to(self.device)
                for i in range(self.num_sites):
                    self._forward(self.views(self.theta[i]), x[i])
        finally:
            for norm, momentum in zip(norms, momenta, strict=True):
                norm.momentum = momentum
            self.module.train()

    @contextlib.contextmanager
    def evaluating(self) -> Iterator[None]:
        """The module in eval mode inside (BatchNorm on running statistics, no dropout)."""
        self.module.eval()
        try:
            yield
        finally:
            self.module.train()

    def _forward(self, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.module, params, (x,))

    def _site_loss(self, params: dict, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """One site's loss on its batch, over its own classes when it has a class mask."""
        logits = self._forward(params, x)
        if mask is not None:
            logits = logits.masked_fill(~mask, -torch.inf)
        return self.loss(logits, y)

    def compute_gradients(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Write every site's gradient of its loss on its batch into `grad`; return the losses [N]."""
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        with self._buffers_updated():
            return self._compute_gradients(x, y).cpu()

    def _compute_gradients(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        losses = torch.empty(self.num_sites, device=self.device)
        if self.strategy == "linear":
            for sites in self._linear_chunks:
                losses[sites] = self._linear_stack_gradients(x[sites], y[sites], sites, self.views(self.grad[sites]))
            return losses
        if self.strategy == "vmap":
            with self._vmap_randomness() as randomness:
                for sites, leaves, grad_views in self._chunks:
                    chunk_losses = self._vmapped_losses(leaves, x[sites], y[sites], sites, randomness)
                    grads = torch.autograd.grad(chunk_losses.sum(), [leaves[n] for n in self.parameter_names])
                    for view, g in zip(grad_views, grads, strict=True):
                        view.copy_(g)  # one strided pass; weight gradients come out transposed from bmm
                    losses[sites] = chunk_losses.detach()
            return losses
        for i, leaves in enumerate(self._site_leaves):
            stream = (
                drawing_from(self.random_streams[i], self.device)
                if len(self.random_streams)
                else contextlib.nullcontext()
            )
            with stream:
                loss = self._site_loss(leaves, x[i], y[i], None if self.class_mask is None else self.class_mask[i])
            grads = torch.autograd.grad(loss, [leaves[n] for n in self.parameter_names])
            torch.cat([g.flatten() for g in grads], out=self.grad[i])
            losses[i] = loss.detach()
        return losses

    @contextlib.contextmanager
    def _vmap_randomness(self) -> Iterator[str]:
        """vmap's randomness mode: 'different' draws from the population's one stream."""
        if not len(self.random_streams):
            yield "error"
            return
        with drawing_from(self.random_streams[0], self.device):
            yield "different"

    @torch.no_grad()
    def _linear_stack_gradients(
        self, x: torch.Tensor, y: torch.Tensor, sites: slice, grad: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """Forward and backward of the linear stack for a chunk of sites, gradients into `grad`
        (name -> [chunk, *shape]); returns the chunk's losses.

        Forward: h_l = relu(h_{l-1} W_l^T + b_l) (no relu on the logits). Backward of the mean
        cross-entropy: g_L = (softmax(logits) - onehot(y)) / B; then per layer dW_l = g_l^T h_{l-1},
        db_l = sum_B g_l, and g_{l-1} = (g_l W_l) * [h_{l-1} > 0] (ReLU's derivative at its output).
        """
        theta = self.views(self.theta[sites])
        activations = [x.flatten(2)]
        for k, (weight, bias) in enumerate(self._linear_layers):
            h = torch.baddbmm(theta[bias].unsqueeze(1), activations[-1], theta[weight].transpose(1, 2))
            activations.append(h.relu_() if k < len(self._linear_layers) - 1 else h)
        logits = activations.pop()
        if self.class_mask is not None:
            logits.masked_fill_(~self.class_mask[sites, None, :], -torch.inf)
        log_probabilities = torch.log_softmax(logits, -1)
        losses = -log_probabilities.gather(-1, y.unsqueeze(-1)).squeeze(-1).mean(1)
        # softmax computes its own exp; log_probabilities.exp_() would be MKL's vector math, whose
        # first call gave one thread's half 1e-4 relative error in 3% of processes (see
        # resolve_vector_math_dispatch); log_softmax's exp was exact in those processes
        g = torch.softmax(logits, -1)
        g.scatter_add_(-1, y.unsqueeze(-1), torch.full(y.unsqueeze(-1).shape, -1.0, device=g.device))
        g.div_(y.shape[1])
        for weight, bias in reversed(self._linear_layers):
            h = activations.pop()
            torch.bmm(g.transpose(1, 2), h, out=grad[weight])
            torch.sum(g, 1, out=grad[bias])
            if activations:
                g = torch.ops.aten.threshold_backward(torch.bmm(g, theta[weight]), h, 0.0)
        return losses

    def _vmapped_losses(
        self, params: dict, x: torch.Tensor, y: torch.Tensor, sites: slice, randomness: str = "error"
    ) -> torch.Tensor:
        """Losses [sites] of the stacked models `params` of `sites` on their own batches, each
        over its site's own classes when a class mask is set."""
        mask = None if self.class_mask is None else self.class_mask[sites]
        site_loss = vmap(self._site_loss, in_dims=(0, 0, 0, None if mask is None else 0), randomness=randomness)
        return site_loss(params, x, y, mask)

    def site_losses(self, rows: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Losses [N] of the models rows [N, W] (differentiable in them) on their own batches
        x [N, B, ...], in eval mode: what L2C differentiates through the aggregation."""
        with self.evaluating():
            return self._vmapped_losses(self.views(rows), x.to(self.device), y.to(self.device), slice(None))

    @torch.no_grad()
    def logits(self, rows: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Outputs [M, n, C] of the models rows [M, W] on shared inputs x [n, ...], in eval mode.

        Only the "vmap" strategy's models are vmapped here, all M at once on chunks of inputs: for
        MLPs and CNNs one model at a time on a chunk of inputs is already one large matmul per layer,
        and measured faster (16 MLPs on 2,000 inputs: 55 ms, vmapped 70 ms)."""
        with self.evaluating():
            if self.strategy == "vmap":
                chunk, params = max(16, 2**16 // len(rows)), self.views(rows)
                forward = vmap(self._forward, in_dims=(0, None))
                return torch.cat([forward(params, x[start : start + chunk]) for start in range(0, len(x), chunk)], 1)
            return torch.stack([self._model_logits(row, x) for row in rows])

    def _model_logits(self, row: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Outputs [n, C] of one model row [W] on x, EVAL_CHUNK_INPUTS inputs per forward pass: a
        chunk size that does not shrink with the number of models (it was 2**16 / M inputs, and at
        M = 1,000 the fixed cost of 150,000 forward calls per evaluation took most of the run)."""
        params, chunk = self.views(row), self.EVAL_CHUNK_INPUTS
        return torch.cat([self._forward(params, x[start : start + chunk]) for start in range(0, len(x), chunk)])

    @torch.no_grad()
    def predict(self, rows: torch.Tensor, x: torch.Tensor, allowed: torch.Tensor | None = None) -> torch.Tensor:
        """Class predictions [M, n] of the models rows [M, W] on shared inputs x [n, ...]; with
        `allowed` [n, C] bool, each input is classified among its allowed classes only. Models that
        are not vmapped are classified one at a time, never holding all M x n x C outputs."""

        def classify(logits: torch.Tensor) -> torch.Tensor:
            return (logits if allowed is None else logits.masked_fill_(~allowed, -torch.inf)).argmax(-1)

        if self.strategy == "vmap":
            return classify(self.logits(rows, x))
        with self.evaluating():
            return torch.stack([classify(self._model_logits(row, x)) for row in rows])
