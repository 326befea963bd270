"""A quantized frozen base (QLoRA, Dettmers et al. 2023, https://arxiv.org/abs/2305.14314).

LoRA never changes the base weights, so they can be stored in 8 or 4 bits and turned back
into floats only for the moment a matmul needs them. Two storage schemes, both as
bitsandbytes defines them:

**int8**, one float32 scale per output row::

    absmax[o] = max_i |W[o, i]|          q[o, i] = round(W[o, i] * 127 / absmax[o])   (int8)
    W~[o, i]  = q[o, i] * absmax[o] / 127

**nf4** (4-bit NormalFloat): ``W`` read row-major as one long vector, cut into blocks of
64 consecutive values; each block keeps its float32 ``absmax`` and, per value, the index of
the nearest of 16 code-book values ``NF4`` (quantiles of a normal distribution scaled to
[-1, 1]), two 4-bit indices per byte::

    W~[k] = NF4[index[k]] * absmax[k // 64]

With ``double_quant`` the absmax values themselves are stored in 8 bits: minus their mean,
in blocks of 256 with bitsandbytes' signed 8-bit dynamic code book ``DYNAMIC_8BIT``::

    absmax~[b] = DYNAMIC_8BIT[qabsmax[b]] * absmax2[b // 256] + mean

Bits per weight: int8 8 + 32 / in_features; nf4 4 + 32/64 = 4.5; nf4 + double quant
4 + 8/64 + 32/(64*256) = 4.127 (float32: 32).

Training: ``QuantizedLinear.forward`` runs a custom autograd function that saves no tensor
for backward; backward dequantizes again from the packed storage to get the input gradient.
A plain ``F.linear(x, dequantize())`` would keep the full float weight alive until backward
and save nothing. There is no weight gradient: the base is frozen.
"""

import math

import torch
from torch import nn
from torch.nn import functional as F

SCHEMES = ("int8", "nf4")


def scheme_from_file(value: str | None) -> str | None:
    """A ``quantize_base`` read from a saved config: a scheme, or None for a float base
    (files written before 0.3 said ``"none"``)."""
    return None if value in (None, "none") else value


NF4_BLOCK = 64
ABSMAX_BLOCK = 256  # double quantization: absmax values per 8-bit block

# bitsandbytes ``get_4bit_type("nf4")``: 7 negative values, 0, 8 positive values.
NF4 = torch.tensor(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ]
)


def dynamic_map_8bit() -> torch.Tensor:
    """bitsandbytes' ``create_dynamic_map(signed=True)``: 256 sorted values in [-1, 1].

    For each decade ``10**-6 ... 10**0`` it holds the midpoints of an evenly spaced grid on
    [0.1, 1] times the decade (1, 2, 4, ..., 64 intervals: finer steps for larger magnitudes),
    with both signs: 2 x 127 values; then 0 and 1.
    """
    values = []
    for exponent in range(7):
        grid = torch.linspace(0.1, 1, 2**exponent + 1, dtype=torch.float32)
        means = (grid[:-1] + grid[1:]) / 2.0
        values += (10 ** (exponent - 6) * means).tolist()
        values += (-(10 ** (exponent - 6)) * means).tolist()
    values += [0.0, 1.0]
    return torch.tensor(sorted(values), dtype=torch.float32)


DYNAMIC_8BIT = dynamic_map_8bit()


def nearest_index(values: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """uint8 index of the nearest value of the sorted ``code`` for each element of ``values``:
    the count of midpoints between neighbouring code values that lie below it (a value on a
    midpoint goes to the lower index), as bitsandbytes rounds."""
    code = code.to(values.device, values.dtype)
    midpoints = (code[:-1] + code[1:]) / 2
    return torch.bucketize(values, midpoints).to(torch.uint8)


def blockwise_absmax(values: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``values`` (1-D, float32) zero-padded to whole blocks, as ``(blocks, block)``, and the
    float32 absmax of each block (zero padding never changes an absmax)."""
    padded = F.pad(values, (0, -values.numel() % block)).reshape(-1, block)
    return padded, padded.abs().amax(dim=1)


def quantize_blockwise(values: torch.Tensor, code: torch.Tensor, block: int):
    """``(indices (blocks, block) uint8, absmax (blocks,) float32)``: each block divided by
    its absmax (as ``* (1 / absmax)``, bitsandbytes' rounding) and mapped to the nearest
    ``code`` value. An all-zero block gets absmax 0 and all indices of the code's 0."""
    blocks, absmax = blockwise_absmax(values.float(), block)
    scaled = (blocks * (1 / absmax.masked_fill(absmax == 0, 1))[:, None]).clamp(-1, 1)
    return nearest_index(scaled, code), absmax


class QuantizedLinear(nn.Module):
    """A frozen ``nn.Linear`` whose weight ``(out, in)`` is stored quantized; the bias stays float.

    Subclasses define how the weight is stored (``_store``) and read back (``dequantize``).
    ``forward(x)``: ``x`` ``(*, in)`` -> ``(*, out)``, the matmul in ``x``'s dtype (or the
    autocast dtype), with the weight dequantized on the fly and dropped right after.
    """

    scheme = ""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        with torch.no_grad():
            self._store(linear.weight.detach().float())

    def _store(self, weight: torch.Tensor) -> None:
        raise NotImplementedError

    def dequantize(self) -> torch.Tensor:
        """The float32 weight ``(out, in)`` the layer computes with."""
        raise NotImplementedError

    def storage_bytes(self) -> int:
        """Bytes of the quantized weight and its scales (the bias not included)."""
        return sum(buffer.numel() * buffer.element_size() for buffer in self.buffers())

    def to_linear(self) -> nn.Linear:
        """A frozen float ``nn.Linear`` holding ``dequantize()`` and the bias."""
        bias = self.bias is not None
        linear = nn.Linear(self.in_features, self.out_features, bias=bias, device=next(self.buffers()).device)
        with torch.no_grad():
            linear.weight.copy_(self.dequantize())
            if bias:
                linear.bias.copy_(self.bias)
        return linear.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        with torch.autocast(device, enabled=False):
            y = FrozenQuantizedMatmul.apply(x.to(dtype), self)
            return y if self.bias is None else y + self.bias.to(dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme}"


class FrozenQuantizedMatmul(torch.autograd.Function):
    """``y = x @ dequantize(Wq)^T`` that keeps no float weight for backward.

    Forward dequantizes, multiplies, and lets the float weight go. Backward needs only
    ``dL/dx = dL/dy @ W`` (no ``dL/dW``: the base is frozen), so it dequantizes once more from
    the layer's packed buffers. Saved for backward: no tensor at all, only the layer reference.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: QuantizedLinear) -> torch.Tensor:
        ctx.layer = layer
        return F.linear(x, layer.dequantize().to(x.dtype))

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        weight = ctx.layer.dequantize().to(grad_y.dtype)
        return grad_y @ weight, None


class Int8Linear(QuantizedLinear):
    """int8 per output row: ``q = round(W * 127 / absmax_row)``; 1 byte per weight + 4 per row."""

    scheme = "int8"

    def _store(self, weight: torch.Tensor) -> None:
        absmax = weight.abs().amax(dim=1)
        scale = 127 / absmax.masked_fill(absmax == 0, 1)
        self.register_buffer("qweight", torch.round(weight * scale[:, None]).to(torch.int8))
        self.register_buffer("absmax", absmax)

    def dequantize(self) -> torch.Tensor:
        return self.qweight.float() * (self.absmax / 127)[:, None]


class NF4Linear(QuantizedLinear):
    """NF4 in blocks of 64 (row-major), float32 absmax per block, two indices per byte (the
    first in the high nibble); with ``double_quant`` the absmax values in 8 bits (see module)."""

    scheme = "nf4"

    def __init__(self, linear: nn.Linear, double_quant: bool = False):
        self.double_quant = double_quant
        super().__init__(linear)

    def _store(self, weight: torch.Tensor) -> None:
        indices, absmax = quantize_blockwise(weight.reshape(-1), NF4, NF4_BLOCK)
        indices = indices.reshape(-1, 2)
        self.register_buffer("packed", indices[:, 0] << 4 | indices[:, 1])
        if not self.double_quant:
            self.register_buffer("absmax", absmax)
            return
        # The float32 scalar offset is counted in storage_bytes like the other buffers.
        offset = absmax.mean()
        qabsmax, absmax2 = quantize_blockwise(absmax - offset, DYNAMIC_8BIT, ABSMAX_BLOCK)
        self.register_buffer("qabsmax", qabsmax.reshape(-1)[: absmax.numel()])
        self.register_buffer("absmax2", absmax2)
        self.register_buffer("offset", offset)

    def block_absmax(self) -> torch.Tensor:
        """The float32 absmax of every 64-value block (read back from 8 bits with double quant)."""
        if not self.double_quant:
            return self.absmax
        blocks = torch.arange(self.qabsmax.numel(), device=self.qabsmax.device) // ABSMAX_BLOCK
        code = DYNAMIC_8BIT.to(self.qabsmax.device)
        return code[self.qabsmax.long()] * self.absmax2[blocks] + self.offset

    def dequantize(self) -> torch.Tensor:
        indices = torch.stack([self.packed >> 4, self.packed & 0x0F], dim=1).reshape(-1, NF4_BLOCK)
        values = NF4.to(indices.device)[indices.long()] * self.block_absmax()[:, None]
        return values.reshape(-1)[: self.out_features * self.in_features].reshape(self.out_features, self.in_features)

    def extra_repr(self) -> str:
        return super().extra_repr() + (", double_quant=True" if self.double_quant else "")


def quantized_linear(linear: nn.Linear, scheme: str, double_quant: bool = False) -> QuantizedLinear:
    """``linear`` stored as ``scheme`` (``"int8"`` or ``"nf4"``)."""
    if scheme == "int8":
        return Int8Linear(linear)
    if scheme == "nf4":
        return NF4Linear(linear, double_quant)
    raise ValueError(f"unknown quantization scheme {scheme!r}; choose 'int8' or 'nf4'")


def bits_per_weight(scheme: str, double_quant: bool = False, in_features: int | None = None) -> float:
    """Stored bits per weight, scales included (int8 needs ``in_features``: one scale a row)."""
    if scheme == "int8":
        return 8 + 32 / in_features
    if double_quant:
        return 4 + 8 / NF4_BLOCK + 32 / (NF4_BLOCK * ABSMAX_BLOCK)
    return 4 + 32 / NF4_BLOCK


def storage_formula_bytes(out_features: int, in_features: int, scheme: str, double_quant: bool = False) -> int:
    """Bytes a quantized ``(out, in)`` weight takes, by the formula (padding included)."""
    n = out_features * in_features
    if scheme == "int8":
        return n + 4 * out_features
    blocks = math.ceil(n / NF4_BLOCK)
    if not double_quant:
        return blocks * NF4_BLOCK // 2 + 4 * blocks
    return blocks * NF4_BLOCK // 2 + blocks + 4 * math.ceil(blocks / ABSMAX_BLOCK) + 4


def describe_quantized(model: nn.Module) -> str:
    """One line: scheme, layer and weight counts, bytes in float32 and quantized, bits a weight."""
    layers = [module for module in model.modules() if isinstance(module, QuantizedLinear)]
    if not layers:
        return "base not quantized"
    weights = sum(layer.in_features * layer.out_features for layer in layers)
    stored = sum(layer.storage_bytes() for layer in layers)
    first = layers[0]
    double_quant = getattr(first, "double_quant", False)
    name = first.scheme + (" + double quant" if double_quant else "")
    saved = (
        f"; double quant saves {bits_per_weight('nf4') - bits_per_weight('nf4', True):.3f} bits a weight"
        if double_quant
        else ""
    )
    return (
        f"quantized base: {name}, {len(layers)} Linear layers, {weights / 1e6:.2f}M weights: "
        f"{4 * weights / 1e6:.1f} MB in float32 -> {stored / 1e6:.1f} MB "
        f"({8 * stored / weights:.3f} bits a weight{saved})"
    )
