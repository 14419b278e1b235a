"""Capture and restore every random number generator a training step may draw from."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import numpy.random
import torch


def capture_rng() -> dict[str, Any]:
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    # Only when CUDA is already in use: initialising it here would cost seconds and memory.
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        if not torch.cuda.is_available():
            raise RuntimeError("this checkpoint holds CUDA RNG state, but no CUDA device is available for replay")
        torch.cuda.set_rng_state_all(state["cuda"])
