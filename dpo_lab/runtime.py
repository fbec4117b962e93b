"""Device choice, CPU threads and seeding: the pieces of global state every stage touches.

One device decision for every stage: :func:`resolve_device` maps a request (``--device``,
``$DPO_LAB_DEVICE`` or nothing) to a ``torch.device``, and :func:`make_accelerator` hands exactly
that device to ``accelerate`` (through its ``ACCELERATE_TORCH_DEVICE`` setting), so a trainer's
``accelerator.device`` and the device of ``prepare`` and ``preferences`` are always the same one,
``cuda:1`` included. Under ``accelerate launch`` with several processes the launcher assigns one
device per process and only the device *type* of the request is used.

Mixed precision is chosen by :func:`resolve_precision`: bf16 where the GPU has it, else fp16 with
gradient scaling. What several processes share is in :mod:`dpo_lab.processes`.
"""

from __future__ import annotations

import os
import random

import numpy as np
import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DataLoaderConfiguration

from dpo_lab import processes
from dpo_lab.processes import launched_processes
from dpo_lab.profiles import PRECISIONS

DEVICE_ENV_VAR = "DPO_LAB_DEVICE"
DEVICE_TYPES = ("cpu", "cuda", "mps")
ACCELERATE_DEVICE_VAR = "ACCELERATE_TORCH_DEVICE"


def use_threads(threads: int) -> None:
    """Run torch's CPU operations on ``threads`` threads (0: leave torch's setting as it is).

    The small models of the CPU profiles lose more to thread contention than they gain from a second
    thread on a busy machine (``benchmarks/threads.py``), so each profile names its own count.
    """
    if threads < 0:
        raise ValueError(f"threads must be >= 0 (0 keeps torch's default), got {threads}")
    if threads:
        torch.set_num_threads(threads)


def resolve_precision(requested: str, device: torch.device) -> str:
    """The mixed precision a run uses: ``requested``, or for ``auto`` the best the device supports.

    ``auto``: bf16 on a GPU that supports it, fp16 (with gradient scaling, by ``accelerate``) on
    one that does not (a T4, a V100), full precision (``no``) on the CPU and MPS. An explicit
    ``bf16`` on a CUDA GPU without it raises ``ValueError`` naming ``fp16`` as the way out.
    """
    if requested not in PRECISIONS:
        raise ValueError(f"mixed precision must be one of {', '.join(PRECISIONS)}, got {requested!r}")
    cuda = device.type == "cuda"
    has_bf16 = cuda and torch.cuda.is_bf16_supported()
    if requested == "auto":
        return ("bf16" if has_bf16 else "fp16") if cuda else "no"
    if requested == "bf16" and cuda and not has_bf16:
        raise ValueError(f"{torch.cuda.get_device_name(device)} has no bf16; use --precision fp16 (or auto)")
    return requested


def resolve_device(preferred: str | torch.device | None = None) -> torch.device:
    """The device a stage runs on: ``preferred`` or ``$DPO_LAB_DEVICE``, else CUDA, then Apple MPS, then CPU.

    Raises ``ValueError`` for a malformed name, a device type other than cpu/cuda/mps, or a device
    that is not available (a CUDA index beyond the visible GPUs included).
    """
    choice = preferred or os.environ.get(DEVICE_ENV_VAR)
    if not choice:
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if torch.backends.mps.is_available() else torch.device("cpu")
    try:
        device = torch.device(choice)
    except RuntimeError:
        raise ValueError(f"device {str(choice)!r} is not a device name; use one of cpu, cuda, cuda:N, mps") from None
    if device.type not in DEVICE_TYPES:
        raise ValueError(f"device {str(choice)!r} is not supported; use one of cpu, cuda, cuda:N, mps")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(choice)!r} requested but CUDA is not available")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {str(choice)!r} requested but only {torch.cuda.device_count()} GPU(s) are visible")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {str(choice)!r} requested but Apple MPS is not available")
    return device


def device_state(preferred: str | torch.device | None = None) -> PartialState:
    """accelerate's process state on the device of :func:`resolve_device` (see the module docstring).

    In a single process, the resolved device (``cuda:1`` included) is what accelerate uses. Under
    a multi-process launch, the launcher's per-process device is kept (CPU processes if the
    request is the CPU). accelerate fixes the device once per process: a later request for
    another device raises ``ValueError`` instead of silently running elsewhere.
    """
    device = resolve_device(preferred)
    single = launched_processes() == 1
    if single and not PartialState._shared_state:
        os.environ[ACCELERATE_DEVICE_VAR] = str(device)
        try:
            processes.process_state(cpu=device.type == "cpu")
        finally:
            os.environ.pop(ACCELERATE_DEVICE_VAR, None)
    state = processes.process_state(cpu=device.type == "cpu")
    same = state.device == device or (device.index is None and state.device.type == device.type)
    if single and not same:
        raise ValueError(f"this process already runs on {state.device}; device {device} needs a new process "
                         "(restart the kernel or the command)")
    return state


def make_accelerator(preferred: str | torch.device | None = None, mixed_precision: str = "no",
                     grad_accum: int = 1) -> Accelerator:
    """An ``Accelerator`` on the device of :func:`device_state`, at :func:`resolve_precision`'s precision;
    trainers use its ``.device`` everywhere (fp16 brings ``accelerate``'s gradient scaler). A prepared
    data loader's batches are split over the processes (``split_batches``), so the global batch is the
    profile's batch size whatever the number of processes."""
    device = device_state(preferred).device
    return Accelerator(mixed_precision=resolve_precision(mixed_precision, device), cpu=device.type == "cpu",
                       gradient_accumulation_steps=grad_accum,
                       dataloader_config=DataLoaderConfiguration(split_batches=True))


def overflow_checked(accelerator: Accelerator, grad_norm):
    """The gradient norm a finite-value guard should check: ``grad_norm``, or 0.0 while fp16's scaler owns overflow.

    With fp16 an infinite norm first means "scale too high": the scaler skips that optimiser step
    and halves the scale, so it is no error. Once the scale has fallen below 1 (from 65,536: about
    17 overflowing steps in a row) the gradients are not finite at any scale, and the guard checks
    them again, so a run whose every step overflows stops instead of finishing untrained. The loss
    is always checked.
    """
    scaler = accelerator.scaler
    return 0.0 if scaler is not None and scaler.get_scale() >= 1.0 else grad_norm


def scaler_state(accelerator: Accelerator) -> dict:
    """``{"scaler": state}`` of fp16's gradient scaler for a checkpoint; ``{}`` without one."""
    return {"scaler": accelerator.scaler.state_dict()} if accelerator.scaler is not None else {}


def load_scaler_state(accelerator: Accelerator, state: dict) -> None:
    """Restore what :func:`scaler_state` saved (nothing when either side has no scaler)."""
    if accelerator.scaler is not None and "scaler" in state:
        accelerator.scaler.load_state_dict(state["scaler"])


def pick_device(preferred: str | torch.device | None = None) -> torch.device:
    """The device of :func:`device_state`, for stages that sample or score but do not train."""
    return device_state(preferred).device


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices): the one seeding helper of every stage.

    CPU runs are then repeatable at a fixed number of torch threads.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
