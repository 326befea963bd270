"""What a trained adapter did, layer by layer: the size, rank and direction of each update,
and how two adapters or two weights compare. Every function states its formula.

For every ``LoRALinear`` with pretrained weight ``W`` and update ``delta_W = scaling * B @ A``
(``update_stats``):

- ``relative_update = ||delta_W||_F / ||W||_F``: how far fine-tuning moved the layer;
- the singular values ``s_1 >= s_2 >= ...`` of ``delta_W`` (at most ``r`` are non-zero);
- two effective ranks that measure where the energy is (``energy_rank``, ``entropy_rank``)
  and ``top_share = s_1^2 / sum_i s_i^2``, the share of ``||delta_W||_F^2`` in the first;
- ``amplification = ||delta_W||_F / ||U^T W V||_F`` with ``U``, ``V`` the top-``r`` singular
  vectors of ``delta_W`` (Hu et al. 2021, section 7.3): large when the update boosts directions
  that ``W`` itself hardly uses, which is what the paper found (``direction_projections`` gives
  the paper's Table 7 with its baselines);
- for DoRA (``W' = m * (W + s B A) / ||W + s B A||_c``): ``delta_W = W' - W``, and
  ``magnitude_change = ||m - ||W||_c|| / ||W||_c||``: how far the trained row lengths moved
  from the pretrained ones they start at (None for plain LoRA).

Between two adapters: ``subspace_similarity`` (the LoRA paper's phi, section 7.2). Between a
pretrained and a fine-tuned weight: ``magnitude_direction_change`` (the DoRA paper's Figure 2).
``plot_stats`` and ``plot_similarity`` draw them (matplotlib's object API, imported when drawing).

Imports only torch.
"""

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .layer import LoRALinear
from .model import layer_index, lora_layers, merge_lora, unmerge_lora
from .quantize import QuantizedLinear
from .variants import DoRALinear

ENERGY_SHARE = 0.9  # energy_rank: the share of sum s_i^2 the first k singular values must hold


# ---------------------------------------------------------------- effective ranks


def energy_rank(singular_values: torch.Tensor, share: float = ENERGY_SHARE) -> int:
    """The smallest ``k`` with ``s_1^2 + ... + s_k^2 >= share * sum_i s_i^2``.

    ``singular_values`` in decreasing order, ``(n,)``. The number of directions that carry
    ``share`` (90%) of ``||delta_W||_F^2``: 1 for an update whose first direction holds 96% of
    its energy, however many tiny singular values follow. 0 for a zero update.
    """
    energy = singular_values.double() ** 2
    total = float(energy.sum())
    if total == 0:
        return 0
    held = torch.cumsum(energy, 0) / total
    return min(int((held < share).sum()) + 1, len(energy))  # min: share 1 and rounding


def entropy_rank(singular_values: torch.Tensor) -> float:
    """Roy and Vetterli's effective rank (2007): ``exp(H(p))`` with ``p_i = s_i / sum_j s_j``
    and ``H(p) = -sum_i p_i log p_i``.

    A real number between 1 (one non-zero singular value) and ``n`` (all equal); it counts
    every direction by its weight, with no threshold. 0 for a zero update.
    """
    values = singular_values.double()
    total = float(values.sum())
    if total == 0:
        return 0.0
    p = values[values > 0] / total
    return math.exp(float(-(p * p.log()).sum()))


# ---------------------------------------------------------------- one adapter, layer by layer


@dataclass
class UpdateStats:
    name: str
    r: int
    weight_norm: float
    update_norm: float
    relative_update: float
    singular_values: list[float]
    energy_rank: int
    entropy_rank: float
    top_share: float
    amplification: float
    magnitude_change: float | None = None


def pretrained_weight(layer: LoRALinear) -> torch.Tensor:
    """The weight the adapter was trained against, float32, ``(out, in)``: the pretrained ``W``
    even when merged; on a quantized base ``dequantize(Wq)``."""
    if isinstance(layer.base, QuantizedLinear):
        return layer.base.dequantize()
    return (layer.weight_before_merge if layer.merged else layer.base.weight).float()


@torch.no_grad()
def update_stats(name: str, layer: LoRALinear) -> UpdateStats:
    """The statistics of the module docstring for one layer, in float32."""
    weight = pretrained_weight(layer)
    delta = layer.delta_weight()
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    rank = layer.lora_A.shape[0]  # r; k r for LoRA on k slices of a fused q/k/v Linear
    s, u, vh = s[:rank], u[:, :rank], vh[:rank]
    update_norm = float(delta.norm())
    projected = float((u.T @ weight @ vh.T).norm())
    magnitude_change = None
    if isinstance(layer, DoRALinear):
        start = weight.norm(dim=1)
        magnitude_change = float((layer.lora_magnitude.float() - start).norm() / start.norm())
    return UpdateStats(
        name=name,
        r=layer.r,
        weight_norm=float(weight.norm()),
        update_norm=update_norm,
        relative_update=update_norm / float(weight.norm()),
        singular_values=[float(v) for v in s],
        energy_rank=energy_rank(s),
        entropy_rank=entropy_rank(s),
        top_share=float(s[0]) ** 2 / update_norm**2 if update_norm > 0 else 0.0,
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


# ---------------------------------------------------------------- the LoRA paper, section 7


@torch.no_grad()
def subspace_similarity(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """The LoRA paper's normalised subspace similarity (Hu et al. 2021, section 7.2)::

        phi(i, j) = ||U_i^T V_j||_F^2 / min(i, j)

    ``first`` ``(r1, d)`` and ``second`` ``(r2, d)`` are two matrices whose rows live in the
    same space (two adapters' ``A`` for one layer, ``d = in``); ``U_i`` holds the top-``i``
    right singular vectors of ``first`` ``(d, i)``, ``V_j`` the top-``j`` of ``second``.

    Returns ``phi`` as an ``(r1, r2)`` float32 tensor, ``phi[i - 1, j - 1]`` for ``i <= r1``,
    ``j <= r2``: 1 when one subspace contains the other, 0 when they are orthogonal. For
    independent random subspaces its expectation is ``max(i, j) / d`` (``random_similarity``).
    """
    u = torch.linalg.svd(first.double(), full_matrices=False)[2].T  # (d, r1)
    v = torch.linalg.svd(second.double(), full_matrices=False)[2].T  # (d, r2)
    overlap = (u.T @ v) ** 2  # (r1, r2)
    cumulative = overlap.cumsum(0).cumsum(1)  # ||U_i^T V_j||_F^2
    i = torch.arange(1, overlap.shape[0] + 1, dtype=torch.float64)[:, None]
    j = torch.arange(1, overlap.shape[1] + 1, dtype=torch.float64)[None, :]
    return (cumulative / torch.minimum(i, j)).float()


def random_similarity(i: int, j: int, dimension: int) -> float:
    """``E[phi(i, j)] = max(i, j) / d`` for two independent uniformly random subspaces of
    dimensions ``i`` and ``j`` in ``R^d`` (``E ||U_i^T V_j||_F^2 = i j / d``): what "no shared
    direction" looks like."""
    return max(i, j) / dimension


@dataclass
class LayerSimilarity:
    """``subspace_similarity`` of the ``A`` matrices of one layer in two adapters."""

    name: str
    r_first: int
    r_second: int
    in_features: int
    phi: list[list[float]]  # (r_first, r_second)

    @property
    def top(self) -> float:
        """``phi(1, 1)``: do the two adapters' first directions agree?"""
        return self.phi[0][0]

    @property
    def common(self) -> float:
        """``phi(k, k)`` with ``k = min(r_first, r_second)``: overlap of equally large top subspaces."""
        k = min(self.r_first, self.r_second)
        return self.phi[k - 1][k - 1]


def compare_adapters(first: nn.Module, second: nn.Module) -> list[LayerSimilarity]:
    """``subspace_similarity`` of ``lora_A`` for every LoRA layer the two models share by name.

    Raises:
        ValueError: when they share no LoRA layer, or a shared one has another input width.
    """
    theirs = dict(lora_layers(second))
    shared = [(name, layer, theirs[name]) for name, layer in lora_layers(first) if name in theirs]
    if not shared:
        raise ValueError("the two adapters have no LoRA layer in common")
    result = []
    for name, mine, other in shared:
        if mine.lora_A.shape[1] != other.lora_A.shape[1]:
            raise ValueError(
                f"{name}: input width {mine.lora_A.shape[1]} vs {other.lora_A.shape[1]}; "
                "the adapters belong to different base models"
            )
        phi = subspace_similarity(mine.lora_A.detach(), other.lora_A.detach())
        result.append(LayerSimilarity(name, mine.r, other.r, mine.lora_A.shape[1], phi.tolist()))
    return result


@dataclass
class DirectionProjections:
    """``||U^T W V||_F`` for three choices of ``r`` directions (the LoRA paper's Table 7)."""

    weight_norm: float  # ||W||_F
    update_norm: float  # ||delta_W||_F
    onto_update: float  # U, V: top-r singular vectors of delta_W
    onto_weight: float  # U, V: top-r singular vectors of W itself
    onto_random: float  # U, V: random orthonormal r-frames

    @property
    def amplification(self) -> float:
        """``||delta_W||_F / ||U^T W V||_F`` with the update's own directions."""
        return self.update_norm / self.onto_update


@torch.no_grad()
def direction_projections(
    weight: torch.Tensor, delta: torch.Tensor, r: int, generator: torch.Generator | None = None
) -> DirectionProjections:
    """How much of ``W`` ``(out, in)`` lies in the top-``r`` directions of ``delta_W``, of ``W``
    itself, and of a random frame (orthonormalised Gaussian, drawn from ``generator``).

    The paper found ``onto_update`` far below ``onto_weight`` and above ``onto_random``: the
    update amplifies directions that are in ``W`` but that ``W`` does not emphasise.
    """
    weight, delta = weight.double(), delta.double()

    def projected(u: torch.Tensor, vh: torch.Tensor) -> float:
        return float((u[:, :r].T @ weight @ vh[:r].T).norm())

    u_delta, _, vh_delta = torch.linalg.svd(delta, full_matrices=False)
    u_weight, _, vh_weight = torch.linalg.svd(weight, full_matrices=False)
    out_features, in_features = weight.shape
    u_random = torch.linalg.qr(torch.randn(out_features, r, generator=generator, dtype=torch.float64))[0]
    v_random = torch.linalg.qr(torch.randn(in_features, r, generator=generator, dtype=torch.float64))[0]
    return DirectionProjections(
        weight_norm=float(weight.norm()),
        update_norm=float(delta.norm()),
        onto_update=projected(u_delta, vh_delta),
        onto_weight=projected(u_weight, vh_weight),
        onto_random=projected(u_random, v_random.T),
    )


# ---------------------------------------------------------------- the DoRA paper, Figure 2


def applied_weight(module: nn.Module) -> torch.Tensor:
    """The weight a linear module applies now, float32, detached, ``(out, in)``: ``W + delta_W``
    for a ``LoRALinear`` (``W'`` for DoRA), the weight itself for an ``nn.Linear``."""
    with torch.no_grad():
        if isinstance(module, LoRALinear):
            return pretrained_weight(module) + module.delta_weight()
        return module.weight.detach().float().clone()


@torch.no_grad()
def magnitude_direction_change(initial: torch.Tensor, current: torch.Tensor) -> tuple[float, float]:
    """The DoRA paper's ``(delta_M, delta_D)`` (Liu et al. 2024, section 3, eq. 5) between a
    pretrained weight ``W_0`` and a fine-tuned ``W_t``, both ``(out, in)``::

        delta_M = mean_n | ||W_t[n]|| - ||W_0[n]|| |
        delta_D = mean_n ( 1 - cos(W_t[n], W_0[n]) )

    over the ``out`` rows ``n`` (the paper's columns of its ``d x k`` weight: one per output).
    """
    initial, current = initial.double(), current.double()
    magnitude = (current.norm(dim=1) - initial.norm(dim=1)).abs().mean()
    direction = (1 - torch.nn.functional.cosine_similarity(current, initial, dim=1)).mean()
    return float(magnitude), float(direction)


def trend_slope(x: list[float], y: list[float]) -> float:
    """Least-squares slope of ``y`` on ``x``: ``cov(x, y) / var(x)`` (the sign of the DoRA
    paper's Figure 2 trends, with ``x = delta_D`` and ``y = delta_M``)."""
    x, y = torch.tensor(x, dtype=torch.float64), torch.tensor(y, dtype=torch.float64)
    x, y = x - x.mean(), y - y.mean()
    return float((x * y).sum() / (x * x).sum())


# ---------------------------------------------------------------- plots
def plot_stats(stats: list[UpdateStats], path: str | Path) -> None:
    """Left: |delta_W| / |W| per encoder layer and module. Right: normalised singular values."""
    import numpy as np
    from matplotlib.figure import Figure

    modules = sorted({s.name.rsplit(".", 1)[-1] for s in stats})
    layers = sorted({layer_index(s.name) for s in stats})
    grid = np.full((len(layers), len(modules)), np.nan)
    for s in stats:
        grid[layers.index(layer_index(s.name)), modules.index(s.name.rsplit(".", 1)[-1])] = s.relative_update
    figure = Figure(figsize=(10, 4.2), layout="tight")
    left, right = figure.subplots(1, 2)
    image = left.imshow(grid, cmap="viridis", aspect="auto")
    left.set(
        xticks=range(len(modules)),
        xticklabels=modules,
        yticks=range(len(layers)),
        yticklabels=layers,
        xlabel="module",
        ylabel="encoder layer",
        title="|ΔW|_F / |W|_F",
    )
    figure.colorbar(image, ax=left)
    for s in stats:
        values = np.array(s.singular_values)
        right.plot(range(1, len(values) + 1), values / values[0] if values[0] > 0 else values, alpha=0.6)
    right.set(xlabel="index", ylabel="σ_i / σ_1", title="Singular values of ΔW (one line per layer)")
    right.grid(alpha=0.3)
    figure.savefig(path, dpi=110)


def plot_similarity(
    similarities: list[LayerSimilarity],
    path: str | Path,
    first_label: str = "this adapter",
    second_label: str = "other adapter",
) -> None:
    """One heatmap of phi(i, j) per layer (the LoRA paper's Figure 3), a shared 0..1 colour scale."""
    import numpy as np
    from matplotlib.figure import Figure

    columns = min(4, len(similarities))
    rows = -(-len(similarities) // columns)
    figure = Figure(figsize=(3.2 * columns, 2.8 * rows), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False)
    for axis, s in zip(axes.flat, similarities):
        image = axis.imshow(
            np.array(s.phi),
            cmap="viridis",
            vmin=0,
            vmax=1,
            aspect="auto",
            extent=(0.5, s.r_second + 0.5, s.r_first + 0.5, 0.5),
        )
        short = ".".join(part for part in s.name.split(".") if part.isdigit() or part == s.name.rsplit(".", 1)[-1])
        axis.set_title(short, fontsize=9)
        axis.set_xlabel(f"j ({second_label}, r={s.r_second})", fontsize=8)
        axis.set_ylabel(f"i ({first_label}, r={s.r_first})", fontsize=8)
    for axis in list(axes.flat)[len(similarities) :]:
        axis.axis("off")
    figure.colorbar(image, ax=axes, shrink=0.8, label="φ(i, j) = |U_i^T V_j|² / min(i, j)")
    figure.savefig(path, dpi=100, bbox_inches="tight")
