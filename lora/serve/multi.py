"""Many adapters on one frozen base, mixed in one batch: each row runs through its own adapter.

The BGMV idea of Punica and S-LoRA in plain torch. Every adapted ``nn.Linear`` computes the
frozen ``x @ W^T + b`` once for the whole batch, then adds each row's own low-rank update,
gathered from the adapters' ``A`` and ``B`` stacked along a first "slot" axis::

    x: (batch, seq, in)          slot[i]: the slot of row i's adapter (0: no update)
    A: (slots, R, in)            B: (slots, out, R)            s: (slots,)
    y[i] = x[i] @ W^T + b + s[slot[i]] * (x[i] @ A[slot[i]]^T) @ B[slot[i]]^T

Ranks differ between adapters: each is padded with zero rows of ``A`` and zero columns of ``B``
up to the largest rank ``R`` in that layer, which adds exact zeros. A layer that an adapter
does not target gives that adapter's rows the zero slot. The gather copies
``batch * R * (in + out)`` numbers per layer, small beside the base matmul's
``batch * seq * in * out``. ``bench/serving.py`` times it against a loop over the adapters
present (its *grouped* column); in a first rough check on a shared machine the loop was slower,
so the gather is what the library keeps.

DoRA works too: its update is ``(c - 1) * (x @ W^T) + c * s * (x @ A^T) @ B^T`` with the
per-output factor ``c = m / ||W + s B A||_c`` fixed for an adapter at inference, so it is
precomputed per slot (``c = 1`` for plain LoRA, which leaves the plain update bit for bit).

The trainable modules (the classification head) run row-wise: each adapter's rows go through
the base module with that adapter's tensors (``torch.func.functional_call``), so heads may
have different numbers of labels; outputs narrower than the widest are padded with ``-inf``
(softmax gives those labels probability 0). Rows with no adapter (index ``-1``) run the base
model exactly as loaded.

Imports only torch: the model can be any ``nn.Module`` whose frozen layers are ``nn.Linear``.
Not thread-safe: one forward at a time per ``MultiAdapterModel`` (the adapter index of the
running batch is shared state of its layers).
"""

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.func import functional_call

from ..layer import lora_scaling

LORA_KEYS = ("lora_A", "lora_B", "lora_magnitude")


@dataclass
class LayerUpdate:
    """One adapter's update of one Linear: ``A (r, in)``, ``B (out, r)``, the scaling ``s``,
    and DoRA's magnitude ``m (out,)`` (None for plain LoRA)."""

    lora_A: torch.Tensor
    lora_B: torch.Tensor
    scaling: float
    magnitude: torch.Tensor | None = None


@dataclass
class AdapterWeights:
    """One adapter as tensors: ``layers`` maps a Linear's dotted name to its ``LayerUpdate``;
    ``modules`` maps a trainable module's name (``"classifier"``) to its tensors, named
    relative to it (``"dense.weight"``)."""

    layers: dict[str, LayerUpdate] = field(default_factory=dict)
    modules: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)

    @classmethod
    def from_state(
        cls,
        state: dict[str, torch.Tensor],
        r: int,
        alpha: float,
        rslora: bool = False,
        trainable_modules: tuple[str, ...] | list[str] = (),
    ) -> "AdapterWeights":
        """Split a ``lora_state_dict`` (an adapter file) into layer updates and module tensors.

        Raises:
            ValueError: a LoRA layer without both A and B, A of another rank than ``r``, or a
            tensor that is neither LoRA nor inside one of ``trainable_modules``.
        """
        scaling = lora_scaling(r, alpha, rslora)
        weights, parts, stray = cls(), {}, []
        for key, tensor in state.items():
            owner, _, leaf = key.rpartition(".")
            if leaf in LORA_KEYS:
                parts.setdefault(owner, {})[leaf] = tensor.float()
                continue
            module = _trained_module(key, trainable_modules)
            if module is None:
                stray.append(key)
            else:
                weights.modules.setdefault(module, {})[key[len(module) + 1 :]] = tensor
        if stray:
            raise ValueError(
                f"adapter tensors outside LoRA layers and trainable modules "
                f"{list(trainable_modules)}: {', '.join(sorted(stray)[:5])}"
            )
        for name, tensors in parts.items():
            if "lora_A" not in tensors or "lora_B" not in tensors:
                raise ValueError(f"{name} has no lora_A or no lora_B")
            if tensors["lora_B"].ndim == 3:  # FusedQKVLoRALinear's (k, h, r)
                raise ValueError(
                    f"{name} holds LoRA on slices of a fused q/k/v Linear, which is not served with other "
                    "adapters yet; predict.py --adapter serves it alone"
                )
            if tensors["lora_A"].shape[0] != r:
                raise ValueError(f"{name}.lora_A has rank {tensors['lora_A'].shape[0]}, the config says r={r}")
            weights.layers[name] = LayerUpdate(
                tensors["lora_A"], tensors["lora_B"], scaling, tensors.get("lora_magnitude")
            )
        return weights


def _trained_module(key: str, trainable_modules) -> str | None:
    """The module that tensor ``key`` belongs to as a module trained in full: the shortest prefix
    of its dotted name that ends with one of ``trainable_modules`` (``"classifier"``, or a path
    such as ``"output.LayerNorm"``, which names that LayerNorm in every encoder layer)."""
    parts = key.split(".")
    for end in range(1, len(parts)):
        for module in trainable_modules:
            wanted = module.split(".")
            if parts[max(0, end - len(wanted)) : end] == wanted:
                return ".".join(parts[:end])
    return None


class Routing:
    """The adapter index of every row of the running batch, ``(batch,)`` long; the adapter
    count for a row with none. Shared by all multi-adapter modules of one model, set by
    ``MultiAdapterModel.forward``."""

    def __init__(self):
        self.rows: torch.Tensor | None = None

    def current(self) -> torch.Tensor:
        if self.rows is None:
            raise RuntimeError("call the MultiAdapterModel, not its inner model: no adapter index set")
        return self.rows


class MultiLoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus, per row, the update of that row's adapter (see the module doc).

    Buffers: ``slot_of (adapters + 1,)`` maps an adapter index to its slot here (the last entry,
    for rows with no adapter, and adapters that do not target this layer: slot 0, all zeros);
    ``lora_A (slots, R, in)``, ``lora_B (slots, out, R)``, ``scaling (slots,)`` in float32;
    ``dora_factor (slots, out)`` when an adapter here is DoRA, else None.
    """

    def __init__(self, base: nn.Linear, routing: Routing, updates: list[LayerUpdate | None]):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.routing = routing
        present = [update for update in updates if update is not None]
        rank = max(update.lora_A.shape[0] for update in present)
        device, slots = base.weight.device, len(present) + 1
        lora_A = torch.zeros(slots, rank, base.in_features, device=device)
        lora_B = torch.zeros(slots, base.out_features, rank, device=device)
        scaling = torch.zeros(slots, device=device)
        slot_of = torch.zeros(len(updates) + 1, dtype=torch.long, device=device)
        for slot, (index, update) in enumerate(((i, u) for i, u in enumerate(updates) if u is not None), start=1):
            r = update.lora_A.shape[0]
            lora_A[slot, :r], lora_B[slot, :, :r] = update.lora_A, update.lora_B
            scaling[slot], slot_of[index] = update.scaling, slot
        self.register_buffer("slot_of", slot_of)
        self.register_buffer("lora_A", lora_A)
        self.register_buffer("lora_B", lora_B)
        self.register_buffer("scaling", scaling)
        self.register_buffer(
            "dora_factor", self._dora_factors(present) if any(u.magnitude is not None for u in present) else None
        )

    @torch.no_grad()
    def _dora_factors(self, present: list[LayerUpdate]) -> torch.Tensor:
        """``c = m / ||W + s B A||_c`` per slot, ``(slots, out)``; 1 for the zero slot and plain LoRA."""
        weight = self.base.weight.float()
        factors = torch.ones(len(present) + 1, self.base.out_features, device=weight.device)
        for slot, update in enumerate(present, start=1):
            if update.magnitude is not None:
                delta = update.lora_B.to(weight.device) @ update.lora_A.to(weight.device)
                adapted = weight + update.scaling * delta
                factors[slot] = update.magnitude.to(weight.device) / torch.linalg.norm(adapted, dim=1)
        return factors

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base(x)
        slots = self.slot_of[self.routing.current()]  # (batch,)
        rows = x.reshape(x.shape[0], -1, x.shape[-1]).to(self.lora_A.dtype)  # (batch, seq, in)
        update = self.lora_update(rows, slots)  # (batch, seq, out)
        if self.dora_factor is not None:
            factor = self.dora_factor[slots][:, None, :]  # (batch, 1, out)
            base_part = result if self.base.bias is None else result - self.base.bias
            base_part = base_part.reshape(update.shape).to(update.dtype)
            update = (factor - 1) * base_part + factor * update
        return result + update.reshape(result.shape).to(result.dtype)

    def lora_update(self, rows: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """``s_i * (x_i @ A_i^T) @ B_i^T`` for every row ``i`` at once: gather each row's
        ``A``, ``B``, ``s`` by its slot, two batched matmuls. ``(batch, seq, in)`` -> ``(batch, seq, out)``."""
        hidden = torch.bmm(rows, self.lora_A[slots].transpose(1, 2))  # (batch, seq, R)
        hidden = hidden * self.scaling[slots][:, None, None]
        return torch.bmm(hidden, self.lora_B[slots].transpose(1, 2))

    def extra_repr(self) -> str:
        return f"adapters={int((self.slot_of > 0).sum())}, rank<={self.lora_A.shape[1]}"


class RowwiseModule(nn.Module):
    """A trainable module (the head) run row-wise: the rows of adapter ``a`` go through
    ``base`` with ``tensors[a]`` in place of its own; rows with no adapter, or whose adapter
    does not train this module, through ``base`` as it is. Every positional tensor argument
    is split along its first axis (rows). The outputs ``(rows, *, width_a)`` are put back in
    row order, padded with ``-inf`` to the widest (heads over different label sets)."""

    def __init__(self, base: nn.Module, routing: Routing, tensors: list[dict[str, torch.Tensor] | None]):
        super().__init__()
        self.base, self.routing = base, routing
        self.tensors = tensors

    def forward(self, *args, **kwargs) -> torch.Tensor:
        index = self.routing.current()
        groups = []
        for adapter in index.unique().tolist():
            rows = (index == adapter).nonzero().squeeze(1)
            row_args = [arg[rows] if torch.is_tensor(arg) else arg for arg in args]
            tensors = self.tensors[adapter] if adapter < len(self.tensors) else None  # else: none
            output = (
                self.base(*row_args, **kwargs)
                if tensors is None
                else functional_call(self.base, tensors, tuple(row_args), kwargs, strict=False)
            )
            groups.append((rows, output))
        width = max(output.shape[-1] for _, output in groups)
        first = groups[0][1]
        result = first.new_full((len(index), *first.shape[1:-1], width), float("-inf"))
        for rows, output in groups:
            result[rows, ..., : output.shape[-1]] = output
        return result


class MultiAdapterModel(nn.Module):
    """``model`` (a frozen base, changed in place) serving many adapters in one batch.

        multi = MultiAdapterModel(base_model)
        multi.set_adapters([weights_a, weights_b])              # AdapterWeights, index 0, 1
        logits = multi(torch.tensor([1, 0, -1]), input_ids=..., attention_mask=...).logits

    Row ``i`` of the output is what ``base_model`` with adapter ``adapter_index[i]`` merged
    gives (up to float rounding), ``-inf`` beyond that adapter's head width; ``-1``: the base
    as loaded. Only ``model``'s forward is called, so its own arguments and outputs stay.
    Move the model to its device before ``set_adapters``: the stacks are built where it is.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model.requires_grad_(False).eval()
        self.routing = Routing()
        self.adapter_count = 0

    def set_adapters(self, adapters: list[AdapterWeights]) -> None:
        """Serve exactly ``adapters`` (their list index is their adapter index), replacing any
        served before. The base weights are never copied or changed.

        Raises:
            ValueError: an adapter names a layer that is not an ``nn.Linear`` of the model, a
            module the model lacks, or tensors whose shapes do not fit it; the model then
            serves nothing until the next successful call.
        """
        self._restore_base()
        try:
            self._wrap_layers(adapters)
            self._wrap_modules(adapters)
        except ValueError:
            self._restore_base()
            raise
        self.adapter_count = len(adapters)

    def _wrap_layers(self, adapters: list[AdapterWeights]) -> None:
        names = sorted({name for adapter in adapters for name in adapter.layers})
        for name in names:
            base = self._submodule(name)
            if type(base) is not nn.Linear:
                raise ValueError(
                    f"{name} is a {type(base).__name__}, not an nn.Linear: only float Linear layers are served"
                )
            updates = [adapter.layers.get(name) for adapter in adapters]
            for update in filter(None, updates):
                if (
                    update.lora_A.shape[1] != base.in_features
                    or update.lora_B.shape[0] != base.out_features
                    or update.lora_B.shape[1] != update.lora_A.shape[0]
                ):
                    raise ValueError(
                        f"{name}: A {tuple(update.lora_A.shape)}, B {tuple(update.lora_B.shape)} "
                        f"do not fit a Linear {base.in_features} -> {base.out_features}"
                    )
            _replace(self.model, name, MultiLoRALinear(base, self.routing, updates))

    def _wrap_modules(self, adapters: list[AdapterWeights]) -> None:
        for name in sorted({module for adapter in adapters for module in adapter.modules}):
            base = self._submodule(name)
            own = dict(base.named_parameters())
            tensors = [adapter.modules.get(name) for adapter in adapters]
            for adapter_tensors in filter(None, tensors):
                unknown = adapter_tensors.keys() - own.keys()
                if unknown:
                    raise ValueError(f"module {name} has no {', '.join(sorted(unknown))}")
            device = next(base.parameters()).device
            tensors = [None if t is None else {k: v.to(device, own[k].dtype) for k, v in t.items()} for t in tensors]
            _replace(self.model, name, RowwiseModule(base, self.routing, tensors))

    def _submodule(self, name: str) -> nn.Module:
        try:
            return self.model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"the base model has no module {name}") from None

    def _restore_base(self) -> None:
        """Put every wrapped layer and module back: the model as it was loaded."""
        wrapped = [
            (name, module)
            for name, module in self.model.named_modules()
            if isinstance(module, (MultiLoRALinear, RowwiseModule))
        ]
        for name, module in wrapped:
            _replace(self.model, name, module.base)
        self.adapter_count = 0

    def forward(self, adapter_index: torch.Tensor, *args, **kwargs):
        """Run ``model(*args, **kwargs)`` with row ``i`` through adapter ``adapter_index[i]``."""
        if adapter_index.dtype != torch.long or adapter_index.dim() != 1:
            raise ValueError("adapter_index must be a 1-D long tensor, one index per row")
        if ((adapter_index < -1) | (adapter_index >= self.adapter_count)).any():
            raise ValueError(f"adapter indices run from -1 (none) to {self.adapter_count - 1}")
        device = next(self.model.parameters()).device
        # Index -1 picks the last entry of every layer's slot_of: the zero slot.
        self.routing.rows = torch.where(adapter_index < 0, self.adapter_count, adapter_index).to(device)
        try:
            return self.model(*args, **kwargs)
        finally:
            self.routing.rows = None


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child_name = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child_name, module)
