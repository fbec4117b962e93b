"""Device choice and seeding: the two pieces of global state every stage touches."""

from __future__ import annotations

import os
import random

import numpy as np
import torch

DEVICE_ENV_VAR = "DPO_LAB_DEVICE"


def pick_device(preferred: str | None = None) -> torch.device:
    """CUDA, then Apple MPS, then CPU; ``preferred`` or ``$DPO_LAB_DEVICE`` overrides."""
    choice = preferred or os.environ.get(DEVICE_ENV_VAR)
    if choice:
        device = torch.device(choice)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {choice!r} requested but CUDA is not available")
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise ValueError(f"device {choice!r} requested but Apple MPS is not available")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices). CPU runs of the tiny profile are then repeatable."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
