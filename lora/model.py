"""Putting LoRA into a model: inject, quantize, merge, unmerge, adapter state and parameter counts.

``inject_lora`` swaps chosen ``nn.Linear`` modules for ``LoRALinear`` wrappers in place, freezes
everything else but the modules that must train from scratch (the classifier head), and keeps
what it did on the model as ``model.lora`` (an ``Injection``: the config, the wrapped modules,
the fingerprint of their pretrained weights). ``quantize_base`` then stores every frozen
``nn.Linear`` in 8 or 4 bits (QLoRA).
"""

import dataclasses
import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from .config import LoRAConfig
from .layer import FROZEN_LINEAR, LoRALinear
from .quantize import SCHEMES, QuantizedLinear, quantized_linear
from .variants import DORA_NEEDS_FLOAT_BASE, DoRALinear, is_pissa, lora_to_pissa, pissa_init_, pissa_to_lora


@dataclass(frozen=True)
class Injection:
    """What ``inject_lora`` did to a model, kept on it as ``model.lora``."""

    config: LoRAConfig  # the config it was given
    modules: tuple[str, ...]  # the dotted names of the wrapped modules, in model order
    base_fingerprint: str | None  # of their pretrained weights (``base_fingerprint``)


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    """Yield ``(name, module)`` for every ``LoRALinear`` in ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            yield name, module


def layer_index(module_name: str) -> int | None:
    """The encoder layer a module belongs to: the first integer in its dotted name.

    ``"roberta.encoder.layer.3.attention.self.query"`` -> ``3``; ``"classifier.dense"`` -> None.
    """
    for part in module_name.split("."):
        if part.isdigit():
            return int(part)
    return None


def path_in_layer(module_name: str) -> str | None:
    """A module's dotted path inside its encoder layer: what follows the layer index.

    ``"roberta.encoder.layer.3.attention.output.dense"`` -> ``"attention.output.dense"``;
    ``"roberta.encoder.layer.3.output.dense"`` -> ``"output.dense"``; ``"classifier.dense"`` -> None.
    """
    parts = module_name.split(".")
    for position, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[position + 1 :])
    return None


def is_target(module_name: str, targets: Iterable[str]) -> bool:
    """Does a target name ``module_name``? A plain target (``"query"``) matches the last name
    component; a dotted one (``"attention.output.dense"``) matches the whole path inside an
    encoder layer, which tells apart the three ``dense`` layers of BERT and RoBERTa:
    ``attention.output.dense``, ``intermediate.dense`` and ``output.dense`` (the FFN's second).
    """
    return any(
        module_name.rsplit(".", 1)[-1] == target if "." not in target else path_in_layer(module_name) == target
        for target in targets
    )


def _is_under(name: str, module_names: Iterable[str]) -> bool:
    """True when the dotted ``name`` lies under a module named in ``module_names``.

    ``"classifier.dense.weight"`` is under ``"classifier"`` and under ``"classifier.dense"``.
    """
    parts = name.split(".")
    for module_name in module_names:
        wanted = module_name.split(".")
        for start in range(len(parts) - len(wanted) + 1):
            if parts[start : start + len(wanted)] == wanted:
                return True
    return False


def _is_under_any(names: Iterable[str], module_name: str) -> bool:
    return any(_is_under(name, (module_name,)) for name in names)


def inject_lora(model: nn.Module, config: LoRAConfig | Iterable[str] | None = None, **settings) -> list[str]:
    """Wrap every matching ``nn.Linear`` in ``LoRALinear`` and freeze the rest.

        inject_lora(model, LoRAConfig(r=8, alpha=16, target_modules=("query", "value")))
        inject_lora(model, ("query", "value"), r=8, alpha=16)      # the same, as a convenience

    Which modules are wrapped (a rule you can predict from the config alone):

    - an ``nn.Linear`` that a target names (``is_target``: its last name component, or for a
      dotted target its path inside an encoder layer, e.g. ``attention.output.dense``),
    - inside the encoder layers ``layers`` when given,
    - never inside a module that trains in full (``trainable_modules``): with the default
      ``("classifier",)``, the target ``dense`` wraps the encoder's ``dense`` layers and not
      ``classifier.dense``, whose base weight trains as it is;
    - a name given both as a target and as a trainable module is refused.

    Args:
        model: any ``nn.Module``; changed in place. ``model.lora`` records the ``Injection``.
        config: a ``LoRAConfig``; or the target names, with the other fields of ``LoRAConfig``
            as keyword arguments (``r`` and ``alpha`` have no default: the recipe's live in
            ``TrainConfig``).

    Returns:
        The dotted names of the replaced modules, in model order.

    Raises:
        ValueError: on bad settings, a name in both lists, or when nothing matches (the
        message lists the Linear names the model does have).
    """
    if not isinstance(config, LoRAConfig):
        config = LoRAConfig(**settings, **({} if config is None else {"target_modules": tuple(config)}))
    elif settings:
        raise TypeError(f"inject_lora takes a LoRAConfig or keyword settings, not both: {sorted(settings)}")
    if any(True for _ in lora_layers(model)):
        raise ValueError("this model already has LoRA layers; inject into a fresh model")
    targets, trainable = set(config.target_modules), config.trainable_modules
    both = sorted(targets & set(trainable))
    if both:
        raise ValueError(
            f"{', '.join(both)} is both a LoRA target and a module trained in full; name it in one of the two"
        )
    wanted_layers = None if config.layers is None else set(config.layers)
    matches = [
        name
        for name, module in model.named_modules()
        if isinstance(module, FROZEN_LINEAR)
        and is_target(name, targets)
        and (wanted_layers is None or layer_index(name) in wanted_layers)
        and not _is_under(name, trainable)
    ]
    if not matches:
        linear_names = sorted(
            {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, FROZEN_LINEAR)}
        )
        where = "" if wanted_layers is None else f" in layers {sorted(wanted_layers)}"
        where += f" outside the trainable modules {list(trainable)}" if trainable else ""
        raise ValueError(
            f"no nn.Linear named {sorted(targets)}{where}; this model's Linear modules are named {linear_names}"
        )

    parameter_names = [name for name, _ in model.named_parameters()]
    absent = [module for module in trainable if not _is_under_any(parameter_names, module)]
    if absent:
        raise ValueError(
            f"no parameter lies in the trainable module(s) {absent}; this model's top-level "
            f"modules are {sorted({n.split('.')[0] for n in parameter_names})}"
        )

    fingerprint = base_fingerprint(model, matches)  # before PiSSA changes W
    model.requires_grad_(False)
    layer_class = DoRALinear if config.dora else LoRALinear
    for name in matches:
        layer = layer_class(model.get_submodule(name), config.r, config.alpha, config.dropout, config.rslora)
        if config.init == "pissa":
            pissa_init_(layer)
        _replace(model, name, layer)
    for name, parameter in model.named_parameters():
        if _is_under(name, trainable):
            parameter.requires_grad_(True)
    model.lora = Injection(config, tuple(matches), fingerprint)
    return matches


def injection(model: nn.Module) -> Injection:
    """``model.lora``: what ``inject_lora`` did to ``model``. Raises ``ValueError`` if it did nothing."""
    if not isinstance(getattr(model, "lora", None), Injection):
        raise ValueError("the model has no LoRA layers; call inject_lora first")
    return model.lora


def saved_lora_config(model: nn.Module) -> LoRAConfig:
    """The ``LoRAConfig`` of the adapter ``lora_state_dict`` returns: the one ``inject_lora`` was
    given, except that a PiSSA adapter is saved as the plain LoRA of rank ``2r`` with the same
    scaling (``alpha`` doubled, or times ``sqrt(2)`` with rsLoRA), as peft saves a converted
    PiSSA adapter: applied to the pretrained weights it gives the trained model."""
    config = injection(model).config
    if config.init != "pissa":
        return config
    return dataclasses.replace(
        config, r=2 * config.r, alpha=config.alpha * (2**0.5 if config.rslora else 2), init="lora"
    )


@torch.no_grad()
def base_fingerprint(model: nn.Module, module_names: Iterable[str]) -> str | None:
    """A short hash of the pretrained weights an adapter is added to: 16 hex digits of the
    SHA-256 over each named module's name, weight and bias (as float32 bytes, in the order
    given). ``inject_lora`` takes it before PiSSA or quantization change the weights, so an
    adapter records the float base it was trained on, and a loader can tell another base apart.

    The bytes are hashed where the weights are (no copy for float32 on the CPU); for
    roberta-base's query and value layers (24 matrices 768 x 768) that is 57 MB of SHA-256.
    Returns None for a model on the meta device (shapes only: nothing to hash) and for a base
    quantized already (the float weights it was built from are gone).
    """
    digest = hashlib.sha256()
    for name in module_names:
        module = model.get_submodule(name)
        if isinstance(module, QuantizedLinear):
            return None
        digest.update(name.encode())
        for tensor in (module.weight, module.bias):
            if tensor is None:
                continue
            if tensor.is_meta:
                return None
            digest.update(tensor.detach().float().cpu().contiguous().view(torch.uint8).numpy())
    return digest.hexdigest()[:16]


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child_name = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child_name, module)


def quantize_base(model: nn.Module, scheme: str, double_quant: bool = False) -> list[str]:
    """Store every frozen ``nn.Linear`` of ``model`` quantized (``"int8"`` or ``"nf4"``, see
    ``lora/quantize.py``), in place; LoRA bases included. Call after ``inject_lora``: what
    trains (the head, the ``trainable_modules``, LoRA A and B) is not frozen and stays float,
    as do embeddings, LayerNorms and biases.

    Returns:
        The dotted names of the quantized layers.

    Raises:
        ValueError: an unknown scheme; DoRA layers (their norms need the float weight); LoRA
        updates merged into the weights (quantizing them would round the adapter away with the
        base); no frozen ``nn.Linear`` to quantize.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"unknown quantization scheme {scheme!r}; choose {' or '.join(map(repr, SCHEMES))}")
    if any(isinstance(module, DoRALinear) for _, module in lora_layers(model)):
        raise ValueError(DORA_NEEDS_FLOAT_BASE)
    if any(module.merged for _, module in lora_layers(model)):
        raise ValueError(
            "the model holds merged LoRA weights; quantizing them would round the "
            "adapter away: unmerge first (or quantize the base, then add the adapter)"
        )
    frozen = [
        (name, module)
        for name, module in model.named_modules()
        if type(module) is nn.Linear and not module.weight.requires_grad
    ]
    if not frozen:
        raise ValueError(
            "the model has no frozen nn.Linear layer to quantize (quantize after inject_lora, which freezes the base)"
        )
    quantized = [(name, quantized_linear(module, scheme, double_quant)) for name, module in frozen]
    for name, module in quantized:
        _replace(model, name, module)
    return [name for name, _ in quantized]


def dequantize_base(model: nn.Module) -> list[str]:
    """Replace every ``QuantizedLinear`` by a frozen float ``nn.Linear`` holding its
    ``dequantize()``: the weights a LoRA adapter was trained against. Returns their names."""
    names = [name for name, module in model.named_modules() if isinstance(module, QuantizedLinear)]
    for name in names:
        _replace(model, name, model.get_submodule(name).to_linear())
    return names


def merge_lora(model: nn.Module) -> None:
    """Fold every LoRA update into its base weight (see ``LoRALinear.merge``).

    On a quantized base the result is a float model: every quantized layer first becomes
    ``dequantize(Wq)`` (``dequantize_base``), then ``scaling * B @ A`` is added. The adapter
    was trained against ``dequantize(Wq)``, not the original float ``W``: merging into ``W``
    would add back the quantization error ``W - dequantize(Wq)`` that training never saw.
    ``unmerge_lora`` then restores ``dequantize(Wq)`` in float, not the packed storage.
    """
    dequantize_base(model)
    for _, module in lora_layers(model):
        module.merge()


def unmerge_lora(model: nn.Module) -> None:
    """Restore every base weight bit for bit (see ``LoRALinear.unmerge``)."""
    for _, module in lora_layers(model):
        module.unmerge()


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter: every trainable tensor, i.e. after ``inject_lora`` the LoRA A/B (and DoRA's
    magnitude) and the head.

    Keys are ``model.named_parameters()`` names; values are detached (not copied). The adapter
    is always relative to the pretrained weights: a PiSSA layer's A and B come as the rank-2r
    plain LoRA ``pissa_to_lora`` makes of them (new tensors).

    Raises:
        ValueError: when a base weight inside a LoRA layer is trainable: once merged, the saved
        value would hold ``delta_W`` and loading it would apply the update twice.
    """
    inside = [f"{name}.base" for name, _ in lora_layers(model)]
    wrong = [
        name for name, parameter in model.named_parameters() if parameter.requires_grad and _is_under(name, inside)
    ]
    if wrong:
        raise ValueError(f"{_some(wrong)} trains inside a LoRA layer; only lora_A / lora_B may")
    state = {name: parameter.detach() for name, parameter in model.named_parameters() if parameter.requires_grad}
    for name, layer in lora_layers(model):
        if is_pissa(layer):
            state[f"{name}.lora_A"], state[f"{name}.lora_B"] = pissa_to_lora(layer)
    return state


def _some(names: Iterable[str], limit: int = 5) -> str:
    names = sorted(names)
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


@torch.no_grad()
def load_lora_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy an adapter into a model prepared by the same ``inject_lora`` call. Strict.

    The inverse of ``lora_state_dict``: a PiSSA layer takes the first halves of the rank-2r
    A and B (``lora_to_pissa``).

    Raises:
        ValueError: naming the missing, unexpected or mis-shaped keys; nothing is copied then.
    """
    own = lora_state_dict(model)
    problems = []
    missing, unexpected = own.keys() - state.keys(), state.keys() - own.keys()
    if missing:
        problems.append(f"missing keys: {_some(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_some(unexpected)}")
    misshaped = [
        f"{key} {tuple(state[key].shape)} vs model {tuple(own[key].shape)}"
        for key in own.keys() & state.keys()
        if state[key].shape != own[key].shape
    ]
    if misshaped:
        problems.append(f"mis-shaped: {_some(misshaped)}")
    if problems:
        raise ValueError("adapter does not fit the model: " + "; ".join(problems))
    state = dict(state)
    for name, layer in lora_layers(model):
        if is_pissa(layer):
            state[f"{name}.lora_A"], state[f"{name}.lora_B"] = lora_to_pissa(
                layer, state[f"{name}.lora_A"], state[f"{name}.lora_B"]
            )
    for key, parameter in model.named_parameters():
        if key in own:
            parameter.copy_(state[key])


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts. A quantized base weight is stored as buffers,
    not a parameter, and still counts as its ``out * in`` numbers in the total."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    quantized = sum(m.out_features * m.in_features for m in model.modules() if isinstance(m, QuantizedLinear))
    total = sum(p.numel() for p in model.parameters()) + quantized
    return trainable, total


def parameter_table(model: nn.Module) -> str:
    """A readable breakdown of the trainable parameters, one row per module, with totals.

    LoRA rows show the shapes of A and B and the count as ``r * (in + out)``, DoRA rows as
    ``r * (in + out) + out`` (the magnitude vector).
    """
    rows = [("module", "A", "B", "trainable", "formula")]
    lora_names = set()
    for name, module in lora_layers(model):
        lora_names.update(f"{name}.{p}" for p, _ in module.named_parameters(recurse=False))
        r, n_in, n_out = module.r, module.base.in_features, module.base.out_features
        dora = isinstance(module, DoRALinear)
        rows.append(
            (
                name,
                f"{r}x{n_in}",
                f"{n_out}x{r}",
                f"{r * (n_in + n_out) + dora * n_out:,}",
                f"{r} * ({n_in} + {n_out})" + (f" + {n_out}" if dora else ""),
            )
        )
    for name, parameter in model.named_parameters():
        if parameter.requires_grad and name not in lora_names:
            shape = "x".join(map(str, parameter.shape))
            rows.append((name, "", "", f"{parameter.numel():,}", f"full {shape}"))
    trainable, total = count_parameters(model)
    rows.append(("total", "", "", f"{trainable:,}", f"{100 * trainable / total:.3f}% of {total:,}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows)
