"""Refinements of LoRA, each a few lines beside ``LoRALinear`` (imports only torch): DoRA, PiSSA,
LoRA+, and LoRA on slices of a fused q/k/v projection (ModernBERT's ``Wqkv``).

DoRA (Liu et al. 2024, https://arxiv.org/abs/2402.09353): split the adapted weight into a
trainable length per output row and a direction::

    W' = m * (W + s B A) / ||W + s B A||_c        m: (out,), ||.||_c: norm of each output row

PiSSA (Meng et al. 2024, https://arxiv.org/abs/2404.02948): start ``B A`` on the top-``r``
singular directions of ``W`` and freeze the residual, so that training moves the principal
part of ``W`` first::

    W = U S V^T,  A0 = sqrt(S_r / s) V_r^T,  B0 = U_r sqrt(S_r / s),  W_res = W - s B0 A0

LoRA+ (Hayou et al. 2024, https://arxiv.org/abs/2402.12354): ``B`` learns ``ratio`` times
faster than ``A`` (``lr_B = ratio * lr``).

Everything here matches peft 0.21 (``use_dora=True``, ``init_lora_weights="pissa"``,
``create_loraplus_optimizer``) up to float rounding; ``tests/test_variants.py`` checks it.

Slices of a fused projection: ModernBERT computes queries, keys and values with one
``nn.Linear`` ``Wqkv`` whose output rows are ``[q | k | v]``. ``FusedQKVLoRALinear`` gives each
chosen slice its own pair ``A_i``, ``B_i``, as separate ``query`` and ``value`` Linears would get
(litgpt's ``LoRAQKVLinear``); stacked, that is one LoRA of rank ``k r`` on ``Wqkv`` whose ``B``
is block-structured (``stack_slices``), which is how peft stores it.
"""

import torch
from torch import nn
from torch.nn import functional as F

from .layer import LoRALinear, lora_scaling
from .quantize import QuantizedLinear

INITS = ("lora", "pissa")  # inject_lora(init=...): zero B and Kaiming A, or pissa_init_
DORA_NEEDS_FLOAT_BASE = "DoRA needs the float base weight for its norms; it does not work with a quantized base"
QKV_ROLES = ("query", "key", "value")  # the order of a fused Wqkv's output row blocks


class DoRALinear(LoRALinear):
    """``LoRALinear`` with weight decomposition: ``W' = m * (W + s B A) / ||W + s B A||_c``.

    ``lora_magnitude`` (``m``, float32, shape ``(out,)``, trainable) starts at the row norms
    of ``W``, so with ``B = 0`` the layer returns exactly what the pretrained one did. The
    norm ``||W + s B A||_c`` is detached, as the paper suggests (section 4.3) and peft does:
    it follows ``B A`` in the forward pass but gets no gradient. Trainable numbers per layer:
    ``r * (in + out) + out``.

    The forward pass adds ``(W' - W) @ dropout(x)`` to the base output, written as::

        scale  = m / ||W + s B A||_c                                   (out,)
        update = (scale - 1) * (W @ dropout(x)) + scale * s * B @ A @ dropout(x)

    Without active dropout ``W @ x`` is the base output minus its bias: no second matmul.
    """

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False):
        if isinstance(base, QuantizedLinear):
            raise ValueError(DORA_NEEDS_FLOAT_BASE)
        super().__init__(base, r, alpha, dropout, rslora)
        self.lora_magnitude = nn.Parameter(torch.empty(base.out_features, device=base.weight.device))
        self.reset_magnitude()

    @torch.no_grad()
    def reset_magnitude(self) -> None:
        """``m = ||W + s B A||_c``: the layer's output is then what ``W + s B A`` gives."""
        self.lora_magnitude.copy_(self.weight_norm(self.base.weight.float()))

    def weight_norm(self, weight: torch.Tensor) -> torch.Tensor:
        """``||weight + s B A||_c``, the norm of each output row, ``(out,)``, detached."""
        with torch.no_grad():
            return torch.linalg.norm(weight + self.scaling * (self.lora_B @ self.lora_A), dim=1)

    def update(self, x: torch.Tensor, base_output: torch.Tensor) -> torch.Tensor:
        """``(W' - W) @ dropout(x)``, shape ``(*, out)`` (the formula in the class docstring)."""
        weight = self.base.weight.to(self.lora_A.dtype)
        scale = self.lora_magnitude / self.weight_norm(weight)
        dropped = self.dropout(x).to(self.lora_A.dtype)
        if self.training and isinstance(self.dropout, nn.Dropout):
            base_part = F.linear(dropped, weight)
        else:
            base_part = base_output if self.base.bias is None else base_output - self.base.bias
        return (scale - 1) * base_part + scale * self.low_rank(dropped)

    def delta_weight(self) -> torch.Tensor:
        """``W' - W``, shape ``(out, in)``, float32, against the pretrained ``W`` even when merged.

        ``merge()`` adds it to ``W`` (so the merged weight is ``W'`` up to one rounding);
        ``unmerge()`` restores the kept ``W`` bit for bit, as for plain LoRA.
        """
        weight = (self.weight_before_merge if self.merged else self.base.weight).float()
        scale = self.lora_magnitude.detach() / self.weight_norm(weight)
        adapted = weight + self.scaling * (self.lora_B.detach() @ self.lora_A.detach())
        return scale[:, None] * adapted - weight

    def extra_repr(self) -> str:
        return super().extra_repr() + ", dora=True"


# ---------------------------------------------------------------- slices of a fused q/k/v Linear


def stack_slices(lora_B: torch.Tensor, slices: tuple[str, ...]) -> torch.Tensor:
    """The ``B'`` of the rank-``k r`` LoRA that a ``FusedQKVLoRALinear`` is, ``(3 h, k r)``.

    ``lora_B`` is ``(k, h, r)``: ``B_i`` for the ``i``-th of ``slices`` (in ``QKV_ROLES`` order).
    ``B_i`` sits in the rows of its slice and in columns ``i r .. (i+1) r``; every other entry is
    zero, all the rows of a slice not adapted included. For query and value::

        B' = [ B_q  0   ]     rows 0 .. h     (queries)
             [ 0    0   ]     rows h .. 2h    (keys: no update)
             [ 0    B_v ]     rows 2h .. 3h   (values)
    """
    k, hidden, r = lora_B.shape
    diagonal = torch.block_diag(*lora_B)  # (k h, k r): B_i on the diagonal
    adapted = iter(diagonal.split(hidden))
    zeros = diagonal.new_zeros(hidden, k * r)
    return torch.cat([next(adapted) if role in slices else zeros for role in QKV_ROLES])


class FusedQKVLoRALinear(LoRALinear):
    """LoRA on chosen slices of a frozen fused ``[q | k | v]`` Linear (ModernBERT's ``Wqkv``).

    ``Wqkv`` is ``nn.Linear(in, 3 h)``: its output rows ``0:h`` are the queries, ``h:2h`` the keys,
    ``2h:3h`` the values. Each of the ``k`` chosen slices gets its own pair::

        A_i: (r, in)   B_i: (h, r)
        y[slice_i] = x W_i^T + b_i + scaling * dropout(x) A_i^T B_i^T
        y[other]   = x W^T + b                                  (the base's output, bit for bit)

    Trainable: ``k r (in + h)``, what LoRA on separate query and value Linears costs (peft can only
    adapt the whole ``Wqkv``: ``r (in + 3 h)``, the keys included).

    Stacked, the same update is one LoRA of rank ``k r`` on the whole ``Wqkv``::

        A' = [A_1; ...; A_k]    (k r, in)      this layer's ``lora_A``
        B' = stack_slices(B)    (3 h, k r)     block-structured, zero in the rows of the keys
        scaling * B' A' = scaling * B_i A_i in the rows of slice i, zero elsewhere

    so forward, merge and unmerge are ``LoRALinear``'s with ``B'`` in place of ``B``: the key rows
    get exact zeros added (their output, and their merged weight, stay the base's bit for bit).
    ``lora_A`` ``(k r, in)`` starts Kaiming-uniform as ``k`` separate ``A_i`` would (fan-in ``in``),
    ``lora_B`` ``(k, h, r)`` at zero. ``scaling = alpha / r`` (``alpha / sqrt(r)`` with rsLoRA):
    the rank-``k r`` form needs ``alpha' = k alpha`` (``sqrt(k) alpha``) for the same scaling.

    Shapes: ``x`` ``(*, in)`` -> ``(*, 3 h)``. The ``B'`` matmul costs ``3 h k r`` multiply-adds a
    token where ``k`` separate ones would cost ``k h r``: three times more, and still next to
    nothing beside the base's ``3 h in``.
    """

    def __init__(
        self,
        base: nn.Linear | QuantizedLinear,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        rslora: bool = False,
        slices: tuple[str, ...] = ("query", "value"),
    ):
        if not slices or set(slices) - set(QKV_ROLES):
            raise ValueError(f"slices must be some of {list(QKV_ROLES)}, got {list(slices)}")
        if base.out_features % 3:
            raise ValueError(f"a fused q/k/v Linear has 3 * h outputs, this one {base.out_features}")
        self.slices = tuple(role for role in QKV_ROLES if role in slices)
        k = len(self.slices)
        super().__init__(base, k * r, alpha, dropout, rslora)  # lora_A: the k stacked A_i, (k r, in)
        self.r, self.scaling = r, lora_scaling(r, alpha, rslora)
        self.lora_B = nn.Parameter(torch.zeros(k, base.out_features // 3, r, device=self.lora_A.device))

    def low_rank(self, x: torch.Tensor) -> torch.Tensor:
        """``scaling * x A'^T B'^T``: ``(*, in)`` -> ``(*, k r)`` -> ``(*, 3 h)``, zero in the keys' columns."""
        return F.linear(F.linear(x, self.lora_A) * self.scaling, stack_slices(self.lora_B, self.slices))

    def delta_weight(self) -> torch.Tensor:
        """``scaling * B' @ A'``, ``(3 h, in)``, float32; zero in the rows of the slices not adapted."""
        return (stack_slices(self.lora_B.float(), self.slices) @ self.lora_A.float()) * self.scaling

    def extra_repr(self) -> str:
        return super().extra_repr() + f", slices={','.join(self.slices)}"


# ---------------------------------------------------------------- PiSSA


@torch.no_grad()
def pissa_init_(layer: LoRALinear) -> None:
    """Initialise ``layer`` the PiSSA way, in place, as peft's ``init_lora_weights="pissa"``.

    With ``W = U S V^T`` (full SVD in float32, singular values in decreasing order) and ``s``
    the layer's scaling::

        A0 = sqrt(S_r / s) * V_r^T        (r, in)
        B0 = U_r * sqrt(S_r / s)          (out, r)      so  s * B0 @ A0 = U_r S_r V_r^T
        W_res = W - s * B0 @ A0           the new frozen base weight

    The layer's output is unchanged (up to rounding). ``A0`` and ``B0`` are kept as buffers
    ``pissa_A0``, ``pissa_B0``: the adapter is saved relative to the pretrained ``W``
    (``pissa_to_lora``). A ``DoRALinear`` gets its magnitude recomputed from ``W_res + s B0 A0``.
    """
    weight = layer.base.weight
    if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"PiSSA needs a float weight, got {weight.dtype}")
    full = weight.float()
    u, singular, vh = torch.linalg.svd(full, full_matrices=False)
    root = (singular[: layer.r] / layer.scaling).sqrt()
    lora_A = root[:, None] * vh[: layer.r]
    lora_B = u[:, : layer.r] * root
    layer.lora_A.copy_(lora_A)
    layer.lora_B.copy_(lora_B)
    weight.copy_((full - layer.scaling * lora_B @ lora_A).to(weight.dtype))
    layer.register_buffer("pissa_A0", lora_A.clone(), persistent=False)
    layer.register_buffer("pissa_B0", lora_B.clone(), persistent=False)
    if isinstance(layer, DoRALinear):
        layer.reset_magnitude()


def is_pissa(layer: LoRALinear) -> bool:
    """True when ``pissa_init_`` initialised ``layer`` (its base weight is a residual)."""
    return getattr(layer, "pissa_A0", None) is not None


def pissa_to_lora(layer: LoRALinear) -> tuple[torch.Tensor, torch.Tensor]:
    """The PiSSA adapter as a plain LoRA of rank ``2r`` on the pretrained ``W`` (peft's conversion).

    ``W_res + s B A = W + s (B A - B0 A0) = W + s [B, -B0] @ [A; A0]``, so
    ``A' = [A; A0]`` ``(2r, in)`` and ``B' = [B, -B0]`` ``(out, 2r)``. With the same ``s``
    (``alpha' = 2 alpha``, or ``sqrt(2) alpha`` with rsLoRA), ``A'``, ``B'`` on the
    untouched pretrained model give the trained layer.
    """
    return (
        torch.cat([layer.lora_A.detach(), layer.pissa_A0]),
        torch.cat([layer.lora_B.detach(), -layer.pissa_B0], dim=1),
    )


def lora_to_pissa(layer: LoRALinear, lora_A: torch.Tensor, lora_B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of ``pissa_to_lora`` for this layer: ``(A, B)``, the first ``r`` rows/columns.

    Raises:
        ValueError: when the other halves are not this layer's ``A0``, ``-B0`` (an adapter
        from another initialisation, or an SVD that came out differently on another device).
    """
    r = layer.r
    if not (
        torch.equal(lora_A[r:], layer.pissa_A0.to(lora_A.device))
        and torch.equal(lora_B[:, r:], -layer.pissa_B0.to(lora_B.device))
    ):
        raise ValueError("the adapter's PiSSA start (A0, B0) differs from this model's")
    return lora_A[:r], lora_B[:, :r]


# ---------------------------------------------------------------- LoRA+


def lora_plus_groups(model: nn.Module, groups: list[dict], lr: float, ratio: float) -> list[dict]:
    """Split optimizer parameter groups so that every ``lora_B`` learns at ``lr * ratio``.

    Each group keeps its settings (weight decay...); its ``lora_B`` tensors move to a copy
    of it with ``lr = lr * ratio``. Everything else (``lora_A``, DoRA's magnitude, biases,
    LayerNorms, the head) keeps ``lr``.

    peft (and the paper's reference code) also put every 1-D trainable tensor in the fast
    group. We don't: the LoRA+ argument is about the two factors of ``B @ A`` (``B`` sees the
    wide input through ``A``, so its efficient learning rate is larger); it says nothing about
    a bias, a LayerNorm or DoRA's magnitude, and a 16x learning rate on the head's bias but
    not on the head's weight has no reason behind it.
    """
    fast = {id(layer.lora_B) for _, layer in model.named_modules() if isinstance(layer, LoRALinear)}
    split = []
    for group in groups:
        slow = [p for p in group["params"] if id(p) not in fast]
        quick = [p for p in group["params"] if id(p) in fast]
        if slow:
            split.append({**group, "params": slow, "lr": group.get("lr", lr)})
        if quick:
            split.append({**group, "params": quick, "lr": group.get("lr", lr) * ratio})
    return split
