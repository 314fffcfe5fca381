"""Every RNG state of a process (python, numpy's global one, torch, CUDA), saved with each checkpoint (one file
per rank) and restored on resume, so a resumed run draws the same numbers as an uninterrupted one."""
from __future__ import annotations

import random

import numpy as np
import torch


def rng_file(rank: int) -> str:
    return f"rng_state_rank{rank}.pt"


def capture_rng() -> dict:
    """This process's RNG states, loadable with weights_only=True."""
    name, keys, position, has_gauss, cached = np.random.get_state()
    return {"python": random.getstate(),
            "numpy": (name, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def restore_rng(states: dict) -> None:
    random.setstate(states["python"])
    name, keys, position, has_gauss, cached = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    torch.set_rng_state(states["torch"])
    if states["cuda"]:
        torch.cuda.set_rng_state_all(states["cuda"])
