"""A resumable training checkpoint, written atomically.

It holds what the next optimizer step depends on: the trainable tensors, the optimizer,
scheduler and GradScaler states, the RNG states, the position in the data, and the records
so far. Loading it and going on gives the same result as never having stopped.
"""
from pathlib import Path

import torch

from .adapter import write_atomically

CHECKPOINT_NAME = "checkpoint.pt"


def save_checkpoint(directory: Path, state: dict) -> None:
    """``torch.save`` to a temporary file, then rename: a crash never leaves half a checkpoint."""
    state = {**state, "rng": {"torch": torch.get_rng_state(),
                              "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}}
    write_atomically(directory / CHECKPOINT_NAME, lambda path: torch.save(state, path))


def load_checkpoint(directory: Path) -> dict:
    """Read the checkpoint and restore the RNG states it saved (tensors and plain data only)."""
    state = torch.load(directory / CHECKPOINT_NAME, map_location="cpu", weights_only=True)
    torch.set_rng_state(state["rng"]["torch"])
    if state["rng"]["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return state


def has_checkpoint(directory: Path) -> bool:
    return (Path(directory) / CHECKPOINT_NAME).is_file()
