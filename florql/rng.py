"""Capture and restore every random number generator a training step may draw from."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import numpy.random
import torch


def capture_rng() -> dict[str, Any]:
    version, words, gauss = random.getstate()
    state: dict[str, Any] = {
        # The Mersenne Twister's 625 words as one array, not 625 leaves for every checkpoint to walk.
        "python": (version, np.array(words, dtype=np.uint64), gauss),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    # Only when CUDA is already in use: initialising it here would cost seconds and memory.
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    version, words, gauss = state["python"]
    random.setstate((version, tuple(int(w) for w in words), gauss))  # checkpoints before arrays hold a tuple
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        if not torch.cuda.is_available():
            raise RuntimeError("this checkpoint holds CUDA RNG state, but no CUDA device is available for replay")
        torch.cuda.set_rng_state_all(state["cuda"])
