"""Every RNG state of a process (python, numpy's global one, torch, CUDA), saved with each checkpoint (one file
per rank) and restored on resume, so a resumed run draws the same numbers as an uninterrupted one; a run resumed
on another layout reseeds them instead (``reseed_rng``)."""
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


def reseed_rng(seed: int, step: int, rank: int) -> None:
    """Every generator of this process seeded from ``(seed, step, rank)``: a run resumed on another layout, whose
    ranks' saved states belong to their places in the old grid, draws new numbers that are still reproducible."""
    value = int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0])
    random.seed(value)
    np.random.seed(value)
    torch.manual_seed(value)  # CUDA's generators too
