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
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap

from gossiplab.models import has_convolutions


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


def choose_strategy(module: nn.Module, requested: str) -> str:
    """'auto' picks the per-site loop for convolutional models on CPU, the written-out batched
    matmuls for linear stacks and vmap otherwise."""
    if requested == "linear" and not is_linear_stack(module):
        raise ValueError("train.engine = 'linear' needs a plain linear stack (Linear and ReLU layers)")
    if requested != "auto":
        return requested
    if has_convolutions(module):
        return "loop"
    return "linear" if is_linear_stack(module) else "vmap"


def initial_parameters(module: nn.Module, seed: int) -> torch.Tensor:
    """The module's default initialisation drawn under `seed`, flattened to [P]."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for layer in module.modules():
            if hasattr(layer, "reset_parameters"):
                layer.reset_parameters()
    return torch.cat([p.detach().flatten() for p in module.parameters()])


class Population:
    """N copies of one architecture with parameters in `theta: [N, P]` and gradients in `grad: [N, P]`."""

    # vmap over chunks of sites whose parameters total about this many floats: a chunk's
    # parameters, gradients and activations stay in cache (measured with gossiplab bench)
    VMAP_CHUNK_FLOATS = 2**21
    LINEAR_CHUNK_FLOATS = 2**24  # measured best of 2**19..2**26 (larger chunks: bigger matmuls)
    EVAL_CHUNK_INPUTS = 4096  # inputs per forward pass when evaluating one model at a time

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
    ):
        self.module = module
        # [N, C] bool: the classes each site may predict (its own label space, MAZEL); None: all.
        self.class_mask = class_mask
        self.num_sites = num_sites
        self.names = [name for name, _ in module.named_parameters()]
        self.shapes = [p.shape for _, p in module.named_parameters()]
        sizes = [math.prod(s) for s in self.shapes]
        self.slices = [slice(o, o + n) for o, n in zip(np.cumsum([0, *sizes[:-1]]).tolist(), sizes, strict=True)]
        self.num_parameters = sum(sizes)
        self.theta = torch.empty(num_sites, self.num_parameters)
        self.grad = torch.zeros(num_sites, self.num_parameters)
        if init == "shared":
            self.theta.copy_(initial_parameters(module, seed).expand(num_sites, -1))
        else:
            for i in range(num_sites):  # site first_site + i of the run, wherever it is held
                site_seed = int(np.random.SeedSequence([seed, 1, first_site + i]).generate_state(1)[0])
                self.theta[i] = initial_parameters(module, site_seed)
        self.strategy = choose_strategy(module, strategy)
        if self.strategy == "linear":
            chunks = -(-num_sites * self.num_parameters // self.LINEAR_CHUNK_FLOATS)  # equal chunks, as few as fit
            bounds = torch.arange(num_sites).tensor_split(chunks)
            self._linear_chunks = [slice(int(b[0]), int(b[-1]) + 1) for b in bounds if len(b)]
            weights = [n for n in self.names if n.endswith(".weight")]
            self._linear_layers = [(w, w.removesuffix("weight") + "bias") for w in weights]  # input to output
        elif self.strategy == "vmap":
            size = max(1, min(num_sites, self.VMAP_CHUNK_FLOATS // self.num_parameters))
            self._chunks = [
                (sites, self._make_leaves(self.theta[sites]), list(self.views(self.grad[sites]).values()))
                for sites in (slice(a, a + size) for a in range(0, num_sites, size))
            ]
        else:
            self._site_leaves = [self._make_leaves(self.theta[i]) for i in range(num_sites)]

    def views(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """Parameter views of rows [M, P] as name -> [M, *shape] (or of one row [P] as name -> shape)."""
        lead = rows.shape[:-1]
        return {
            n: rows[..., s].view(*lead, *shape)
            for n, s, shape in zip(self.names, self.slices, self.shapes, strict=True)
        }

    def _make_leaves(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-parameter views of `rows` as autograd leaves: the forward pass reads theta in place."""
        return {name: view.requires_grad_() for name, view in self.views(rows.detach()).items()}

    def _forward(self, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.module, params, (x,))

    def compute_gradients(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Write every site's gradient of its mean cross-entropy on its batch into `grad`; return the losses [N]."""
        losses = torch.empty(self.num_sites)
        if self.strategy == "linear":
            for sites in self._linear_chunks:
                losses[sites] = self._linear_stack_gradients(x[sites], y[sites], sites, self.views(self.grad[sites]))
            return losses
        if self.strategy == "vmap":
            for sites, leaves, grad_views in self._chunks:
                chunk_losses = self._vmapped_losses(leaves, x[sites], y[sites], sites)
                grads = torch.autograd.grad(chunk_losses.sum(), list(leaves.values()))
                for view, g in zip(grad_views, grads, strict=True):
                    view.copy_(g)  # one strided pass; weight gradients come out transposed from bmm
                losses[sites] = chunk_losses.detach()
            return losses
        for i, leaves in enumerate(self._site_leaves):
            logits = self._forward(leaves, x[i])
            if self.class_mask is not None:
                logits = logits.masked_fill(~self.class_mask[i], -torch.inf)
            loss = F.cross_entropy(logits, y[i])
            grads = torch.autograd.grad(loss, list(leaves.values()))
            torch.cat([g.flatten() for g in grads], out=self.grad[i])
            losses[i] = loss.detach()
        return losses

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
        g.scatter_add_(-1, y.unsqueeze(-1), torch.full(y.unsqueeze(-1).shape, -1.0))
        g.div_(y.shape[1])
        for weight, bias in reversed(self._linear_layers):
            h = activations.pop()
            torch.bmm(g.transpose(1, 2), h, out=grad[weight])
            torch.sum(g, 1, out=grad[bias])
            if activations:
                g = torch.ops.aten.threshold_backward(torch.bmm(g, theta[weight]), h, 0.0)
        return losses

    def _vmapped_losses(self, params: dict, x: torch.Tensor, y: torch.Tensor, sites: slice) -> torch.Tensor:
        """Mean cross-entropy of the stacked models `params` of `sites` on their own batches, each
        over its site's own classes when a class mask is set."""
        logits = vmap(self._forward)(params, x)
        if self.class_mask is not None:
            logits = logits.masked_fill(~self.class_mask[sites, None, :], -torch.inf)
        return F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view(y.shape).mean(1)

    def site_losses(self, rows: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy [N] of the models rows [N, P] (differentiable in them) on their own
        batches x [N, B, ...]: what L2C differentiates through the aggregation."""
        return self._vmapped_losses(self.views(rows), x, y, slice(None))

    @torch.no_grad()
    def logits(self, rows: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Outputs [M, n, C] of the models rows [M, P] on shared inputs x [n, ...].

        Only the "vmap" strategy's models are vmapped here, all M at once on chunks of inputs: for
        MLPs and CNNs one model at a time on a chunk of inputs is already one large matmul per layer,
        and measured faster (16 MLPs on 2,000 inputs: 55 ms, vmapped 70 ms)."""
        if self.strategy == "vmap":
            chunk, params = max(16, 2**16 // len(rows)), self.views(rows)
            forward = vmap(self._forward, in_dims=(0, None))
            return torch.cat([forward(params, x[start : start + chunk]) for start in range(0, len(x), chunk)], 1)
        return torch.stack([self._model_logits(row, x) for row in rows])

    def _model_logits(self, row: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Outputs [n, C] of one model row [P] on x, EVAL_CHUNK_INPUTS inputs per forward pass: a
        chunk size that does not shrink with the number of models (it was 2**16 / M inputs, and at
        M = 1,000 the fixed cost of 150,000 forward calls per evaluation took most of the run)."""
        params, chunk = self.views(row), self.EVAL_CHUNK_INPUTS
        return torch.cat([self._forward(params, x[start : start + chunk]) for start in range(0, len(x), chunk)])

    @torch.no_grad()
    def predict(self, rows: torch.Tensor, x: torch.Tensor, allowed: torch.Tensor | None = None) -> torch.Tensor:
        """Class predictions [M, n] of the models rows [M, P] on shared inputs x [n, ...]; with
        `allowed` [n, C] bool, each input is classified among its allowed classes only. Models that
        are not vmapped are classified one at a time, never holding all M x n x C outputs."""

        def classify(logits: torch.Tensor) -> torch.Tensor:
            return (logits if allowed is None else logits.masked_fill_(~allowed, -torch.inf)).argmax(-1)

        if self.strategy == "vmap":
            return classify(self.logits(rows, x))
        return torch.stack([classify(self._model_logits(row, x)) for row in rows])
