"""LoRALinear: a frozen ``nn.Linear`` plus a trainable low-rank update.

This file is the whole of LoRA (Hu et al. 2021, https://arxiv.org/abs/2106.09685).

A pretrained layer computes ``y = x @ W^T + b`` with ``W`` of shape ``(out, in)``.
LoRA freezes ``W`` and learns a correction of rank ``r`` instead of a full one::

    delta_W = scaling * B @ A          A: (r, in), B: (out, r), scaling = alpha / r
    y       = x @ W^T + b + scaling * dropout(x) @ A^T @ B^T

Only ``A`` and ``B`` train: ``r * (in + out)`` numbers instead of ``in * out``.
``B`` starts at zero, so at initialisation ``delta_W = 0`` and the wrapped layer
returns exactly what the pretrained layer returned.

For inference ``merge()`` folds ``delta_W`` into ``W`` (one matmul per layer again,
zero added latency); ``unmerge()`` restores the pretrained ``W`` bit for bit.

The frozen layer may also be a ``QuantizedLinear`` (``lora/quantize.py``, QLoRA): the math
is the same, ``W`` is just stored in 8 or 4 bits.
"""

import itertools
import math

import torch
from torch import nn
from torch.nn import functional as F

from .quantize import QuantizedLinear

# The layers LoRALinear wraps: a float Linear, or one whose frozen weight is stored quantized.
FROZEN_LINEAR = (nn.Linear, QuantizedLinear)


def check_lora_hyperparameters(r: int, alpha: float, dropout: float) -> None:
    """Raise ``ValueError`` unless ``r >= 1``, ``alpha > 0`` and ``0 <= dropout < 1``."""
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"LoRA rank r must be an integer >= 1, got {r!r}")
    if not alpha > 0:
        raise ValueError(f"LoRA alpha must be > 0, got {alpha!r}")
    if not 0 <= dropout < 1:
        raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout!r}")


def lora_scaling(r: int, alpha: float, rslora: bool = False) -> float:
    """The factor on ``B @ A``: ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA."""
    return alpha / math.sqrt(r) if rslora else alpha / r


class LoRALinear(nn.Module):
    """``base(x) + scaling * dropout(x) @ A^T @ B^T`` around a frozen ``nn.Linear``.

    Args:
        base: the pretrained layer (``nn.Linear`` or ``QuantizedLinear``), wrapped by
            composition and frozen (weight and bias).
        r: rank of the update.
        alpha: scale numerator; ``scaling = alpha / r`` (``alpha / sqrt(r)`` with ``rslora``).
        dropout: dropout probability on the input of the LoRA branch only.
        rslora: rank-stabilised scaling (Kalajdzievski 2023).

    Shapes: ``x`` is ``(*, in)``, the output ``(*, out)``; any leading dimensions work.

    Precision: ``lora_A`` and ``lora_B`` are float32 whatever the base dtype, so that the
    optimizer and ``GradScaler`` see float32 parameters and gradients; the branch runs in
    float32 (or in the autocast dtype under ``torch.autocast``) and is cast back to the
    dtype of the base output before the sum.
    """

    def __init__(
        self, base: nn.Linear | QuantizedLinear, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False
    ):
        super().__init__()
        if not isinstance(base, FROZEN_LINEAR):
            raise TypeError(f"LoRALinear wraps an nn.Linear or a QuantizedLinear, got {type(base).__name__}")
        check_lora_hyperparameters(r, alpha, dropout)
        self.base = base.requires_grad_(False)
        self.r = r
        self.alpha = alpha
        self.rslora = rslora
        self.scaling = lora_scaling(r, alpha, rslora)
        device = next(itertools.chain(base.parameters(), base.buffers())).device
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=device))
        # The same initialisation nn.Linear gives its own weight.
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        # The pretrained weight, kept while merged so that unmerge() is exact.
        self.register_buffer("weight_before_merge", None, persistent=False)
        # Swapped into an eval-mode model, the wrapper must not train (dropout) either.
        self.train(base.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base(x)
        if self.merged:
            if self.training:
                raise RuntimeError("LoRALinear is merged: call unmerge() before training")
            return result
        return result + self.update(x, result).to(result.dtype)

    def update(self, x: torch.Tensor, base_output: torch.Tensor) -> torch.Tensor:
        """What this layer adds to the base output ``(*, out)``: ``scaling * dropout(x) A^T B^T``.
        The one method a variant overrides (``DoRALinear``)."""
        return self.low_rank(self.dropout(x).to(self.lora_A.dtype))

    def low_rank(self, x: torch.Tensor) -> torch.Tensor:
        """``scaling * x A^T B^T``: ``(*, in)`` -> ``(*, r)`` -> ``(*, out)``. Scaling the ``(*, r)``
        activations, not the ``(*, out)`` result, saves a full-width pass over the output forward
        and backward (see BENCHMARKS.md, bench/speed.py)."""
        return F.linear(F.linear(x, self.lora_A) * self.scaling, self.lora_B)

    def delta_weight(self) -> torch.Tensor:
        """``scaling * B @ A``, shape ``(out, in)``, computed in float32."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        """Fold ``delta_W`` into the base weight (summed in float32, cast back to its dtype).

        A no-op when already merged. Raises ``ValueError`` and leaves the weight untouched
        if the merged weight would hold NaN or infinity.
        """
        if self.merged:
            return
        if isinstance(self.base, QuantizedLinear):
            raise TypeError("the base is quantized: merge_lora(model) dequantizes it, then merges")
        weight = self.base.weight
        merged = (weight.float() + self.delta_weight()).to(weight.dtype)
        if not torch.isfinite(merged).all():
            raise ValueError("merging would put NaN or inf in the base weight; not merged")
        self.weight_before_merge = weight.detach().clone()
        weight.copy_(merged)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the pretrained base weight bit for bit. A no-op when not merged."""
        if not self.merged:
            return
        self.base.weight.copy_(self.weight_before_merge)
        self.weight_before_merge = None
        self.merged = False

    def train(self, mode: bool = True) -> "LoRALinear":
        if mode and self.merged:
            raise RuntimeError("LoRALinear is merged: call unmerge() before training")
        return super().train(mode)

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha:g}, scaling={self.scaling:.4g}, merged={self.merged}"
