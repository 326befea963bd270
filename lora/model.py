"""Putting LoRA into a model: inject, quantize, merge, unmerge, adapter state and parameter counts.

``inject_lora`` swaps chosen ``nn.Linear`` modules for ``LoRALinear`` wrappers in place, freezes
everything else but the classification head and the modules the checkpoint did not hold, and
keeps what it did on the model as ``model.lora`` (an ``Injection``: the config, the wrapped
modules, the modules trained in full, the fingerprint of their pretrained weights).
``quantize_base`` then stores every frozen ``nn.Linear`` in 8 or 4 bits (QLoRA).

Target names are BERT's (``query``, ``key``, ``value``, ``attention.output.dense``,
``intermediate.dense``, ``output.dense``) whatever the model: ``FAMILIES`` says what each
supported encoder family calls them, and where its classification head is.
"""

import dataclasses
import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from .config import LoRAConfig, SettingError
from .layer import FROZEN_LINEAR, LoRALinear
from .quantize import SCHEMES, QuantizedLinear, quantized_linear
from .variants import (
    DORA_NEEDS_FLOAT_BASE,
    QKV_ROLES,
    DoRALinear,
    FusedQKVLoRALinear,
    is_pissa,
    lora_to_pissa,
    pissa_init_,
    pissa_to_lora,
)


@dataclass(frozen=True)
class Family:
    """How one encoder family (transformers' ``config.model_type``) names its modules.

    Attributes:
        names: a generic target name (BERT's) -> this family's path inside an encoder layer.
        fused_qkv: the path of one Linear computing ``[q | k | v]``: ``query``, ``key`` and
            ``value`` then name its slices (``FusedQKVLoRALinear``).
        head: the modules between the encoder and the logits (``head="full"`` trains them).
        head_dense: the head's hidden Linear on the pooled token; ``head_output``: its output Linear.
        tanh_head: the hidden layer is followed by tanh, one-to-one: at the identity it passes
            the pooled token on whole (``head="linear"`` where the hidden layer is fresh).
    """

    head: tuple[str, ...]
    head_dense: str
    head_output: str
    names: dict[str, str] = field(default_factory=dict)
    fused_qkv: str | None = None
    tanh_head: bool = False


FAMILIES = {
    "roberta": Family(("classifier",), "classifier.dense", "classifier.out_proj", tanh_head=True),
    "bert": Family(("bert.pooler", "classifier"), "bert.pooler.dense", "classifier", tanh_head=True),  # MiniLM too
    "distilbert": Family(
        ("pre_classifier", "classifier"),
        "pre_classifier",
        "classifier",
        names={
            "query": "attention.q_lin",
            "key": "attention.k_lin",
            "value": "attention.v_lin",
            "attention.output.dense": "attention.out_lin",
            "intermediate.dense": "ffn.lin1",
            "output.dense": "ffn.lin2",
        },
    ),
    "deberta-v2": Family(  # DeBERTa v2 and v3
        ("pooler", "classifier"),
        "pooler.dense",
        "classifier",
        names={
            "query": "attention.self.query_proj",
            "key": "attention.self.key_proj",
            "value": "attention.self.value_proj",
        },
    ),
    "modernbert": Family(
        ("head", "classifier"),
        "head.dense",
        "classifier",
        names={"attention.output.dense": "attn.Wo", "intermediate.dense": "mlp.Wi", "output.dense": "mlp.Wo"},
        fused_qkv="attn.Wqkv",
    ),
}


def family_of(model: nn.Module) -> Family | None:
    """The ``Family`` of a transformers model (by ``model.config.model_type``); None for others."""
    return FAMILIES.get(getattr(getattr(model, "config", None), "model_type", None))


def own_names(targets: Iterable[str], family: Family | None) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``(names, slices)``: the targets in the family's own names (others as they are), and the
    roles among ``query``, ``key``, ``value`` that name slices of its fused q/k/v Linear."""
    targets = tuple(targets)
    if family is None:
        return targets, ()
    slices = tuple(role for role in QKV_ROLES if family.fused_qkv and role in targets)
    return tuple(family.names.get(t, t) for t in targets if t not in slices), slices


@dataclass(frozen=True)
class Injection:
    """What ``inject_lora`` did to a model, kept on it as ``model.lora``."""

    config: LoRAConfig  # the config it was given
    modules: tuple[str, ...]  # the dotted names of the wrapped modules, in model order
    base_fingerprint: str | None  # of their pretrained weights (``base_fingerprint``)
    trainable_modules: tuple[str, ...] = ()  # trained in full: the config's, or ``head_modules``


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

    Which modules are wrapped (a rule you can predict from the config and the model's family):

    - an ``nn.Linear`` that a target names (``is_target``: its last name component, or for a
      dotted target its path inside an encoder layer, e.g. ``attention.output.dense``); BERT's
      names stand for the family's own (``FAMILIES``: ``query`` is DeBERTa's ``query_proj``),
      and a family's own names work as they are;
    - on a fused q/k/v Linear (ModernBERT's ``Wqkv``), ``query``, ``key`` and ``value`` adapt
      those slices of it: one ``FusedQKVLoRALinear`` per layer, the other slices untouched;
    - inside the encoder layers ``layers`` when given,
    - never inside a module that trains in full (``trainable_modules``): the target ``dense``
      wraps the encoder's ``dense`` layers and not RoBERTa's ``classifier.dense``;
    - with ``head="lora"``, the head's hidden layer too (``Family.head_dense``);
    - a name given both as a target and as a trainable module is refused.

    What trains in full: ``trainable_modules``, or by default ``head_modules``: the head as
    ``head`` says and every module the checkpoint did not hold (``model.fresh_parameters``, the
    loading report ``lora.classifier.load_classifier_model`` keeps). A fresh parameter that
    would neither train nor be saved is refused. With ``head`` ``"lora"`` or ``"linear"``, a
    fresh hidden layer of the head starts at the identity (weight ``I``, bias 0; frozen), so
    that rebuilding the model gives it again.

    Args:
        model: any ``nn.Module``; changed in place. ``model.lora`` records the ``Injection``.
        config: a ``LoRAConfig``; or the target names, with the other fields of ``LoRAConfig``
            as keyword arguments (``r`` and ``alpha`` have no default: the recipe's live in
            ``TrainConfig``).

    Returns:
        The dotted names of the replaced modules, in model order.

    Raises:
        ValueError: on bad settings, a name in both lists, a variant the layers cannot take
        (DoRA or PiSSA on slices), a head the family cannot have, a fresh module left random,
        or when nothing matches (the message lists the Linear names the model does have).
    """
    if not isinstance(config, LoRAConfig):
        config = LoRAConfig(**settings, **({} if config is None else {"target_modules": tuple(config)}))
    elif settings:
        raise TypeError(f"inject_lora takes a LoRAConfig or keyword settings, not both: {sorted(settings)}")
    if any(True for _ in lora_layers(model)):
        raise ValueError("this model already has LoRA layers; inject into a fresh model")
    family = family_of(model)
    targets, slices = own_names(config.target_modules, family)
    trainable = head_modules(model, config.head) if config.trainable_modules is None else config.trainable_modules
    both = sorted(set(config.target_modules) & set(trainable))
    if both:
        raise ValueError(
            f"{', '.join(both)} is both a LoRA target and a module trained in full; name it in one of the two"
        )
    wanted_layers = None if config.layers is None else set(config.layers)
    in_scope = [
        name
        for name, module in model.named_modules()
        if isinstance(module, FROZEN_LINEAR)
        and (wanted_layers is None or layer_index(name) in wanted_layers)
        and not _is_under(name, trainable)
    ]
    matches = [name for name in in_scope if is_target(name, targets)]
    fused = [name for name in in_scope if slices and path_in_layer(name) == family.fused_qkv]
    if not matches and not fused:
        linear_names = sorted(
            {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, FROZEN_LINEAR)}
        )
        where = "" if wanted_layers is None else f" in layers {sorted(wanted_layers)}"
        where += f" outside the trainable modules {list(trainable)}" if trainable else ""
        asked = sorted(set(targets) | {f"{family.fused_qkv}[{role}]" for role in slices})
        raise ValueError(f"no nn.Linear named {asked}{where}; this model's Linear modules are named {linear_names}")
    if set(matches) & set(fused):
        raise SettingError(
            f"{{target_modules}} name {family.fused_qkv} whole and by its slices {list(slices)}; name one of the two",
            "target_modules",
        )
    if fused and (config.dora or config.init == "pissa"):
        variant, setting, field_name = ("DoRA", "{dora}", "dora") if config.dora else ("PiSSA", "{init} pissa", "init")
        whole = family.fused_qkv.rsplit(".", 1)[-1]
        raise SettingError(
            f"{variant} on slices of the fused {family.fused_qkv} is not supported (its norms or SVD are the whole "
            f"layer's); adapt the whole layer ({{target_modules}} {whole}) or drop {setting}",
            "target_modules",
            field_name,
        )

    parameter_names = [name for name, _ in model.named_parameters()]
    absent = [module for module in trainable if not _is_under_any(parameter_names, module)]
    if absent:
        raise ValueError(
            f"no parameter lies in the trainable module(s) {absent}; this model's top-level "
            f"modules are {sorted({n.split('.')[0] for n in parameter_names})}"
        )
    head_layer = _prepare_head(model, config.head, trainable)
    order = [name for name, _ in model.named_modules()]
    fingerprinted = sorted(dict.fromkeys([*matches, *fused, *head_layer]), key=order.index)

    fingerprint = base_fingerprint(model, fingerprinted)  # before PiSSA changes W
    model.requires_grad_(False)
    layer_class = DoRALinear if config.dora else LoRALinear
    wrapped = [name for name in fingerprinted if name in matches or name in fused or config.head == "lora"]
    for name in wrapped:
        base, settings = model.get_submodule(name), (config.r, config.alpha, config.dropout, config.rslora)
        layer = FusedQKVLoRALinear(base, *settings, slices=slices) if name in fused else layer_class(base, *settings)
        if config.init == "pissa":
            pissa_init_(layer)
        _replace(model, name, layer)
    for name, parameter in model.named_parameters():
        if _is_under(name, trainable):
            parameter.requires_grad_(True)
    model.lora = Injection(config, tuple(wrapped), fingerprint, tuple(trainable))
    return wrapped


def head_modules(model: nn.Module, head: str = "full") -> tuple[str, ...]:
    """What trains in full by default: the head (``"full"``: ``Family.head``; ``"lora"`` and
    ``"linear"``: its output layer) and every module whose parameters the checkpoint did not hold
    (``model.fresh_parameters``, the loading report), but the head's hidden layer that ``"lora"``
    and ``"linear"`` keep frozen. Named by the fewest modules that cover exactly those
    parameters, in model order: ``("classifier",)`` for RoBERTa, ``("pooler", "classifier")`` for
    DeBERTa. A model of no known family: the fresh modules, or ``("classifier",)`` without a report.
    """
    family = family_of(model)
    fresh = {name.rsplit(".", 1)[0] for name in getattr(model, "fresh_parameters", ())}
    if family is None:
        return _covering(model, fresh) if fresh else ("classifier",)
    owners = fresh | set(family.head if head == "full" else (family.head_output,))
    if head != "full":
        owners.discard(family.head_dense)
    return _covering(model, owners)


def _covering(model: nn.Module, owners: set[str]) -> tuple[str, ...]:
    """The fewest module names covering exactly the parameters of the modules ``owners``:
    ``classifier`` for ``classifier.dense`` and ``classifier.out_proj`` when it holds nothing else."""
    names = [name for name, _ in model.named_parameters()]
    chosen = {name for name in names if any(name.startswith(owner + ".") for owner in owners)}
    covering = []
    for name in names:
        parts = name.split(".")
        for end in range(1, len(parts)) if name in chosen else ():
            prefix = ".".join(parts[:end])
            if all(other in chosen for other in names if other.startswith(prefix + ".")):
                covering += [] if prefix in covering else [prefix]
                break
    return tuple(covering)


@torch.no_grad()
def _prepare_head(model: nn.Module, head: str, trainable: Iterable[str]) -> list[str]:
    """For ``head`` ``"lora"`` and ``"linear"``: the head's hidden layer, frozen, at the identity
    when the checkpoint did not hold it (a random start could not be rebuilt). Returns its name
    (``[]`` for ``"full"``) for the fingerprint; refuses a head the family cannot have, and any
    fresh parameter that would stay random (neither trained nor rebuilt)."""
    family, fresh = family_of(model), set(getattr(model, "fresh_parameters", ()))
    dense = [] if head == "full" or family is None else [family.head_dense]
    if head != "full" and family is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        raise SettingError(
            f"{{head}} {head} needs the head's layers, known for {sorted(FAMILIES)}, not {model_type!r}", "head"
        )
    if dense and _is_under(f"{dense[0]}.weight", trainable):
        raise SettingError(
            f"{{head}} {head} keeps {dense[0]} frozen, but it lies in the {{trainable_modules}} {list(trainable)}",
            "head",
            "trainable_modules",
        )
    if dense and f"{dense[0]}.weight" in fresh:
        if head == "linear" and not family.tanh_head:
            raise SettingError(
                f"{{head}} linear needs the head's hidden layer {dense[0]} at the identity (the checkpoint lacks "
                "it), and the activation after it drops part of what the identity passes; use {head} lora or full",
                "head",
            )
        layer = model.get_submodule(dense[0])
        if not layer.weight.is_meta:
            layer.weight.copy_(torch.eye(*layer.weight.shape))
            if layer.bias is not None:
                layer.bias.zero_()
    random = [name for name in sorted(fresh) if not _is_under(name, trainable) and not name.startswith(tuple(dense))]
    if random:
        raise SettingError(
            f"{_some(random)} are not in the checkpoint (initialised at random) and lie in none of the "
            f"{{trainable_modules}} {list(trainable)}: they would stay random and unsaved; add their modules, "
            "or leave {trainable_modules} to its default (the head)",
            "trainable_modules",
        )
    return dense


def injection(model: nn.Module) -> Injection:
    """``model.lora``: what ``inject_lora`` did to ``model``. Raises ``ValueError`` if it did nothing."""
    if not isinstance(getattr(model, "lora", None), Injection):
        raise ValueError("the model has no LoRA layers; call inject_lora first")
    return model.lora


def saved_lora_config(model: nn.Module) -> LoRAConfig:
    """The ``LoRAConfig`` of the adapter ``lora_state_dict`` returns: the one ``inject_lora`` was
    given with the modules it trained in full spelled out (``head_modules`` when it named none),
    except that a PiSSA adapter is saved as the plain LoRA of rank ``2r`` with the same
    scaling (``alpha`` doubled, or times ``sqrt(2)`` with rsLoRA), as peft saves a converted
    PiSSA adapter: applied to the pretrained weights it gives the trained model."""
    config = dataclasses.replace(injection(model).config, trainable_modules=injection(model).trainable_modules)
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
    """A readable breakdown of the trainable parameters, one row per module, in two parts with
    a subtotal each: the encoder layers (LoRA, anything trained in full there), then the head
    (every module outside the encoder layers: the pooler and classifier, a LoRA on them); the
    total last.

    LoRA rows show the shapes of A and B and the count as ``r * (in + out)``, DoRA rows as
    ``r * (in + out) + out`` (the magnitude vector), LoRA on ``k`` slices of a fused q/k/v
    Linear as ``k * r * (in + h)``.
    """
    rows, lora_names = [], set()
    for name, module in lora_layers(model):
        lora_names.update(f"{name}.{p}" for p, _ in module.named_parameters(recurse=False))
        r, n_in, n_out = module.r, module.base.in_features, module.base.out_features
        extra = f" + {n_out}" if isinstance(module, DoRALinear) else ""
        if isinstance(module, FusedQKVLoRALinear):
            k, n_out = len(module.slices), n_out // 3
            shapes, formula = (f"{k * r}x{n_in}", f"{k}x{n_out}x{r}"), f"{k} * {r} * ({n_in} + {n_out})"
        else:
            shapes, formula = (f"{r}x{n_in}", f"{n_out}x{r}"), f"{r} * ({n_in} + {n_out})"
        count = sum(p.numel() for p in module.parameters() if p.requires_grad)
        rows.append((name, *shapes, count, formula + extra))
    for name, parameter in model.named_parameters():
        if parameter.requires_grad and name not in lora_names:
            rows.append((name, "", "", parameter.numel(), f"full {'x'.join(map(str, parameter.shape))}"))
    trainable, total = count_parameters(model)
    table = [("module", "A", "B", "trainable", "formula")]
    for part, in_layers in (("encoder layers", True), ("head (outside the encoder layers)", False)):
        mine = [row for row in rows if (layer_index(row[0]) is not None) == in_layers]
        table += [(*row[:3], f"{row[3]:,}", row[4]) for row in mine]
        subtotal = sum(row[3] for row in mine)
        table.append((part, "", "", f"{subtotal:,}", f"{100 * subtotal / max(trainable, 1):.1f}% of trainable"))
    table.append(("total", "", "", f"{trainable:,}", f"{100 * trainable / total:.3f}% of {total:,}"))
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in table)


def head_parameters(model: nn.Module) -> int:
    """The trainable numbers outside the encoder layers: the head (``parameter_table``'s part)."""
    return sum(p.numel() for name, p in model.named_parameters() if p.requires_grad and layer_index(name) is None)
