"""How the training step runs, not what it computes: the autocast precision, and two trades,
both off by default.

- ``precision``: ``fp16`` (autocast + GradScaler; the default on CUDA), ``bf16`` or ``fp32``.
- ``gradient_checkpointing``: memory for compute. Each encoder layer keeps only its input in
  the forward; backward runs the layer's forward again to get the rest.
- ``compile``: a one-time compile for faster steps (``torch.compile``).

Checkpointing and compiling leave the loss and the gradients those of the plain step, up to
float rounding (``tests/test_execution.py``).
"""

import contextlib

import torch
from torch import nn

from . import distributed
from .distributed import World


def pick_precision(precision: str | None, device: torch.device) -> str:
    """The autocast precision: the one asked for, else fp16 on CUDA and fp32 on CPU.

    fp16 also runs on CPU (torch >= 2.3): slowly, but through exactly the autocast + GradScaler
    code that CUDA runs, which is how the tests exercise it.
    """
    if precision is None:
        return "fp16" if device.type == "cuda" else "fp32"
    if precision == "fp16" and device.type != "cuda":
        print("note: fp16 on CPU is slow and meant for CUDA; it runs the same autocast + GradScaler path")
    return precision


def autocast_context(precision: str, device: torch.device):
    """``torch.autocast`` for ``fp16`` / ``bf16``, nothing for ``fp32``."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype)


def checkpoint_activations(model: nn.Module) -> None:
    """Recompute each encoder layer's activations in backward instead of keeping them
    (transformers' switch, non-reentrant: ``torch.utils.checkpoint.checkpoint(use_reentrant=False)``).

    Memory: per layer, the input ``(batch, seq, hidden)`` is kept instead of everything its
    backward needs (queries, keys, values, attention probabilities ``(batch, heads, seq, seq)``,
    the feed-forward's ``(batch, seq, intermediate)``, dropout masks). Cost: one more forward of
    the encoder per step.

    Non-reentrant checkpointing records the recomputed layer into the same autograd graph, so
    gradients reach the LoRA weights inside it although the frozen embeddings' output does not
    require grad (the reentrant kind needs ``enable_input_require_grads`` for that). It stashes the
    random generators' state at the forward and restores it for the recompute
    (``preserve_rng_state=True``, the default), so dropout draws the same masks both times.
    Checkpointing applies in training mode only; evaluation runs as before.
    """
    kwargs = {"use_reentrant": False}
    model.config.use_cache = False  # an encoder keeps no cache; else transformers warns that it turns it off
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.25's name for it
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def training_module(model: nn.Module, gradient_checkpointing: bool, compile: bool, world: World) -> nn.Module:
    """What the loop runs forward and backward: ``model``, with its activations checkpointed,
    compiled, and in DDP on several ranks, as asked.

    ``torch.compile`` traces the forward into graphs (one per input shape until a second shape
    makes the sequence length dynamic) and AOTAutograd their backward; the first steps pay for
    the compile. The compiled module shares every parameter with ``model`` but its state-dict
    keys start with ``_orig_mod.``: checkpoints and the adapter are saved from ``model``, never
    from this. Evaluation runs ``model`` itself, eager. DDP wraps the compiled module, so that
    ``distributed.no_sync`` still finds it.
    """
    if gradient_checkpointing:
        checkpoint_activations(model)
    return distributed.wrap(torch.compile(model) if compile else model, world)
