"""A resumable training checkpoint, written atomically.

It holds what the next optimizer step depends on: the trainable tensors, the optimizer,
scheduler and GradScaler states, the state of every random generator, the position in the
data, and the records so far. Loading it and going on gives the same result as never having
stopped (the tests compare the two bit for bit).
"""
import random
from pathlib import Path

import numpy as np
import torch

from .io import write_atomically

CHECKPOINT_NAME = "checkpoint.pt"


def rng_states() -> dict:
    """The state of every generator a run may draw from: torch (CPU and each GPU: dropout),
    Python's ``random`` and NumPy's global generator."""
    python_version, python_state, python_gauss = random.getstate()
    _, numpy_keys, numpy_position, numpy_has_gauss, numpy_gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "python": [python_version, list(python_state), python_gauss],
            "numpy": [torch.from_numpy(numpy_keys.astype(np.int64)), int(numpy_position),
                      int(numpy_has_gauss), float(numpy_gauss)]}


def restore_rng_states(states: dict) -> None:
    """Put every generator back where ``rng_states`` found it. Call it last, after building the
    model: initialising a model draws from the generators."""
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    python_version, python_state, python_gauss = states["python"]
    random.setstate((python_version, tuple(python_state), python_gauss))
    numpy_keys, numpy_position, numpy_has_gauss, numpy_gauss = states["numpy"]
    np.random.set_state(("MT19937", numpy_keys.numpy().astype(np.uint32), numpy_position,
                         numpy_has_gauss, numpy_gauss))


def save_checkpoint(directory: Path, state: dict) -> None:
    """``torch.save`` to a temporary file, then rename: a crash never leaves half a checkpoint."""
    write_atomically(directory / CHECKPOINT_NAME, lambda path: torch.save(state, path))


def load_checkpoint(directory: Path) -> dict:
    """Read the checkpoint (tensors and plain data only: ``weights_only``). The generators are
    not touched here: see ``restore_rng_states``."""
    return torch.load(directory / CHECKPOINT_NAME, map_location="cpu", weights_only=True)


def has_checkpoint(directory: Path) -> bool:
    return (Path(directory) / CHECKPOINT_NAME).is_file()
