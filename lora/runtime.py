"""Where and how a model runs: device choice, autocast, batched forward passes, run folders."""
import contextlib
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .data import length_grouped_batches, pad_batch
from .errors import UsageError

RUNS_DIR = Path("runs")


def pick_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a GPU is a UsageError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda asked for, but no CUDA device is available")
    return torch.device(name)


def autocast_context(precision: str, device: torch.device):
    """``torch.autocast`` for ``fp16`` / ``bf16``, nothing for ``fp32``."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.inference_mode()
def batched_logits(model, token_ids: list[list[int]], batch_size: int, pad_id: int,
                   autocast=None, progress: bool = False) -> torch.Tensor:
    """Float32 logits ``(N, num_labels)`` on the CPU, row ``i`` for ``token_ids[i]``.

    Batches hold texts of similar length (sorted), each padded only to its own longest
    text (dynamic padding); rows are put back in input order.
    """
    device = next(model.parameters()).device
    logits = torch.empty(len(token_ids), model.config.num_labels)
    batches = length_grouped_batches([len(ids) for ids in token_ids], batch_size, seed=0, shuffle=False)
    with tqdm(total=len(token_ids), desc="predicting", unit="text", disable=not progress) as bar:
        for indices in batches:
            batch = pad_batch([token_ids[i] for i in indices], pad_id)
            with autocast or contextlib.nullcontext():
                out = model(**{name: tensor.to(device) for name, tensor in batch.items()}).logits
            logits[indices] = out.float().cpu()
            bar.update(len(indices))
    return logits
