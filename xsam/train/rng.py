"""Every random-number state a training step draws from, captured into a checkpoint and restored on
resume, so a run killed after a checkpoint and resumed ends with the same weights as one that ran through.

What draws at random during a step: the criterion's point sampling and the visual-prompt sampler
(torch's global generator, CPU or CUDA), anything in python's `random` or numpy's global generator
(libraries). The loader's per-sample draws are not state: they come from
``np.random.default_rng([seed, epoch, position])`` (xsam.train.loader), a function of the position.

    state = capture()            # on every rank, beside its DeepSpeed checkpoint
    restore(state)               # after loading the checkpoint, before the first resumed step
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch


def capture() -> dict:
    name, key, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (name, torch.from_numpy(key.copy()), pos, has_gauss, gauss),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore(state: dict) -> None:
    random.setstate(state["python"])
    name, key, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, key.numpy(), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        if not torch.cuda.is_available():
            raise RuntimeError("the checkpoint holds CUDA RNG states but this worker has no CUDA device")
        torch.cuda.set_rng_state_all(state["cuda"])


def path(folder: str | Path, rank: int) -> Path:
    return Path(folder) / f"rng-rank{rank}.pt"


def save(folder: str | Path, rank: int) -> None:
    torch.save(capture(), path(folder, rank))


def load(folder: str | Path, rank: int) -> None:
    """Restore this rank's states from a checkpoint folder; a checkpoint written without them (or by a
    run with another world size) is an error naming the file: resuming it would not be exact."""
    p = path(folder, rank)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: the checkpoint has no RNG state for rank {rank}; it was written by a "
                                "different world size or an older version, and resuming it would not be exact")
    restore(torch.load(p, weights_only=True))  # tensors, tuples and numbers only
