"""What a trained adapter did, layer by layer: the size, rank and direction of each update.

For every ``LoRALinear`` with pretrained weight ``W`` and update ``delta_W = scaling * B @ A``:

- ``relative_update = ||delta_W||_F / ||W||_F``: how far fine-tuning moved the layer;
- the singular values of ``delta_W`` (at most ``r`` are non-zero), ``effective_rank`` (how
  many exceed 1% of the largest) and ``top_share`` (share of ``||delta_W||_F^2`` in the first);
- ``amplification = ||delta_W||_F / ||U^T W V||_F`` with ``U``, ``V`` the top-``r`` singular
  vectors of ``delta_W`` (Hu et al. 2021, section 7.3): large when the update boosts directions
  that ``W`` itself hardly uses, which is what the paper found;
- for DoRA (``W' = m * (W + s B A) / ||W + s B A||_c``): ``delta_W = W' - W``, and
  ``magnitude_change = ||m - ||W||_c|| / ||W||_c||``: how far the trained row lengths moved
  from the pretrained ones they start at (None for plain LoRA).

Imports only torch.
"""
from dataclasses import dataclass

import torch
from torch import nn

from .layer import LoRALinear
from .model import lora_layers, merge_lora, unmerge_lora
from .quantize import QuantizedLinear
from .variants import DoRALinear


@dataclass
class UpdateStats:
    name: str
    r: int
    weight_norm: float
    update_norm: float
    relative_update: float
    singular_values: list[float]
    effective_rank: int
    top_share: float
    amplification: float
    magnitude_change: float | None = None


@torch.no_grad()
def update_stats(name: str, layer: LoRALinear) -> UpdateStats:
    """The statistics above for one layer, in float32 (the pretrained ``W`` even when merged;
    on a quantized base, ``dequantize(Wq)``: the weight the adapter was trained against)."""
    if isinstance(layer.base, QuantizedLinear):
        weight = layer.base.dequantize()
    else:
        weight = (layer.weight_before_merge if layer.merged else layer.base.weight).float()
    delta = layer.delta_weight()
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    s, u, vh = s[:layer.r], u[:, :layer.r], vh[:layer.r]
    update_norm = float(delta.norm())
    projected = float((u.T @ weight @ vh.T).norm())
    largest = float(s[0])
    magnitude_change = None
    if isinstance(layer, DoRALinear):
        start = weight.norm(dim=1)
        magnitude_change = float((layer.lora_magnitude.float() - start).norm() / start.norm())
    return UpdateStats(
        name=name, r=layer.r, weight_norm=float(weight.norm()), update_norm=update_norm,
        relative_update=update_norm / float(weight.norm()),
        singular_values=[float(v) for v in s],
        effective_rank=int((s > 0.01 * largest).sum()) if largest > 0 else 0,
        top_share=largest ** 2 / update_norm ** 2 if update_norm > 0 else 0.0,
        amplification=update_norm / projected if projected > 0 else float("inf"),
        magnitude_change=magnitude_change,
    )


def adapter_stats(model: nn.Module) -> list[UpdateStats]:
    """``update_stats`` for every LoRA layer of ``model``, in model order."""
    return [update_stats(name, layer) for name, layer in lora_layers(model)]


@torch.no_grad()
def merge_gap(model: nn.Module, inputs: dict) -> float:
    """Largest absolute difference between the logits with LoRA unmerged and merged."""
    was_training = model.training
    model.eval()
    unmerged = model(**inputs).logits.float()
    merge_lora(model)
    merged = model(**inputs).logits.float()
    unmerge_lora(model)
    model.train(was_training)
    return float((merged - unmerged).abs().max())
