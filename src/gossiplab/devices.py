"""Where a run's tensors live (`train.device`), which kernels mix them (`train.kernels`), and on
how many CPU threads it computes (`train.threads`).

Off the CPU everything of the run stays on the device: the population, the optimizer's state,
the batches, the test sets and the evaluation. The compiled (numba) gossip kernels work on CPU
memory only, so a device run uses the torch-only kernels; on the CPU they are selectable
(`train.kernels = "torch"`) and tested equal to the compiled ones.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import re
from typing import Any

import torch

DEVICES_HELP = "cpu, cuda, cuda:K, mps or auto (cuda, else mps, else cpu)"

# PyTorch's thread count when gossiplab was imported (OMP_NUM_THREADS if set, else the physical
# cores): what `train.threads = 0` resolves to. Read once, so that a run in a process where an
# earlier run pinned another count still resolves 0 the same way.
STARTING_THREADS = torch.get_num_threads()


def resolved_threads(requested: int) -> int:
    """The thread count a run computes with: `train.threads`, or for 0 the process's starting count.

    The matrix kernels (MKL, oneDNN) split a reduction across threads in an order that depends on
    the thread count and on the CPU's code path, so the same seed gives the same bits only for the
    same count on the same kind of CPU: the run pins it, and config.toml records the number.
    """
    return requested or STARTING_THREADS


class PinnedCompute:
    """What a run's bits depend on in this process, set for the run and given back after it: the
    thread count, and on CUDA deterministic kernels (`torch.use_deterministic_algorithms`, with
    cuBLAS's fixed workspace, CUBLAS_WORKSPACE_CONFIG=:4096:8, unless the user set one; an op
    without a deterministic CUDA kernel warns instead of failing). The CPU kernels a run uses are
    deterministic for a given thread count already."""

    def __init__(self, threads: int, device: torch.device):
        self.threads, self.device = threads, device
        self._before = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(),
                        torch.is_deterministic_algorithms_warn_only_enabled())  # fmt: skip
        torch.set_num_threads(threads)
        if device.type == "cuda":
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=True)

    def restore(self) -> None:
        threads, deterministic, warn_only = self._before
        torch.set_num_threads(threads)
        if self.device.type == "cuda":  # torch.use_deterministic_algorithms imports torch._inductor: 3-4 s
            torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)


def with_pinned_threads(flat: dict[str, Any]) -> dict[str, Any]:
    """A flattened config with `train.threads` resolved, for comparing a config as given (0) with
    one a run wrote (its count) and with those written before runs recorded their count (0)."""
    return {**flat, "train.threads": resolved_threads(flat.get("train.threads", 0))}


def platform_record(threads: int, device: torch.device) -> dict[str, Any]:
    """What a run's bits depend on besides its config: summary.json keeps it beside the metrics."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), cpu)
    except OSError:
        pass
    record = {
        "threads": threads,
        "torch": torch.__version__,
        "cpu": cpu,
        "cpu_kernels": torch.backends.cpu.get_cpu_capability(),  # PyTorch's vector kernels: AVX512, AVX2, ...
        "device": str(device),
    }
    if device.type == "cuda":
        record["gpu"] = torch.cuda.get_device_name(device)
        record["deterministic_algorithms"] = torch.are_deterministic_algorithms_enabled()
    return record


def device_problem(name: str) -> str | None:
    """Why `train.device = name` cannot run on this machine, or None."""
    if name in ("cpu", "auto"):
        return None
    match = re.fullmatch(r"cuda(?::(\d+))?", name)
    if match:
        if not torch.cuda.is_available():
            return "CUDA is not available on this machine (torch.cuda.is_available() is False)"
        index = int(match.group(1) or 0)
        if index >= torch.cuda.device_count():
            return f"this machine has {torch.cuda.device_count()} CUDA devices (cuda:0..)"
        return None
    if name == "mps":
        return None if torch.backends.mps.is_available() else "MPS is not available on this machine"
    return f"unknown device; allowed: {DEVICES_HELP}"


def resolve_device(name: str) -> torch.device:
    """The torch device of `train.device`; 'cuda' under torchrun is this process's local GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if name == "cuda" and "LOCAL_RANK" in os.environ:
        name = f"cuda:{int(os.environ['LOCAL_RANK']) % torch.cuda.device_count()}"
    return torch.device(name)


def compiled_kernels_installed() -> bool:
    """Whether numba is installed (the `compiled` extra); without it every gossip runs on torch."""
    return importlib.util.find_spec("numba") is not None


def resolve_kernels(kernels: str, device: torch.device) -> str:
    """'auto': the compiled kernels on the CPU when numba is installed, torch's otherwise."""
    if kernels == "auto":
        return "numba" if device.type == "cpu" and compiled_kernels_installed() else "torch"
    return kernels


def available_device_memory(device: torch.device) -> int | None:
    """Free bytes on an accelerator (None on the CPU, whose memory the run checks separately)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return None
