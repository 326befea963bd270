"""Where a model runs and in which precision: the device, the autocast precision, the context."""
import contextlib

import torch

from .errors import UsageError


def pick_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a GPU is a UsageError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda asked for, but no CUDA device is available")
    return torch.device(name)


def pick_precision(precision: str | None, device: torch.device) -> str:
    """The autocast precision: the one asked for, else fp16 on CUDA and fp32 on CPU.

    fp16 also runs on CPU (torch >= 2.3): slowly, but through exactly the autocast + GradScaler
    code that CUDA runs, which is how the tests exercise it.
    """
    if precision is None:
        return "fp16" if device.type == "cuda" else "fp32"
    if precision == "fp16" and device.type != "cuda":
        print("note: --fp16 on CPU is slow and meant for CUDA; it runs the same autocast + GradScaler path")
    return precision


def autocast_context(precision: str, device: torch.device):
    """``torch.autocast`` for ``fp16`` / ``bf16``, nothing for ``fp32``."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype)
