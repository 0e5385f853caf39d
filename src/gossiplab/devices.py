"""Where a run's tensors live (`train.device`) and which kernels mix them (`train.kernels`).

Off the CPU everything of the run stays on the device: the population, the optimizer's state,
the batches, the test sets and the evaluation. The compiled (numba) gossip kernels work on CPU
memory only, so a device run uses the torch-only kernels; on the CPU they are selectable
(`train.kernels = "torch"`) and tested equal to the compiled ones.
"""

from __future__ import annotations

import os
import re

import torch

DEVICES_HELP = "cpu, cuda, cuda:K, mps or auto (cuda, else mps, else cpu)"


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


def resolve_kernels(kernels: str, device: torch.device) -> str:
    """'auto': the compiled kernels on the CPU, torch's elsewhere."""
    if kernels == "auto":
        return "numba" if device.type == "cpu" else "torch"
    return kernels


def available_device_memory(device: torch.device) -> int | None:
    """Free bytes on an accelerator (None on the CPU, whose memory the run checks separately)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return None
